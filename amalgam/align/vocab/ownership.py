"""The ownership sidecar of an aligned copy: which of its vocabulary rows came from the model
itself (the others are fill). The merge plan reads it (:mod:`amalgam.engine.rows`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from amalgam import storage
from amalgam.errors import CheckpointError

ROWS_FILE = "amalgam-rows.json"


@dataclass(frozen=True)
class Ownership:
    """``rows`` rows of each tensor in ``tensors``; the model owns the ``owned`` [start, stop)
    ranges."""

    rows: int
    owned: tuple[tuple[int, int], ...]
    tensors: tuple[str, ...]

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.rows, dtype=torch.bool)
        for start, stop in self.owned:
            m[start:stop] = True
        return m

    def as_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "owned": [list(r) for r in self.owned],
            "tensors": list(self.tensors),
        }


def ownership_of(mask: torch.Tensor, tensors: list[str]) -> Ownership:
    """The ownership of the rows ``mask`` marks."""
    return Ownership(int(mask.numel()), mask_ranges(mask), tuple(tensors))


def mask_ranges(mask: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The ``[start, stop)`` runs of True in the 1-D ``mask``."""
    padded = torch.cat(
        [torch.zeros(1, dtype=torch.int), mask.int(), torch.zeros(1, dtype=torch.int)]
    )
    edges = torch.nonzero(padded.diff()).flatten().tolist()
    return tuple((edges[i], edges[i + 1]) for i in range(0, len(edges), 2))


def read_ownership(fs: Any, root: str) -> Ownership | None:
    """The sidecar of the checkpoint folder ``root``, or None when it has none."""
    path = storage.join(root, ROWS_FILE)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as fh:
            data = json.loads(fh.read())
        rows = int(data["rows"])
        owned = tuple((int(a), int(b)) for a, b in data["owned"])
        tensors = tuple(str(t) for t in data["tensors"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{storage.full_uri(fs, path)}: malformed ({exc!r})") from None
    if any(not 0 <= a < b <= rows for a, b in owned):
        raise CheckpointError(f"{storage.full_uri(fs, path)}: owned ranges outside 0..{rows}")
    return Ownership(rows, owned, tensors)
