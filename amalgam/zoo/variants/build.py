"""Builds the zoo's alignment variants next to a finished zoo, cached by their own hash.

The variants never change the main zoo (its hash covers only `amalgam/zoo/*.py`): they are
built on demand into `<zoo root>-variants-<hash>/`, where the hash covers the main zoo's hash,
this package's sources and `KNOBS`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from amalgam.zoo.build import MANIFEST, Zoo, ZooError, get_profile, sha256_file
from amalgam.zoo.variants.knobs import KNOBS, Knobs

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Variants:
    """A finished variants build. Every path is absolute, under `root`."""

    root: Path
    second_base: Path
    second_experts: dict[str, Path]
    token_experts: dict[str, Path]
    token_reference: dict[str, Path]
    token_tasks: dict[str, str]
    tasks_dir: Path
    permuted_base: Path

    @classmethod
    def load(cls, root: Path) -> Variants:
        """The variants whose `manifest.json` lies in `root`."""
        root = Path(root).resolve()
        path = root / MANIFEST
        if not path.is_file():
            raise ZooError(f"{path}: no manifest, so no finished variants build here")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("kind") != "variants":
            raise ZooError(f"{path}: not a variants manifest of format {MANIFEST_FORMAT}")
        paths = manifest["paths"]

        def under(folders: dict[str, str]) -> dict[str, Path]:
            return {key: root / p for key, p in folders.items()}

        return cls(
            root=root,
            second_base=root / paths["second_base"],
            second_experts=under(paths["second_experts"]),
            token_experts=under(paths["token_experts"]),
            token_reference=under(paths["token_reference"]),
            token_tasks=dict(manifest["token_tasks"]),
            tasks_dir=root / paths["tasks"],
            permuted_base=root / paths["permuted_base"],
        )


#: The permutation code a permuted copy runs: which permutation a seed draws, how it is applied.
PERMUTATION_SOURCES = ("spec.py", "apply.py")


def source_files() -> list[Path]:
    """The code that, with the main zoo's hash, decides a variants build: this package and the
    permutation code behind `permuted_base`."""
    permutation = Path(__file__).parents[2] / "align" / "permutation"
    return [
        *sorted(Path(__file__).parent.glob("*.py")),
        *(permutation / name for name in PERMUTATION_SOURCES),
    ]


def variants_hash(zoo: Zoo, knobs: Knobs = KNOBS) -> str:
    """12 hex digits of sha256 over the main zoo's hash, the knobs and this package's sources."""
    digest = hashlib.sha256(f"{zoo.hash}\0{knobs.model_dump_json()}".encode())
    for path in source_files():
        digest.update(f"\0{path.name}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def variants_root(zoo: Zoo) -> Path:
    """Where the variants of `zoo` live: a sibling folder of the zoo named by their hash."""
    return zoo.root.parent / f"{zoo.root.name}-variants-{variants_hash(zoo)}"


def build_variants(
    zoo: Zoo, *, log: Callable[[str], None] = print, force: bool = False
) -> Variants:
    """Build the variants of `zoo` (second base and experts, token experts and their
    reference, a permuted copy of the base) and return them; a finished build with the same
    hash is returned as is unless `force`. Built in a temporary sibling folder renamed into
    place once its manifest is written, so an interrupted build never looks finished."""
    root = variants_root(zoo)
    if (root / MANIFEST).is_file() and not force:
        log(f"variants {root.name}: cached at {root}")
        return Variants.load(root)
    # lazy: torch and transformers, which cached variants do not need
    from amalgam.zoo.train import deterministic_torch
    from amalgam.zoo.variants.training import build_into

    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        started = time.perf_counter()
        log(f"variants {root.name}: building into {tmp}")
        with deterministic_torch():
            manifest = build_into(tmp, zoo, get_profile(zoo.profile), KNOBS, log)
        manifest |= {
            "format": MANIFEST_FORMAT,
            "kind": "variants",
            "zoo": zoo.hash,
            "hash": root.name.rsplit("-", 1)[1],
            "knobs": KNOBS.model_dump(),
            "sha256": {
                str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*.safetensors"))
            },
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if force:
            shutil.rmtree(root, ignore_errors=True)
        try:
            tmp.rename(root)
        except OSError:
            if not (root / MANIFEST).is_file():
                raise
            log(f"variants {root.name}: another process finished the same build first")
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Variants.load(root)
