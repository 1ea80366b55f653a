"""Per-phase wall-clock accounting for the runtime's time split (attention, dispatch, experts, combine, idle).

With `sync` (config `runtime.profile: true`) the device is synchronised at each phase boundary, so
GPU time lands in the phase that queued it; that also serialises streams, so profile runs measure
where time goes, not the best speed. Without it the split shows host-side time only.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimes:
    def __init__(self, device: torch.device, sync: bool = False):
        self.sync = sync and device.type == "cuda"
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        start = self.now()
        try:
            yield
        finally:
            self.seconds[name] += self.now() - start

    def take(self) -> dict[str, float]:
        """The seconds accumulated since the last take, by phase."""
        out = dict(self.seconds)
        self.seconds.clear()
        return out
