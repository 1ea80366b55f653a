"""Triton, imported once for every kernel module: `HAS_TRITON` is False (and `triton`/`tl` None) where it is
missing or broken, so the torch references keep working."""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton missing or broken
    triton = tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "tl", "triton"]
