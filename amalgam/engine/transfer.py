"""Inputs to a CUDA device ahead of their merge, results back to the host.

A merge on a GPU is bound by its transfers: the device computes a tensor's merge far faster
than PCIe brings its inputs. So the read threads that read tensors ahead (``execute.prefetched``,
``execute.read_ahead``) also send them: each input is copied into pinned (page-locked) host
memory, then to the device asynchronously on a copy stream of its own, while the merge thread's
kernels for earlier tensors run on the compute stream. The merge thread waits for a tensor's
copy only when it uses the tensor (an event, on the device, not on the host). Results come back
into pinned host memory, which the writer thread writes from.

Pinned blocks come from torch's caching host allocator: a block is reused only once the copy
that read it has finished, and stays cached for the process (its size is that of the inputs in
flight, bounded by the read-ahead budget). ``AMALGAM_CUDA_OVERLAP=0`` keeps the synchronous
copies on the merge thread (the path of earlier releases), for comparisons; the bytes merged are
the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Shipment:
    """Tensors on their way to the device: usable on the compute stream once ``done``."""

    tensors: list[torch.Tensor | None]
    done: torch.cuda.Event


class DeviceFeed:
    """Sends tensors to one CUDA device on a copy stream (:meth:`send`, on any thread) and
    hands them to the merge thread's stream (:meth:`receive`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def send(self, tensors: Sequence[torch.Tensor | None]) -> Shipment:
        """Start copying ``tensors`` (host tensors, or None kept as None) to the device."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            sent = [
                None if t is None else t.pin_memory().to(self.device, non_blocking=True)
                for t in tensors
            ]
            done = torch.cuda.Event()
            done.record(self.stream)
        return Shipment(sent, done)

    def receive(self, shipment: Shipment) -> list[torch.Tensor | None]:
        """The shipment's device tensors, ordered after their copies on the caller's current
        stream (and kept from reuse until that stream's work on them is done)."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(shipment.done)
        for t in shipment.tensors:
            if t is not None:
                t.record_stream(stream)
        return shipment.tensors


def device_feed(device: torch.device) -> DeviceFeed | None:
    """A feed for ``device`` when it is a CUDA device and copies overlap
    (``AMALGAM_CUDA_OVERLAP`` is not ``0``); None where tensors are used where they are read."""
    overlap = os.environ.get("AMALGAM_CUDA_OVERLAP", "1") != "0"
    return DeviceFeed(device) if device.type == "cuda" and overlap else None


def to_host(t: torch.Tensor, feed: DeviceFeed | None) -> torch.Tensor:
    """``t`` on the host: with a ``feed``, a device tensor is copied into pinned memory (at the
    bus's full speed, where pageable memory takes a bounce buffer); a host tensor as it is."""
    if feed is None or t.device.type != "cuda":
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host
