"""Data-driven merges end to end: statistics computed once and reused, artifacts checked,
the merge reading them tensor by tensor on the local and the Ray executor."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from amalgam.checkpoint import open_checkpoint
from amalgam.engine import MergeOptions, run_merge
from amalgam.errors import StatisticsError
from amalgam.recipe import parse_recipe
from amalgam.statistics import compute, compute_statistics
from amalgam.statistics.artifact import read_info, write_artifact
from amalgam.statistics.compute import settings_for
from tests.helpers import run_cli

EMBED = "model.embed_tokens.weight"


def recipe(method: str, models: list[Path], data: list[Path], out: Path, **extra) -> dict:
    specs = [{"uri": str(m), "data": str(d)} for m, d in zip(models, data, strict=True)]
    return {"method": method, "models": specs, "output": str(out), **extra}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_statistics_are_computed_once_and_reused(home, models, data, tmp_path, monkeypatch):
    run_merge(parse_recipe(recipe("fisher", models, data, tmp_path / "a")))
    cached = sorted((home / "statistics").iterdir())
    assert len(cached) == 2 and all(p.name.startswith("fisher-") for p in cached)

    def refuse(*args, **kwargs):
        raise AssertionError("statistics computed again")

    monkeypatch.setattr(compute, "compute_statistics", refuse)
    other = recipe("fisher", models, data, tmp_path / "b", params={"normalize": False})
    run_merge(parse_recipe(other))  # another recipe, same (model, data, kind, settings)
    assert sorted((home / "statistics").iterdir()) == cached
    # Other settings are other statistics.
    with pytest.raises(AssertionError, match="computed again"):
        run_merge(
            parse_recipe(recipe("fisher", models, data, tmp_path / "c", params={"samples": 3}))
        )


def test_fisher_merge_reads_each_models_fisher(home, models, data, tmp_path):
    out = tmp_path / "merged"
    result = run_merge(parse_recipe(recipe("fisher", models, data, out)))
    infos = result.plan.statistics
    assert [i.kind for i in infos] == ["fisher", "fisher"]
    name = "model.layers.1.mlp.up_proj.weight"
    with open_checkpoint(str(out)) as merged:
        got = merged.tensor(name)
        provenance = merged.metadata["model.safetensors"]["statistics"]
    assert all(i.content_hash in provenance for i in infos)
    ws, fs = [], []
    for m, i in zip(models, infos, strict=True):
        with open_checkpoint(str(m)) as ckpt, open_checkpoint(i.uri) as art:
            ws.append(ckpt.tensor(name).double())
            fs.append(art.tensor(name).double() / i.norm + 1e-6 / i.norm)
    want = (fs[0] * ws[0] + fs[1] * ws[1]) / (fs[0] + fs[1])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_precomputed_artifact_gives_the_same_merge(
    home, models, data, tmp_path, monkeypatch, capsys
):
    arts = []
    for i, (m, d) in enumerate(zip(models, data, strict=True)):
        art = tmp_path / f"gram{i}.safetensors"
        code, out, err = run_cli(
            ["stats", str(m), "--data", str(d), "--kind", "gram", "--output", str(art)],
            monkeypatch, capsys,
        )  # fmt: skip
        assert code == 0, err
        assert out.strip().splitlines()[-1] == str(art)
        arts.append(art)
    from_data = recipe("regmean", models, data, tmp_path / "from-data")
    given = recipe("regmean", models, data, tmp_path / "given")
    for spec, art in zip(given["models"], arts, strict=True):
        spec["statistics"] = str(art)
    run_merge(parse_recipe(from_data))
    run_merge(parse_recipe(given))
    # The same tensors and statistics provenance (the recipe hash differs: it names the files).
    with (
        open_checkpoint(str(tmp_path / "from-data")) as a,
        open_checkpoint(str(tmp_path / "given")) as b,
    ):
        assert a.names() == b.names()
        assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.names())
        meta_a, meta_b = a.metadata["model.safetensors"], b.metadata["model.safetensors"]
        assert meta_a["statistics"] == meta_b["statistics"]


def test_bad_statistics_are_refused_before_anything_is_written(home, models, data, tmp_path):
    settings = {"samples": 256}
    arts = [
        compute_statistics(str(m), str(d), "gram", settings, str(tmp_path / f"g{i}.safetensors"))
        for i, (m, d) in enumerate(zip(models, data, strict=True))
    ]
    out = tmp_path / "out"

    def attempt(method: str, statistics: list[str], data_paths=data) -> None:
        r = recipe(method, models, data_paths, out)
        for spec, s in zip(r["models"], statistics, strict=True):
            spec["statistics"] = s
        run_merge(parse_recipe(r))

    uris = [a.uri for a in arts]
    with pytest.raises(StatisticsError, match=r"models\[0\] .*computed for model sha256:"):
        attempt("regmean", [uris[1], uris[1]])  # model 1's Grams named for model 0
    with pytest.raises(
        StatisticsError, match="holds gram statistics, method 'fisher' reads fisher"
    ):
        attempt("fisher", uris)
    with pytest.raises(StatisticsError, match="computed on other data"):
        attempt("regmean", uris, data[::-1])
    # An artifact that lacks one linear layer's Gram.
    with open_checkpoint(uris[1]) as ckpt:
        tensors = {n: ckpt.tensor(n) for n in ckpt.names() if "layers.1.self_attn.v_proj" not in n}
    info = read_info(uris[1])
    lacking = write_artifact(
        str(tmp_path / "lacking.safetensors"), tensors, kind="gram", model_hash=info.model_hash,
        data_hash=info.data_hash, samples=info.samples, tokens=info.tokens, settings=settings,
    )  # fmt: skip
    with pytest.raises(
        StatisticsError, match=r"lacks the statistic of tensor 'model\.layers\.1\.self_attn\.v_proj"
    ):
        attempt("regmean", [uris[0], lacking.uri])
    # An embedding's token shares one entry short (every other tensor present).
    with open_checkpoint(uris[1]) as ckpt:
        tensors = {n: ckpt.tensor(n)[:-1] if n == EMBED else ckpt.tensor(n) for n in ckpt.names()}
    short = write_artifact(
        str(tmp_path / "short.safetensors"), tensors, kind="gram", model_hash=info.model_hash,
        data_hash=info.data_hash, samples=info.samples, tokens=info.tokens, settings=settings,
    )  # fmt: skip
    rows = len(tensors[EMBED]) + 1
    with pytest.raises(
        StatisticsError,
        match=rf"short\.safetensors: statistic of '{EMBED}' has shape \[{rows - 1}\], the "
        rf"tensor \[{rows}, 16\] needs \[{rows}\]",
    ):
        attempt("regmean", [uris[0], short.uri])
    with pytest.raises(StatisticsError, match="no such data file"):
        run_merge(
            parse_recipe(recipe("fisher", models, [data[0], tmp_path / "missing.jsonl"], out))
        )
    with pytest.raises(StatisticsError, match="not an amalgam statistics artifact"):
        attempt("regmean", [uris[0], str(models[1] / "model.safetensors")])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def strip_embedding(uri: str, out: Path) -> str:
    """The artifact without the embedding's token shares (as Gram artifacts were before)."""
    with open_checkpoint(uri) as ckpt:
        tensors = {n: ckpt.tensor(n) for n in ckpt.names() if n != EMBED}
    info = read_info(uri)
    return write_artifact(
        str(out), tensors, kind="gram", model_hash=info.model_hash, data_hash=info.data_hash,
        samples=info.samples, tokens=info.tokens, settings=info.settings,
    ).uri  # fmt: skip


def test_regmean_embedding_rows_and_the_average_variant(home, models, data, tmp_path):
    """``gram`` (default): the embedding's rows weighted by each model's token shares, read
    from the cached artifacts (keyed with the Gram version: older artifacts are not reused);
    ``average``: bit for bit the merge from artifacts that hold no token shares."""
    result = run_merge(parse_recipe(recipe("regmean", models, data, tmp_path / "gram")))
    infos = result.plan.statistics
    assert all(i.settings == settings_for("gram") and "version" in i.settings for i in infos)
    average = recipe("regmean", models, data, tmp_path / "avg", params={"embeddings": "average"})
    run_merge(parse_recipe(average))
    old = recipe("regmean", models, data, tmp_path / "old")
    for i, (spec, info) in enumerate(zip(old["models"], infos, strict=True)):
        spec["statistics"] = strip_embedding(info.uri, tmp_path / f"old{i}.safetensors")
    run_merge(parse_recipe(old))
    with (
        open_checkpoint(str(tmp_path / "gram")) as g,
        open_checkpoint(str(tmp_path / "avg")) as a,
        open_checkpoint(str(tmp_path / "old")) as o,
    ):
        assert a.names() == o.names() == g.names()
        assert all(torch.equal(a.tensor(n), o.tensor(n)) for n in a.names())
        assert all(torch.equal(a.tensor(n), g.tensor(n)) for n in a.names() if n != EMBED)
        got = g.tensor(EMBED).double()
    tables, shares = [], []
    for m, info in zip(models, infos, strict=True):
        with open_checkpoint(str(m)) as ckpt, open_checkpoint(info.uri) as art:
            tables.append(ckpt.tensor(EMBED).double())
            shares.append(art.tensor(EMBED).double())
    total = shares[0] + shares[1]
    seen = total > 0
    want = (shares[0][:, None] * tables[0] + shares[1][:, None] * tables[1]) / total[:, None]
    torch.testing.assert_close(got[seen], want[seen], rtol=1e-6, atol=1e-7)
    only0 = (shares[0] > 0) & (shares[1] == 0)
    assert only0.any() and torch.equal(got[only0].float(), tables[0][only0].float())
    torch.testing.assert_close(got[~seen], (tables[0][~seen] + tables[1][~seen]) / 2)


@pytest.mark.slow
def test_local_and_ray_outputs_are_byte_identical(models, data, tmp_path):
    """Run under the session's $AMALGAM_HOME (Ray keeps its sockets there: a pytest temporary
    folder makes their paths too long)."""
    for method in ("fisher", "regmean"):
        outputs = {}
        for executor in ("local", "ray"):
            out = tmp_path / f"{method}-{executor}"
            # a small shard size gives several shards, so Ray runs several tasks
            r = parse_recipe(recipe(method, models, data, out, max_shard_size=4000))
            run_merge(r, MergeOptions(executor=executor, device="cpu"))
            outputs[executor] = digest(out)
        assert len(outputs["local"]) > 3, method
        assert outputs["local"] == outputs["ray"], method


def test_stats_command_caches_and_reports_bad_input(home, models, data, monkeypatch, capsys):
    args = ["stats", str(models[0]), "--data", str(data[0]), "--kind", "fisher", "--samples", "3"]
    code, out, _ = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "computed in" in out
    path = Path(out.strip().splitlines()[-1])
    assert path.parent == home / "statistics" and read_info(str(path)).samples == 3
    code, out, _ = run_cli(args, monkeypatch, capsys)
    assert code == 0 and "from the cache" in out and out.strip().endswith(str(path))
    for bad, message in (
        (["--data", str(data[0]) + ".missing"], "no such data file"),
        (["--kind", "hessian"], "kind: expected one of"),
        (["--samples", "0"], "samples: expected a positive integer"),
    ):
        code, _, err = run_cli([*args, *bad], monkeypatch, capsys)
        assert code == 2 and err.startswith("error: ") and message in err, err
    code, _, err = run_cli(
        ["stats", str(data[0]), "--data", str(data[0]), "--kind", "gram"], monkeypatch, capsys
    )
    assert code == 2 and "not a .safetensors file or model folder" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_artifacts_and_data_on_s3(s3, models, data, tmp_path, executor):
    """``amalgam stats --output s3://...`` artifacts and jsonl data on S3 serve a merge whose
    tensors equal the merge from local data; workers read the statistics from the store."""
    bucket = s3.make_bucket(f"stats-{executor}")
    opts = s3.storage_options()
    fs = s3.filesystem()
    remote_data = []
    for d in data:
        fs.put(str(d), f"{bucket}/{d.name}")
        remote_data.append(f"s3://{bucket}/{d.name}")
    specs = []
    for i, (m, d) in enumerate(zip(models, remote_data, strict=True)):
        art = f"s3://{bucket}/gram{i}.safetensors"
        compute_statistics(str(m), d, "gram", {"samples": 256}, art, **opts)
        specs.append({"uri": str(m), "data": d, "statistics": art})
    remote = parse_recipe(
        {"method": "regmean", "models": specs, "output": str(tmp_path / "remote"),
         "storage_options": opts, "max_shard_size": 4000}
    )  # fmt: skip
    run_merge(remote, MergeOptions(executor=executor, device="cpu"))
    run_merge(parse_recipe(recipe("regmean", models, data, tmp_path / "local")))
    with (
        open_checkpoint(str(tmp_path / "remote")) as a,
        open_checkpoint(str(tmp_path / "local")) as b,
    ):
        assert len(a.files) > 1
        assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in b.names())
