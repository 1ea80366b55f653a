"""How many ping-pong micro-batches a step uses: the one home of the `runtime.micro_batches` rule.

A fixed integer is used as given. ``auto`` is decided by measurement, because the step's time
split cannot be seen from the host once decode steps replay as CUDA graphs: the coordinator runs
each candidate m for a few decode-only steps (the first steps of a new shape compile and capture,
so they are not counted), then keeps the m with the shortest median decode step (ties: fewer
micro-batches) and logs the measurements. The single-process engine has nothing to overlap, so
``auto`` means 1 there.
"""

from __future__ import annotations

import statistics

MAX_MICRO_BATCHES = 4
WARM_STEPS = 2  # decode steps of a candidate not measured (eager warm-up, then graph capture)
MEASURED_STEPS = 3


def fixed_micro_batches(setting: str, distributed: bool) -> int | None:
    """m for `runtime.micro_batches` when it is fixed; None when the runtime must tune it (auto)."""
    if setting != "auto":
        return int(setting)
    return None if distributed else 1


class MicroBatchTuner:
    """Chooses m for `micro_batches: auto` from measured decode step times (module docstring)."""

    def __init__(self, candidates: tuple[int, ...] = tuple(range(1, MAX_MICRO_BATCHES + 1))):
        self.candidates = candidates
        self.times: dict[int, list[float]] = {m: [] for m in candidates}
        self.seen: dict[int, int] = {m: 0 for m in candidates}
        self.chosen: int | None = None
        self._i = 0

    @property
    def current(self) -> int:
        """m for the next step."""
        return self.chosen if self.chosen is not None else self.candidates[self._i]

    def observe(self, m: int, decode_only: bool, step_s: float) -> str | None:
        """Account one finished step run with m; returns a log line once the choice is made."""
        if self.chosen is not None or not decode_only or m != self.current:
            return None
        self.seen[m] += 1
        if self.seen[m] > WARM_STEPS:
            self.times[m].append(step_s)
        if len(self.times[m]) < MEASURED_STEPS:
            return None
        self._i += 1
        if self._i < len(self.candidates):
            return None
        medians = {c: statistics.median(t) for c, t in self.times.items()}
        self.chosen = min(medians, key=lambda c: (medians[c], c))
        measured = ", ".join(f"m={c}: {1e3 * t:.2f} ms" for c, t in medians.items())
        return f"micro_batches: auto: median decode step {measured} -> m={self.chosen}"
