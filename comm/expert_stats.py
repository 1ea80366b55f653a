"""Expert activation statistics: record on the device, dump as JSON lines, load for the planner.

The engine calls ``recorder.record(layer, topk_ids_TK, dest_TK)`` once per MoE layer per
micro-batch (layer = MoE-layer index, as everywhere in comm/). Counts -- tokens too -- accumulate
in preallocated device tensors with scatter_add: no host sync, so recording runs inside captured
CUDA graphs; ids of -1 (padding rows, slots routed nowhere) are not counted. The host reads the
counters only when it dumps them (every ``balancer.stats_every`` steps and at the end of a run).
``dump(path)`` appends one JSON line per layer::

    {"layer": 0, "expert_counts": [E ints], "rank_counts": [n ints], "tokens": T}

and resets the counters, so the lines of several dumps (or several ranks) simply add up:
``load_stats(path)`` sums them per layer into counts_LE for :func:`comm.placement.plan_placement`.
``expert_counts`` counts (token, k) pairs per logical expert; ``rank_counts`` counts (token, k)
pairs per expert rank (expert index) as assigned by the balancer; ``tokens`` counts tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from comm.errors import ConfigError


class ExpertStatsRecorder:
    """Per-layer token counts per logical expert [L, E] and per expert rank [L, n], on the device."""

    def __init__(self, num_layers: int, num_experts: int, num_expert_ranks: int, device="cpu"):
        self.num_layers, self.num_experts, self.num_expert_ranks = num_layers, num_experts, num_expert_ranks
        self.device = torch.device(device)
        # one extra column each: where the ids of -1 are counted, then dropped
        self._experts = torch.zeros((num_layers, num_experts + 1), dtype=torch.int64, device=self.device)
        self._ranks = torch.zeros((num_layers, num_expert_ranks + 1), dtype=torch.int64, device=self.device)
        self._tokens = torch.zeros(num_layers, dtype=torch.int64, device=self.device)

    @property
    def expert_counts_LE(self) -> torch.Tensor:
        return self._experts[:, :self.num_experts]

    @property
    def rank_counts_LR(self) -> torch.Tensor:
        return self._ranks[:, :self.num_expert_ranks]

    @property
    def tokens_L(self) -> torch.Tensor:
        return self._tokens

    def record(self, layer: int, topk_ids_TK: torch.Tensor, dest_TK: torch.Tensor | None = None) -> None:
        ids = topk_ids_TK.reshape(-1).long()
        ones = torch.ones_like(ids)
        self._experts[layer].scatter_add_(0, torch.where(ids < 0, self.num_experts, ids), ones)
        if dest_TK is not None:
            dest = dest_TK.reshape(-1).long()
            self._ranks[layer].scatter_add_(0, torch.where(dest < 0, self.num_expert_ranks, dest), ones)
        self._tokens[layer] += (topk_ids_TK >= 0).any(-1).sum() if topk_ids_TK.numel() else 0

    def reset(self) -> None:
        self._experts.zero_()
        self._ranks.zero_()
        self._tokens.zero_()

    def all_reduce(self, group) -> None:
        """Sum the counters over a process group (the attention ranks), in place."""
        import torch.distributed as dist

        for t in (self._experts, self._ranks, self._tokens):
            dist.all_reduce(t, group=group)

    def dump(self, path: str | os.PathLike, reset: bool = True) -> None:
        """Append one JSON line per layer that saw tokens since the last dump; then reset."""
        experts = self.expert_counts_LE.cpu().tolist()
        ranks = self.rank_counts_LR.cpu().tolist()
        tokens = self._tokens.cpu().tolist()
        lines = [json.dumps({"layer": l, "expert_counts": experts[l], "rank_counts": ranks[l],
                             "tokens": tokens[l]}, separators=(",", ":"))
                 for l in range(self.num_layers) if tokens[l] or any(experts[l])]
        if lines:
            with open(path, "a") as f:
                f.write("\n".join(lines) + "\n")
        if reset:
            self.reset()


def load_stats(path: str | os.PathLike, num_layers: int | None = None,
               num_experts: int | None = None) -> torch.Tensor:
    """Sum the JSON lines of `path` per layer into counts_LE (int64, CPU).

    L = `num_layers` if given (layers beyond it are an error; unseen layers are zeros), else the
    largest layer seen + 1. Every line must have the same number of experts (= `num_experts` if given).
    """
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read expert statistics ({e.strerror})") from None
    rows: dict[int, list[int]] = {}
    E = num_experts
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            layer, counts = rec["layer"], rec["expert_counts"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{where}:{i}: not an expert-statistics line ({e}); expected "
                              '{"layer": l, "expert_counts": [...], ...}') from None
        if not isinstance(layer, int) or layer < 0 or (num_layers is not None and layer >= num_layers):
            raise ConfigError(f"{where}:{i}: layer {layer!r} out of range"
                              + (f" (the model has {num_layers} MoE layers)" if num_layers is not None else ""))
        if not isinstance(counts, list) or not all(isinstance(c, (int, float)) and c >= 0 for c in counts):
            raise ConfigError(f"{where}:{i}: layer {layer}: expert_counts must be a list of non-negative numbers")
        if E is None:
            E = len(counts)
        if len(counts) != E:
            raise ConfigError(f"{where}:{i}: layer {layer}: {len(counts)} expert counts, expected {E}")
        acc = rows.setdefault(layer, [0] * E)
        for e, c in enumerate(counts):
            acc[e] += int(c)
    if not rows:
        raise ConfigError(f"{where}: no expert statistics in the file")
    L = num_layers if num_layers is not None else max(rows) + 1
    out = torch.zeros((L, E), dtype=torch.int64)
    for l, acc in rows.items():
        out[l] = torch.tensor(acc, dtype=torch.int64)
    return out
