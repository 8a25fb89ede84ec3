"""Tokenizer transplant benchmark: a zoo expert given an unrelated tokenizer, scored before and
after, per approximation method; then what the shared tokenizer makes possible (a merge).

The donor tokenizer is a byte-pair encoding learned on the zoo's training texts (tokenizers'
`BpeTrainer`): every zoo character, other special tokens in another order, and `--merges`
multi-character tokens the zoo's character-level vocabulary lacks. The donor model is a Llama
of the zoo's base shape trained from scratch with it (`amalgam.zoo.train`, `--steps` steps on
every task, both conventions, as the zoo's base). The expert is transplanted onto the donor
tokenizer by each method of `amalgam.align.transplant`, and every model is scored on the test
split of every zoo task: accuracy (`quick_evaluate`, which tokenizes with the model's own
tokenizer) and the negative log-likelihood of the correct answers, per token (perplexity) and
per character (comparable across tokenizers, since a merged token covers several characters).

    python benchmarks/transplant.py                 # full zoo (5 minutes on 2 cores)
    python benchmarks/transplant.py --profile tiny  # tiny zoo (under a minute)
    python benchmarks/transplant.py --scale         # time and peak memory on a larger model

Writes `results/transplant.{md,json}` (`transplant-<profile>` for a profile other than full;
`transplant-scale` for `--scale`: a synthetic model of `--layers` 1024-wide float32 layers with
a 32k vocabulary, given a donor vocabulary of which an eighth is new, each method run in a
fresh process).
The donor is trained once per zoo, merge count and step count, then reused from `--work`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
TRAINING = "donor-training.json"  # next to the donor: its training time and final loss
DONOR_SPECIALS = {"eos": "<|eos|>", "bos": "<|bos|>", "unk": "<|unk|>", "pad": "<|pad|>"}
#: Donor training steps per zoo profile (the zoo's own base takes 300 / 2000).
STEPS = {"tiny": 300, "full": 800}
#: (row label, transplant method, k).
METHODS = (
    ("omp k=8", "omp", 8),
    ("omp k=32", "omp", 32),
    ("least_squares", "least_squares", 8),
    ("subword", "subword", 8),
)


def donor_tokenizer(texts: list[str], merges: int, max_length: int) -> Any:
    """A BPE tokenizer learned on ``texts``: the zoo's characters plus ``merges`` merges."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    from amalgam.zoo.tasks import VOCABULARY

    core = Tokenizer(models.BPE(unk_token=DONOR_SPECIALS["unk"]))
    core.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=len(DONOR_SPECIALS) + len(VOCABULARY) + merges,
        special_tokens=list(DONOR_SPECIALS.values()),
        initial_alphabet=list(VOCABULARY),
        limit_alphabet=len(VOCABULARY),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=max_length,
        **{f"{role}_token": token for role, token in DONOR_SPECIALS.items()},
    )


def build_donor(zoo: Any, profile: Any, folder: Path, merges: int, steps: int) -> dict[str, Any]:
    """Train the donor into ``folder`` (reused when it is there); its tokenizer's facts and
    its training time and loss."""
    from transformers import AutoTokenizer

    from amalgam.zoo.build import prepare_data, save_model, seed_for
    from amalgam.zoo.profiles import Schedule
    from amalgam.zoo.train import deterministic_torch, encode_examples, new_model, train

    zoo_tokenizer, splits, _ = prepare_data(profile)
    if not (folder / TRAINING).is_file():  # written last: a finished donor
        texts = [t for s in splits.values() for e in s["train"] for t in (e.prompt, e.answer)]
        tokenizer = donor_tokenizer(texts, merges, profile.base.max_positions)
        pools = [encode_examples(tokenizer, s["train"], both=True) for s in splits.values()]
        schedule = Schedule(**{**profile.base_schedule.model_dump(), "steps": steps})
        started = time.perf_counter()
        with deterministic_torch():
            model = new_model(profile.base, tokenizer, seed_for(profile, "donor-init"))
            loss = train(
                model,
                pools,
                schedule,
                pad_id=tokenizer.pad_token_id,
                seed=seed_for(profile, "donor"),
                log=print,
                label="donor",
            )
        training = {"seconds": time.perf_counter() - started, "final_loss": loss}
        save_model(model, tokenizer, folder)
        (folder / TRAINING).write_text(json.dumps(training) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    zoo_vocab, donor_vocab = zoo_tokenizer.get_vocab(), tokenizer.get_vocab()
    shared = [t for t in donor_vocab if t in zoo_vocab]
    moved = sum(zoo_vocab[t] != donor_vocab[t] for t in shared)
    test = [e.prompt + e.answer for s in splits.values() for e in s["test"]]
    return {
        "donor_vocab": len(donor_vocab),
        "zoo_vocab": len(zoo_vocab),
        "shared_by_text": len(shared),
        "shared_with_other_id": moved,
        "training": json.loads((folder / TRAINING).read_text()),
        "chars_per_token": sum(map(len, test))
        / sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in test),
    }


def score(folder: Path, zoo: Any, limit: int | None) -> dict[str, Any]:
    """Accuracy per task and the answers' NLL per token and per character."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amalgam.evaluate.perplexity import sequence_nll, task_texts, token_ids
    from amalgam.evaluate.quick import quick_evaluate

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    accuracy = quick_evaluate(model, tokenizer, zoo.tasks_dir, zoo.task_names, limit=limit)
    pairs = task_texts(zoo.tasks_dir, zoo.task_names, "test", limit)
    nll, tokens = sequence_nll(model, token_ids(tokenizer, pairs))
    chars = sum(len(answer) for _, answer in pairs)
    return {
        "accuracy": accuracy,
        "mean_accuracy": sum(accuracy.values()) / len(accuracy),
        "perplexity": math.exp(nll / tokens),
        "nats_per_char": nll / chars,
    }


def merge(models: list[Path], out: Path) -> None:
    """The plain average of ``models`` (amalgam's linear method) into ``out``."""
    from amalgam.engine import MergeOptions, run_merge
    from amalgam.recipe import ModelSpec, Recipe

    recipe = Recipe(method="linear", models=[ModelSpec(uri=str(m)) for m in models])
    run_merge(recipe, MergeOptions(output=str(out), overwrite=True, device="cpu", threads=1))


def max_difference(a: Path, b: Path) -> float:
    from amalgam.checkpoint import open_checkpoint

    with open_checkpoint(str(a)) as x, open_checkpoint(str(b)) as y:
        return max(float((x.tensor(n) - y.tensor(n)).abs().max()) for n in x.names())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from amalgam.align.transplant import transplant
    from amalgam.zoo import build_zoo
    from amalgam.zoo.build import get_profile

    zoo = build_zoo(profile=args.profile)
    work = Path(args.work) / f"{zoo.profile}-{zoo.hash}-m{args.merges}-s{args.steps}"
    donor = work / "donor"
    facts = build_donor(zoo, get_profile(args.profile), donor, args.merges, args.steps)
    expert, other = args.expert, args.other
    rows: dict[str, dict[str, Any]] = {
        f"{expert} (zoo tokenizer)": score(zoo.experts[expert], zoo, args.limit),
        "donor (own tokenizer)": score(donor, zoo, args.limit),
    }
    seconds = {}
    for label, method, k in METHODS:
        out = work / f"{expert}-{method}-{k}"
        started = time.perf_counter()
        transplant(
            str(zoo.experts[expert]), str(donor), str(out), method=method, k=k, overwrite=True
        )
        seconds[label] = time.perf_counter() - started
        rows[f"{expert} -> donor tokenizer, {label}"] = score(out, zoo, args.limit)

    # merging: two experts of one base merge as well after the transplant as before it
    merges: dict[str, dict[str, Any]] = {}
    pair = [zoo.experts[expert], zoo.experts[other]]
    moved = [work / f"{expert}-omp-8", work / f"{other}-omp-8"]
    transplant(str(pair[1]), str(donor), str(moved[1]), method="omp", k=8, overwrite=True)
    merge(pair, work / "merge-zoo")
    merge(moved, work / "merge-transplanted")
    transplant(
        str(work / "merge-zoo"), str(donor), str(work / "merge-then-transplant"), overwrite=True
    )
    commute = max_difference(work / "merge-transplanted", work / "merge-then-transplant")
    merges[f"{expert} + {other}, zoo tokenizer"] = score(work / "merge-zoo", zoo, args.limit)
    merges[f"{expert} + {other}, both transplanted (omp k=8)"] = score(
        work / "merge-transplanted", zoo, args.limit
    )
    # the donor and the transplanted expert share a tokenizer but not a base
    merge([moved[0], donor], work / "merge-donor")
    merges[f"{expert} (transplanted, omp k=8) + donor"] = score(
        work / "merge-donor", zoo, args.limit
    )
    return {
        "profile": zoo.profile,
        "zoo_hash": zoo.hash,
        "expert": expert,
        "other": other,
        "merges": args.merges,
        "steps": args.steps,
        "limit": args.limit,
        "tokenizers": facts,
        "transplant_seconds": seconds,
        "rows": rows,
        "merge_rows": merges,
        "merge_then_transplant_max_abs_difference": commute,
    }


def write_synthetic(folder: Path, vocab: list[str], hidden: int, layers: int, seed: int) -> None:
    """A model folder of random float32 weights: vocabulary tables over ``vocab`` and
    ``layers`` square matrices, with a word-level tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn((len(vocab), hidden), generator=g),
        "lm_head.weight": torch.randn((len(vocab), hidden), generator=g),
    }
    for layer in range(layers):
        tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = torch.randn(
            (hidden, hidden), generator=g
        )
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"vocab_size": len(vocab)}))


def scale(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time and peak RSS of each method on a synthetic model, one fresh process each."""
    import subprocess
    import sys

    work = Path(args.work) / f"scale-{args.layers}"
    words, new = 32000, 4000
    model_vocab = ["<unk>", *(f"w{i}" for i in range(1, words))]
    donor_vocab = ["<unk>", *(f"w{i}" for i in range(words - 1, new, -1))]
    donor_vocab += [f"n{i}" for i in range(words - len(donor_vocab))]
    if not (work / "donor" / "config.json").is_file():
        write_synthetic(work / "model", model_vocab, 1024, args.layers, 0)
        write_synthetic(work / "donor", donor_vocab, 768, 0, 1)
    weights = (work / "model" / "model.safetensors").stat().st_size
    runs = {}
    calls = {"(imports only)": ""} | {
        label: f"transplant({str(work / 'model')!r}, {str(work / 'donor')!r}, "
        f"{str(work / 'out')!r}, method={method!r}, k={k}, overwrite=True)\n"
        for label, method, k in (METHODS[0], *METHODS[2:])
    }
    for label, call in calls.items():
        code = (
            "import re, torch; torch.set_num_threads(1)\n"
            "from amalgam.align.transplant import transplant\n"
            f"{call}"
            # the high-water mark of this program alone (ru_maxrss would count the parent's
            # pages the child held between fork and exec)
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
        )
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        runs[label] = {
            "seconds": time.perf_counter() - started,
            "peak_rss_mb": int(done.stdout.split()[-1]) / 1024,
        }
    return {"weights_mb": weights / 2**20, "words": words, "new": new, "runs": runs}


def table(rows: dict[str, dict[str, Any]], tasks: list[str], expert: str) -> list[str]:
    lines = [
        f"| model | {expert} acc | other tasks acc | mean acc | answer ppl/token | nats/char |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        others = [r["accuracy"][t] for t in tasks if t != expert]
        lines.append(
            f"| {label} | {r['accuracy'][expert]:.3f} | {sum(others) / len(others):.3f} | "
            f"{r['mean_accuracy']:.3f} | {r['perplexity']:.3f} | {r['nats_per_char']:.3f} |"
        )
    return lines


def report(result: dict[str, Any], machine: str, seconds: float) -> str:
    facts, tasks = result["tokenizers"], list(next(iter(result["rows"].values()))["accuracy"])
    lines = [
        "# Tokenizer transplant on the zoo",
        "",
        f"Zoo `{result['profile']}-{result['zoo_hash']}`; {machine}; whole run "
        f"{seconds:.0f} s (`python benchmarks/transplant.py --profile {result['profile']} "
        f"--steps {result['steps']} --merges {result['merges']}`).",
        "",
        f"Donor tokenizer: BPE learned on the zoo's training texts, {facts['donor_vocab']} "
        f"tokens ({result['merges']} multi-character merges the zoo's {facts['zoo_vocab']}-token "
        f"character vocabulary lacks); {facts['shared_by_text']} tokens shared by text, "
        f"{facts['shared_with_other_id']} of them under another id; special tokens renamed "
        f"(matched by role); {facts['chars_per_token']:.2f} characters per token on the test "
        f"texts. Donor model: the zoo's base shape, trained from scratch with it for "
        f"{result['steps']} steps ({facts['training']['seconds']:.0f} s, loss of the last "
        f"tenth {facts['training']['final_loss']:.3f}).",
        "",
        "Test split of every task"
        + (f" (first {result['limit']} records each)" if result["limit"] else "")
        + "; accuracy by log-likelihood of each choice, NLL of the correct answer "
        "(per token, and per character, the one comparable across tokenizers).",
        "",
        *table(result["rows"], tasks, result["expert"]),
        "",
        "Transplant time (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["transplant_seconds"].items()),
        "",
        "## Merging after the transplant",
        "",
        *table(result["merge_rows"], tasks, result["expert"]),
        "",
        f"Averaging two transplanted experts equals transplanting their average: largest "
        f"difference over all tensors {result['merge_then_transplant_max_abs_difference']:.2e} "
        "(OMP's and least squares' coefficients depend on the donor only, so the transplant "
        "is the same linear map of every model's rows).",
        "",
    ]
    return "\n".join(lines)


def scale_report(result: dict[str, Any]) -> str:
    lines = [
        "# Tokenizer transplant: time and memory",
        "",
        f"{result['machine']}; one compute thread. Model: {result['weights_mb']:.0f} MB of "
        f"float32 weights, vocabulary {result['words']} x 1024 (input and head); donor "
        f"vocabulary {result['words']} x 768, {result['new']} tokens new to the model "
        "(`python benchmarks/transplant.py --scale`).",
        "",
        "| method | seconds | peak RSS (MB) |",
        "|---|---|---|",
        *(
            f"| {label} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
            for label, r in result["runs"].items()
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", choices=sorted(STEPS))
    parser.add_argument("--expert", default="zoo_reverse")
    parser.add_argument("--other", default="zoo_sort", help="second expert of the merge rows")
    parser.add_argument("--merges", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="donor training steps")
    parser.add_argument("--limit", type=int, default=None, help="test records per task")
    parser.add_argument("--work", default=".amalgam/bench-transplant")
    parser.add_argument("--scale", action="store_true", help="time and memory instead")
    parser.add_argument("--layers", type=int, default=200, help="--scale: 4 MB layers")
    args = parser.parse_args()
    args.steps = args.steps or STEPS[args.profile]
    from speed import machine

    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    if args.scale:
        result = {**scale(args), "machine": machine()}
        (RESULTS / "transplant-scale.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "transplant-scale.md").write_text(scale_report(result))
        print(scale_report(result))
        return
    started = time.perf_counter()
    result = run(args)
    seconds = time.perf_counter() - started
    name = "transplant" if args.profile == "full" else f"transplant-{args.profile}"
    result["machine"] = machine()
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(report(result, result["machine"], seconds))
    print(report(result, result["machine"], seconds))


if __name__ == "__main__":
    main()
