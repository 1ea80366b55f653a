"""Per-device tuning tables: tile / split configs measured by kernels/tune.py, looked up by shape.

A table is one JSON file per device (kernels/tuning/<device slug>.json, written by `kernels/tune.py`
on that device and committed), shaped like::

    {"device": "NVIDIA H200", "meta": {"date": ..., "commit": ..., "triton": ..., "torch": ...},
     "tables": {"paged_decode_attention": [{"key": {...}, "config": {...}, "time_us": ...}, ...], ...}}

`lookup(kernel, device, exact, near)` returns the config of the entry whose key equals `exact` on
those fields and is nearest to `near` (distance = sum of |log2 ratio| over the near fields), or None
when the device has no table or no entry matches `exact`: the wrappers then use their heuristics.
A config only changes speed, never results, so a near-but-not-equal entry is safe to use.

The environment variable AFSPLIT_KERNEL_TUNING names one more table file that takes precedence
(the GPU script benchmarks the table it has just measured this way before it is committed), or
"off" to ignore every table (heuristics only).
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Optional

import torch

ENV = "AFSPLIT_KERNEL_TUNING"
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning")

_tables: Optional[dict] = None  # device name -> {kernel: [entries]}
_cache: dict = {}
_names: dict = {}
generation = 0  # bumped by reset(): callers that cache what lookup() gave them key on it


def device_slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _read(path: str, into: dict) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    dev = data.get("device")
    if not isinstance(dev, str):
        return
    tabs = into.setdefault(dev, {})
    for kernel, entries in (data.get("tables") or {}).items():
        good = [e for e in entries if isinstance(e.get("key"), dict) and isinstance(e.get("config"), dict)]
        tabs[kernel] = good  # a later file replaces a kernel's table wholesale


def tables() -> dict:
    """All tables, read once per process (shipped files first, then AFSPLIT_KERNEL_TUNING)."""
    global _tables
    if _tables is None:
        found: dict = {}
        env = os.environ.get(ENV, "")
        if env != "off":
            for path in sorted(glob.glob(os.path.join(TABLE_DIR, "*.json"))):
                try:
                    _read(path, found)
                except (OSError, ValueError):
                    continue  # a broken table costs speed, never correctness
            if env:
                try:
                    _read(env, found)
                except (OSError, ValueError):
                    pass
        _tables = found
    return _tables


def reset() -> None:
    """Forget what was read (tests, and tune.py after it rewrites a table)."""
    global _tables, generation
    _tables = None
    _cache.clear()
    generation += 1


def device_name(dev: torch.device) -> Optional[str]:
    if dev.type != "cuda":
        return None
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _names:
        _names[idx] = torch.cuda.get_device_name(idx)
    return _names[idx]


def _distance(key: dict, near: dict) -> float:
    d = 0.0
    for f, v in near.items():
        k = key.get(f)
        if k is None:
            return math.inf
        d += abs(math.log2(max(float(k), 1.0)) - math.log2(max(float(v), 1.0)))
    return d


def lookup(kernel: str, device: Optional[str], exact: dict, near: dict) -> Optional[dict]:
    """(config, matched key) of the nearest entry, or None. Cached per distinct query."""
    if device is None:
        return None
    q = (kernel, device, tuple(sorted(exact.items())), tuple(sorted(near.items())))
    if q not in _cache:
        best, best_d = None, math.inf
        for e in tables().get(device, {}).get(kernel, ()):
            key = e["key"]
            if any(key.get(f) != v for f, v in exact.items()):
                continue
            d = _distance(key, near)
            if d < best_d:
                best, best_d = e, d
        _cache[q] = best
    e = _cache[q]
    if e is None:
        return None
    # copies (one level deeper for nested per-kernel overrides), so callers may edit them
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in e["config"].items()}, dict(e["key"])


__all__ = ["ENV", "TABLE_DIR", "device_name", "device_slug", "lookup", "reset", "tables"]
