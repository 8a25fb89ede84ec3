"""Bit-exact storage of a ternary tensor: kept positions, their signs as bits, one scale.

Each compressed tensor ``name`` is stored as three safetensors entries: ``name:positions``,
``name:signs`` (U8, ceil(k/8) bytes, bit set where the entry is negative, in position order)
and ``name:scale`` (F32 scalar). The k kept positions out of n take whichever of three codes is
smallest for (n, k), so the size is known before any data is seen:

- ``bitmask``: U8, ceil(n/8) bytes, bit p set for each kept position p;
- ``indices``: the positions as I16, I32 or I64 (the narrowest that holds n - 1);
- ``elias_fano``: U8, the Elias-Fano code of the sorted positions (Elias 1974, Fano 1971):
  with L = floor(log2(n/k)), the low L bits of every position (k*L bits), then the high parts
  in unary, bit (p >> L) + i set for the i-th position (k + ((n-1) >> L) bits); about
  2 + log2(n/k) bits per kept entry, close to the entropy of a random k-of-n choice.

Bits are packed little-endian within a byte (bit i of byte j is bit 8j + i of the stream).
"""

from __future__ import annotations

import numpy as np
import torch

from amalgam.checkpoint import DTYPE_NAMES, tensor_nbytes
from amalgam.compress.compeft import TernaryTensor

POSITIONS, SIGNS, SCALE = ":positions", ":signs", ":scale"
ENCODINGS = ("bitmask", "elias_fano", "indices")  # preference order on equal sizes
Entry = tuple[str, str, tuple[int, ...]]  # name, safetensors dtype, shape


def pack_bits(bits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Bool vector -> uint8 vector of ceil(n/8) bytes, little-endian bit order."""
    array = bits.numpy() if isinstance(bits, torch.Tensor) else bits
    return torch.from_numpy(np.packbits(array.astype(np.uint8), bitorder="little"))


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


def low_bits(numel: int, kept: int) -> int:
    """Elias-Fano's L = floor(log2(numel / kept)) (0 when nothing or everything is kept)."""
    return max(0, (numel // kept).bit_length() - 1) if kept else 0


def _ef_lengths(numel: int, kept: int) -> tuple[int, int]:
    """(bytes of the low parts, bits of the unary high parts) of the Elias-Fano code."""
    low = low_bits(numel, kept)
    return (kept * low + 7) // 8, kept + ((numel - 1) >> low)


def position_bytes(numel: int, kept: int) -> dict[str, int]:
    """Bytes each code takes for ``kept`` of ``numel`` positions."""
    low_bytes, high_bits = _ef_lengths(numel, kept)
    return {
        "bitmask": (numel + 7) // 8,
        "elias_fano": low_bytes + (high_bits + 7) // 8,
        "indices": kept * index_dtype(numel).itemsize,
    }


def encoding(numel: int, kept: int) -> str:
    """The smallest code for ``kept`` of ``numel`` positions (see :data:`ENCODINGS`)."""
    sizes = position_bytes(numel, kept)
    return min(ENCODINGS, key=sizes.__getitem__)


def _elias_fano(positions: np.ndarray, numel: int) -> torch.Tensor:
    k, low = len(positions), low_bits(numel, len(positions))
    _, high_bits = _ef_lengths(numel, k)
    lows = (positions[:, None] >> np.arange(low)) & 1
    high = np.zeros(high_bits, dtype=bool)
    high[(positions >> low) + np.arange(k)] = True
    return torch.cat([pack_bits(lows.reshape(-1).astype(bool)), pack_bits(high)])


def _elias_fano_decode(packed: torch.Tensor, numel: int, kept: int) -> torch.Tensor:
    low = low_bits(numel, kept)
    low_bytes, high_bits = _ef_lengths(numel, kept)
    lows = unpack_bits(packed[:low_bytes], kept * low).numpy().reshape(kept, low)
    ones = np.flatnonzero(unpack_bits(packed[low_bytes:], high_bits).numpy())
    highs = ones - np.arange(kept)
    values = (highs << low) | (lows.astype(np.int64) << np.arange(low)).sum(axis=1)
    return torch.from_numpy(values.astype(np.int64))


def encode(name: str, t: TernaryTensor) -> list[tuple[str, torch.Tensor]]:
    """The stored entries of one ternary tensor, in file order."""
    return [
        (name + POSITIONS, encode_positions(t.positions, t.numel)),
        (name + SIGNS, pack_bits(t.negative)),
        (name + SCALE, torch.tensor(t.scale, dtype=torch.float32)),
    ]


def decode(
    shape: tuple[int, ...], kept: int, positions: torch.Tensor, signs: torch.Tensor, scale: float
) -> TernaryTensor:
    """Invert :func:`encode` given the original shape and the number of kept entries."""
    numel = int(np.prod(shape, dtype=np.int64))
    index = decode_positions(positions, numel, kept)
    return TernaryTensor(shape, index, unpack_bits(signs, kept), scale)


def encode_positions(positions: torch.Tensor, numel: int) -> torch.Tensor:
    """Sorted kept positions (int64) of ``numel`` entries in the smallest code for their count."""
    kind = encoding(numel, positions.numel())
    if kind == "bitmask":
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[positions] = True
        return pack_bits(mask)
    if kind == "elias_fano":
        return _elias_fano(positions.numpy().astype(np.int64), numel)
    return positions.to(index_dtype(numel))


def decode_positions(packed: torch.Tensor, numel: int, kept: int) -> torch.Tensor:
    """Invert :func:`encode_positions`: the ``kept`` positions, sorted, as int64."""
    kind = encoding(numel, kept)
    if kind == "bitmask":
        return torch.nonzero(unpack_bits(packed, numel)).reshape(-1)
    if kind == "elias_fano":
        return _elias_fano_decode(packed, numel, kept)
    return packed.to(torch.int64)


def entries_of(stored: list[tuple[str, torch.Tensor]]) -> list[Entry]:
    return [(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in stored]


def payload_bytes(entries: list[Entry]) -> int:
    return sum(tensor_nbytes(dtype, shape) for _, dtype, shape in entries)
