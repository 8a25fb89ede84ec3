"""Every stage that writes a checkpoint refuses to commit when an input file changed while it
ran: the writer's own rule (``CheckpointWriter(sources=...)``), checked here on the writer and
on real stages (MoE build, ComPEFT compression and decompression, Twin-Merging, LoRA
extraction, an adapter merge of LoRA folders, an aligned copy) whose input is rewritten in place
right after one of its reads."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from zoo.conftest import zoo_tiny

from amalgam.adapters import open_input
from amalgam.adapters.adapter_output import merge_recipe
from amalgam.adapters.extract import extract_lora
from amalgam.align.copies import write_aligned_copy
from amalgam.checkpoint import Checkpoint
from amalgam.compress import compress_model, decompress_model
from amalgam.engine import MergeOptions
from amalgam.errors import CheckpointError
from amalgam.moe import build_moe, parse_moe_config
from amalgam.recipe import ModelSpec, Recipe, parse_recipe
from amalgam.twin.build import build_twin
from amalgam.twin.spec import TwinSpec
from amalgam.writer import COMMIT_RECORD, CheckpointWriter
from tests.engine.test_inputs_unchanged import rewrite_in_place
from tests.helpers import recipe_dict, write_model

__all__ = ["zoo_tiny"]

TASKS = ["zoo_sort", "zoo_vowels"]


def copy_zoo(zoo: Any, root: Path) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """The tiny zoo's base, two experts and their LoRAs copied under ``root`` (the cached zoo
    is never rewritten)."""
    base = Path(shutil.copytree(zoo.base, root / "base"))
    experts = {t: Path(shutil.copytree(zoo.experts[t], root / "experts" / t)) for t in TASKS}
    loras = {t: Path(shutil.copytree(zoo.loras[t], root / "loras" / t)) for t in TASKS}
    return base, experts, loras


def rewrite_after_first_read(
    monkeypatch: pytest.MonkeyPatch, victim: Path, when: Callable[[], bool] = lambda: True
) -> list[bool]:
    """Rewrite ``victim`` in place (same inode and size, one byte and the mtime changed) as
    soon as a checkpoint has opened it for a tensor read (once ``when()`` holds): the read
    under way, and every later one, sees the new bytes. The returned list is filled once it
    happened."""
    done: list[bool] = []
    opened = Checkpoint._fd

    def fd(self: Checkpoint, file: str) -> int:
        out = opened(self, file)
        if not done and Path(self.file_path(file)) == victim and when():
            rewrite_in_place(victim)
            done.append(True)
        return out

    monkeypatch.setattr(Checkpoint, "_fd", fd)
    return done


def no_model_at(out: Path) -> bool:
    """Nothing at ``out``, and no staging folder beside it."""
    return not out.exists() and not [p for p in out.parent.iterdir() if ".partial-" in p.name]


# -- the writer -----------------------------------------------------------------------------


def small_model(folder: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    write_model(folder, {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)})
    return folder / "model.safetensors"


def copy_through(writer: CheckpointWriter, ckpt: Checkpoint) -> None:
    shard = writer.shard("model.safetensors", [("w", "F32", (4, 3))], {})
    shard.write("w", ckpt.tensor("w"))
    shard.close()


def test_the_writer_commits_only_while_its_sources_are_unchanged(tmp_path: Path) -> None:
    file = small_model(tmp_path / "in")
    with Checkpoint(str(tmp_path / "in")) as ckpt:
        writer = CheckpointWriter(str(tmp_path / "ok"), sources=[ckpt])
        copy_through(writer, ckpt)
        writer.commit()  # unchanged: committed
        assert (tmp_path / "ok" / COMMIT_RECORD).is_file()

        writer = CheckpointWriter(str(tmp_path / "out"), sources=[ckpt])
        copy_through(writer, ckpt)
        staging = Path(writer.staging)
        rewrite_in_place(file)
        with pytest.raises(CheckpointError, match=r"in/model\.safetensors: changed since"):
            writer.commit()
    assert not staging.exists() and no_model_at(tmp_path / "out")


def test_a_refused_commit_leaves_the_old_output_as_it_was(tmp_path: Path) -> None:
    file = small_model(tmp_path / "in")
    out = tmp_path / "out"
    with Checkpoint(str(tmp_path / "in")) as ckpt:
        first = CheckpointWriter(str(out))
        copy_through(first, ckpt)
        first.commit()
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        writer = CheckpointWriter(str(out), overwrite=True, sources=[ckpt])
        copy_through(writer, ckpt)
        writer.write_json("config.json", {"second": True})
        rewrite_in_place(file)
        with pytest.raises(CheckpointError, match="changed since it was opened"):
            writer.commit()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_an_adapter_source_is_checked_through_its_base_and_adapter(
    zoo_tiny, tmp_path: Path
) -> None:
    base, _, loras = copy_zoo(zoo_tiny, tmp_path / "in")
    uri = f"{base}+{loras['zoo_sort']}"
    for victim in (base / "model.safetensors", loras["zoo_sort"] / "adapter_model.safetensors"):
        with open_input(uri) as ckpt:
            assert [c.path for c in ckpt.stored_parts()] == [str(base), str(loras["zoo_sort"])]
            writer = CheckpointWriter(str(tmp_path / "out"), sources=[ckpt])
            rewrite_in_place(victim)
            with pytest.raises(CheckpointError, match=rf"{victim.parent.name}/{victim.name}: "):
                writer.commit()
        assert no_model_at(tmp_path / "out")


# -- the stages -----------------------------------------------------------------------------


def test_an_moe_build_whose_expert_changes_writes_nothing(
    zoo_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, experts, _ = copy_zoo(zoo_tiny, tmp_path / "in")
    config = {
        "base_model": str(base),
        "gate_mode": "random",
        "experts_per_token": 2,
        "experts": [{"source_model": str(experts[t])} for t in TASKS],
    }
    victim = experts["zoo_vowels"] / "model.safetensors"
    done = rewrite_after_first_read(monkeypatch, victim)
    out = tmp_path / "moe"
    with pytest.raises(CheckpointError, match=r"zoo_vowels/model\.safetensors: changed since"):
        build_moe(parse_moe_config(config), str(out))
    assert done and no_model_at(out)


# stage name -> the stage run from (base, expert) into out
FROM_ONE_EXPERT: dict[str, Callable[[Path, Path, Path], Any]] = {
    "compression": lambda base, expert, out: compress_model(str(expert), str(base), str(out)),
    "lora extraction": lambda base, expert, out: extract_lora(
        str(base), str(expert), str(out), rank=4, device="cpu"
    ),
}


@pytest.mark.parametrize("stage", sorted(FROM_ONE_EXPERT))
def test_a_stage_whose_expert_changes_writes_nothing(
    zoo_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    base, experts, _ = copy_zoo(zoo_tiny, tmp_path / "in")
    victim = experts["zoo_sort"] / "model.safetensors"
    done = rewrite_after_first_read(monkeypatch, victim)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"zoo_sort/model\.safetensors: changed since"):
        FROM_ONE_EXPERT[stage](base, experts["zoo_sort"], out)
    assert done and no_model_at(out)


def test_a_decompression_whose_base_changes_writes_nothing(
    zoo_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, experts, _ = copy_zoo(zoo_tiny, tmp_path / "in")
    packed = tmp_path / "packed"
    compress_model(str(experts["zoo_sort"]), str(base), str(packed))
    victim = base / "model.safetensors"
    done = rewrite_after_first_read(monkeypatch, victim)
    out = tmp_path / "rebuilt"
    with pytest.raises(CheckpointError, match=r"base/model\.safetensors: changed since"):
        decompress_model(str(packed), str(base), str(out))
    assert done and no_model_at(out)


def test_a_twin_build_whose_expert_changes_after_the_shared_merge_writes_nothing(
    zoo_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared merge commits (its inputs unchanged); the expert is rewritten while the
    Twin stage reads it for the exclusive factors: the Twin folder is refused."""
    base, experts, _ = copy_zoo(zoo_tiny, tmp_path / "in")
    recipe = Recipe(
        method="task_arithmetic",
        base=str(base),
        models=[ModelSpec(uri=str(experts[t]), name=t) for t in TASKS],
        params={"lambda": 0.3},
        dtype="float32",
    )
    spec = TwinSpec(rank=8, tasks_dir=str(zoo_tiny.tasks_dir), router_limit=4, router_steps=5)
    out = tmp_path / "twin"
    shared = tmp_path / "twin.shared"
    victim = experts["zoo_vowels"] / "model.safetensors"
    done = rewrite_after_first_read(monkeypatch, victim, when=shared.exists)
    with pytest.raises(CheckpointError, match=r"zoo_vowels/model\.safetensors: changed since"):
        build_twin(recipe, spec, str(out), options=MergeOptions(device="cpu", threads=1))
    assert done and (shared / COMMIT_RECORD).is_file() and no_model_at(out)


def test_an_adapter_merge_whose_lora_folder_changes_writes_nothing(
    zoo_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _, loras = copy_zoo(zoo_tiny, tmp_path / "in")
    out = tmp_path / "merged"
    data = recipe_dict(base, [loras[t] for t in TASKS], "task_arithmetic", out)
    victim = loras["zoo_vowels"] / "adapter_model.safetensors"
    done = rewrite_after_first_read(monkeypatch, victim)
    match = r"zoo_vowels/adapter_model\.safetensors: changed since"
    with pytest.raises(CheckpointError, match=match):
        merge_recipe(parse_recipe({**data, "output_format": "adapter"}))
    assert done and no_model_at(out)


def test_a_stage_whose_inputs_stay_unchanged_commits(zoo_tiny, tmp_path: Path) -> None:
    """The control: the same adapter merge, nothing rewritten, commits."""
    base, _, loras = copy_zoo(zoo_tiny, tmp_path / "in")
    out = tmp_path / "merged"
    data = recipe_dict(base, [loras[t] for t in TASKS], "task_arithmetic", out)
    merge_recipe(parse_recipe({**data, "output_format": "adapter"}))
    assert (out / COMMIT_RECORD).is_file() and (out / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["in", "merged"]


def test_an_aligned_copy_refuses_a_changed_checkpoint_it_took_rows_from(tmp_path: Path) -> None:
    """An aligned copy reads rows of other inputs (vocabulary donors): one rewritten meanwhile
    leaves no copy."""
    small_model(tmp_path / "src")
    donor_file = small_model(tmp_path / "donor", seed=1)
    out = tmp_path / "copy"
    with Checkpoint(str(tmp_path / "src")) as src, Checkpoint(str(tmp_path / "donor")) as donor:

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            row = donor.tensor(name)
            if name == "w":
                rewrite_in_place(donor_file)
            return tensor + row

        with pytest.raises(CheckpointError, match=r"donor/model\.safetensors: changed"):
            write_aligned_copy(src, str(out), transform, also_read=[donor])
        assert no_model_at(out)
        write_model(tmp_path / "donor2", {"w": torch.ones(4, 3), "b": torch.ones(3)})
        with Checkpoint(str(tmp_path / "donor2")) as other:
            write_aligned_copy(src, str(out), lambda n, t: t + other.tensor(n), also_read=[other])
        assert (out / COMMIT_RECORD).exists()
