"""Bit-exact storage of a ternary tensor: positions as a bitmask or as indices, signs as bits.

Each compressed tensor ``name`` is stored as up to three safetensors entries:
``name:positions`` (U8 bitmask of ceil(n/8) bytes, or I16/I32/I64 indices, whichever is
smaller; the bitmask on a tie), ``name:signs`` (U8, ceil(k/8) bytes, bit set where the entry is
negative, in position order) and ``name:scale`` (F32 scalar). Bits are packed little-endian
within a byte (bit i of byte j is entry 8j + i).
"""

from __future__ import annotations

import numpy as np
import torch

from amalgam.checkpoint import DTYPE_NAMES, tensor_nbytes
from amalgam.compress.compeft import TernaryTensor

POSITIONS, SIGNS, SCALE = ":positions", ":signs", ":scale"
Entry = tuple[str, str, tuple[int, ...]]  # name, safetensors dtype, shape


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool vector -> uint8 vector of ceil(n/8) bytes, little-endian bit order."""
    packed = np.packbits(bits.numpy().astype(np.uint8), bitorder="little")
    return torch.from_numpy(packed)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of a uint8 vector packed by :func:`pack_bits`, as bools."""
    bits = np.unpackbits(packed.numpy(), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest signed integer type that holds every position of ``numel`` entries."""
    for dtype in (torch.int16, torch.int32):
        if numel <= torch.iinfo(dtype).max + 1:
            return dtype
    return torch.int64


def encoding(numel: int, kept: int) -> str:
    """'bitmask' or 'indices', whichever stores ``kept`` of ``numel`` positions in fewer bytes."""
    bitmask = (numel + 7) // 8
    indices = kept * index_dtype(numel).itemsize
    return "indices" if indices < bitmask else "bitmask"


def encode(name: str, t: TernaryTensor) -> list[tuple[str, torch.Tensor]]:
    """The stored entries of one ternary tensor, in file order."""
    k = t.positions.numel()
    if encoding(t.numel, k) == "bitmask":
        mask = torch.zeros(t.numel, dtype=torch.bool)
        mask[t.positions] = True
        positions = pack_bits(mask)
    else:
        positions = t.positions.to(index_dtype(t.numel))
    return [
        (name + POSITIONS, positions),
        (name + SIGNS, pack_bits(t.negative)),
        (name + SCALE, torch.tensor(t.scale, dtype=torch.float32)),
    ]


def decode(
    shape: tuple[int, ...], kept: int, positions: torch.Tensor, signs: torch.Tensor, scale: float
) -> TernaryTensor:
    """Invert :func:`encode` given the original shape and the number of kept entries."""
    numel = int(np.prod(shape, dtype=np.int64))
    if positions.dtype == torch.uint8:  # a bitmask; indices are never stored as bytes
        index = torch.nonzero(unpack_bits(positions, numel)).reshape(-1)
    else:
        index = positions.to(torch.int64)
    return TernaryTensor(shape, index, unpack_bits(signs, kept), scale)


def entries_of(stored: list[tuple[str, torch.Tensor]]) -> list[Entry]:
    return [(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in stored]


def payload_bytes(entries: list[Entry]) -> int:
    return sum(tensor_nbytes(dtype, shape) for _, dtype, shape in entries)
