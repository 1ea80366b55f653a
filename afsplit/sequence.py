"""A request as the scheduler sees it: tokens, progress and KV blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from afsplit.sampling_params import SamplingParams


@dataclass
class SeqUpdate:
    """What one engine step produced for one request: the unit of streaming.

    `finish_reason` is set ("stop", "length", "abort", "error") when the request finished in this step;
    `time` is when the tokens became visible to the caller (time.time()).
    """

    request_id: int
    new_token_ids: list[int]
    finish_reason: str | None = None
    time: float = 0.0


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # resolved sampling seed (the request's, or one derived from the engine seed)
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0
    prompt_text: str | None = None
    arrival_time: float = 0.0  # time.time() when the request entered (coordinator)
    token_times: list[float] = field(default_factory=list)  # time.time() at each generated token
    error: str | None = None  # why it failed (finish_reason "error": e.g. its attention rank died)

    def latency_metrics(self) -> dict:
        """vLLM's per-request metrics, in milliseconds."""
        t = self.token_times
        itl = [1e3 * (b - a) for a, b in zip(t, t[1:])]
        return {"ttft_ms": 1e3 * (t[0] - self.arrival_time) if t else None,
                "tpot_ms": 1e3 * (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None,
                "itl_ms": itl, "e2el_ms": 1e3 * (t[-1] - self.arrival_time) if t else None,
                "prompt_tokens": len(self.prompt_token_ids), "output_tokens": len(self.output_token_ids)}

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens
