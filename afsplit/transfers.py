"""Copies between host and device that never wait for the GPU's queue.

A plain ``torch.tensor(values, device="cuda")`` or ``.to("cuda")`` from pageable memory synchronises the
stream (PyTorch's blocking copy ends in a stream sync), so a small index built on the host after a step was
launched waits for that step to finish: with async scheduling (afsplit/step_ahead.py) that one wait would
undo the overlap. These go through pinned memory with non-blocking copies instead.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (nested list, or CPU tensor) as a tensor on `device`, queued behind the work already launched:
    on CUDA through pinned memory (PyTorch's caching host allocator keeps it until the copy has run)."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor's copy to host memory, started now and waited for only when read: on CUDA into pinned
    memory without blocking, with an event, so the wait covers the work queued before the copy and not a
    step launched after it. On the CPU a plain copy."""

    def __init__(self, t: torch.Tensor):
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = t.clone(), None

    def get(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host
