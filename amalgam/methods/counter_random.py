"""Counter-based random draws: each entry's value is a pure function of (key, flat index).

The stream of a (recipe seed, tensor name, model index) triple is keyed by a 64-bit
``stream_key``; entry i of a tensor takes one 32-bit half of SplitMix64's output for that key
at counter i // 2 (even i: the low half, odd i: the high half), that is the finaliser
(Stafford's Mix13) of ``key + (i // 2 + 1) * 0x9E3779B97F4A7C15`` mod 2^64. Any block
[start, stop) is drawn on its own with torch integer ops on any device: the bytes are the same
in whatever blocks, threads, executors or devices a tensor is cut into, and the elementwise ops
run on every intra-op thread. One 64-bit hash per two entries costs about what torch's
Mersenne Twister costs per entry on one thread.
"""

from __future__ import annotations

import hashlib

import torch

GOLDEN = 0x9E3779B97F4A7C15
MIX = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None))
LANE_BITS = 31
MASK64 = (1 << 64) - 1


def as_int64(x: int) -> int:
    """An unsigned 64-bit value as the signed int64 of the same bits (torch lacks uint64 math)."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def stream_key(seed: int, tensor: str, model_index: int) -> int:
    """The signed 64-bit key of one model's stream for one tensor (SHA-256 of the triple)."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def splitmix64(key: int, start: int, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """SplitMix64's outputs for counters [start, start + len(out)) of stream ``key``, written
    as int64 bits into ``out`` (``scratch``: an int64 buffer at least as long)."""
    z, shifted = out, scratch[: out.numel()]
    torch.arange(start + 1, start + 1 + z.numel(), out=z)
    z.mul_(as_int64(GOLDEN)).add_(as_int64(key))
    for shift, multiplier in MIX:
        # torch shifts int64 arithmetically: mask off the copied sign bits (a logical shift)
        torch.bitwise_right_shift(z, shift, out=shifted)
        z.bitwise_xor_(shifted.bitwise_and_((1 << (64 - shift)) - 1))
        if multiplier is not None:
            z.mul_(as_int64(multiplier))
    return z


class CounterStream:
    """The draws of one stream, any entry range at a time, on one device.

    Hashes run in place in the output, at most ``WORDS`` 64-bit counters at a time, with one
    scratch buffer the stream keeps: a fresh megabyte-sized temporary per block costs more
    (page faults) than the hashing itself, and this size still splits over torch's intra-op
    threads.
    """

    WORDS = 1 << 16

    def __init__(self, key: int, device: torch.device | str = "cpu"):
        self.key, self.device = key, torch.device(device)
        self._scratch = torch.empty(0, dtype=torch.int64, device=self.device)

    def lanes(self, start: int, stop: int) -> torch.Tensor:
        """Uniform 31-bit integers in [0, 2^31) for entries [start, stop) (int32): the low 31
        bits of each entry's 32-bit half."""
        first, last = start // 2, (stop + 1) // 2  # the words covering [start, stop)
        words = torch.empty(max(last - first, 0), dtype=torch.int64, device=self.device)
        if self._scratch.numel() < min(self.WORDS, words.numel()):
            self._scratch = torch.empty(self.WORDS, dtype=torch.int64, device=self.device)
        for w in range(0, words.numel(), self.WORDS):
            splitmix64(self.key, first + w, words[w : w + self.WORDS], self._scratch)
        halves = words.view(torch.int32)  # little-endian: entry 2j is the low half of word j
        return halves[start % 2 : start % 2 + max(stop - start, 0)].bitwise_and_(
            (1 << LANE_BITS) - 1
        )

    def uniform(self, start: int, stop: int) -> torch.Tensor:
        """Uniform float32 draws in [0, 1) on a 2^-24 grid (torch.rand's resolution) for
        entries [start, stop): an entry's top 24 lane bits times 2^-24, exact in float32."""
        return self.lanes(start, stop).bitwise_right_shift_(LANE_BITS - 24).float().mul_(2**-24)


def lanes(key: int, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``CounterStream(key, device).lanes(start, stop)``."""
    return CounterStream(key, device).lanes(start, stop)


def uniform(key: int, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``CounterStream(key, device).uniform(start, stop)``."""
    return CounterStream(key, device).uniform(start, stop)
