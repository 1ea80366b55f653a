"""Per-request sampling parameters: vLLM's names, defaults and validation rules.

Validation happens once, when a request is submitted (:meth:`SamplingParams.validate`, called by
the engine's admission for the Python API, the CLI and the distributed coordinator alike), so a
bad request fails alone with one line naming it. The rules follow vLLM's ``SamplingParams``:
temperature finite and >= 0 (below :data:`GREEDY_BELOW` it samples greedily), top_p in (0, 1],
top_k -1 or 0 (off) or >= 1, max_tokens an integer >= 1, seed an integer, ignore_eos a bool and
every token id an integer in [0, vocab).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from afsplit.errors import RequestError

# vLLM's _SAMPLING_EPS: a positive temperature this small would overflow logits / T (1e-45 gives
# inf and NaN probabilities), and its distribution is the argmax anyway
GREEDY_BELOW = 1e-5


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def token_ids_problem(name: str, ids, vocab_size: int | None) -> str | None:
    """What is wrong with a list of token ids (None if nothing): integers in [0, vocab_size)."""
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        return f"{name} must be a list of integers, got {ids!r}"
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        return f"{name}: token ids must be in {limit}, got {bad[0]}"
    return None


def derive_seed(base_seed: int, index: int) -> int:
    """The sampling seed of a request that gives none: a function of `runtime.seed` and the request's
    index in its input only (never of batch composition, warm-up runs or the layout)."""
    digest = hashlib.blake2b(f"afsplit-seed:{base_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def token_seed(seed: int, position: int) -> int:
    """The generator seed for a request's `position`-th generated token."""
    digest = hashlib.blake2b(f"afsplit-token:{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = all tokens
    seed: int | None = None  # per-request seed: the same seed gives the same tokens
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def problem(self, vocab_size: int | None = None) -> str | None:
        """The first rule this request breaks, as a message (None when valid)."""
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            return f"temperature must be a finite number >= 0, got {t!r}"
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            return f"top_p must be a number in (0, 1], got {self.top_p!r}"
        if not _is_int(self.top_k) or self.top_k < -1:
            return f"top_k must be an integer: -1 or 0 (all tokens) or >= 1, got {self.top_k!r}"
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            return f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"
        if self.seed is not None and not _is_int(self.seed):
            return f"seed must be an integer or null, got {self.seed!r}"
        if not isinstance(self.ignore_eos, bool):
            return f"ignore_eos must be true or false, got {self.ignore_eos!r}"
        return token_ids_problem("stop_token_ids", self.stop_token_ids, vocab_size)

    def validate(self, where: str = "request", vocab_size: int | None = None) -> None:
        """Raise RequestError("{where}: ...") naming the first broken rule."""
        problem = self.problem(vocab_size)
        if problem:
            raise RequestError(f"{where}: {problem}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
