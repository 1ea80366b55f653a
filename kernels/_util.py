"""Shared helpers for the kernels package: argument validation and backend choice.

Kept free of a triton import; the kernel modules get triton (guarded: missing or broken is fine)
from kernels/_triton.py.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

_BACKENDS = ("triton", "ref")


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def pick_backend(backend: Optional[str], device: torch.device, has_triton: bool, name: str) -> str:
    """Resolve a wrapper's `backend` argument.

    None (auto): the Triton kernel for CUDA tensors, the torch reference otherwise (CPU engine
    runs stay fast even when TRITON_INTERPRET=1 is set for the whole test process).
    "triton": force the Triton kernel; on CPU tensors this needs TRITON_INTERPRET=1.
    "ref": force the torch reference.
    """
    if backend is None:
        return "triton" if (device.type == "cuda" and has_triton) else "ref"
    if backend not in _BACKENDS:
        raise ValueError(f"{name}: backend must be one of {_BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        if not has_triton:
            raise ValueError(f"{name}: backend='triton' but triton could not be imported")
        if device.type != "cuda" and not interpret_mode():
            raise ValueError(
                f"{name}: backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 "
                "set before triton is imported"
            )
    return backend


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_tensor(
    fn: str,
    name: str,
    t,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    contiguous: bool = False,
    last_dim_contiguous: bool = False,
) -> None:
    """Raise a one-line ValueError naming `name` if `t` does not fit the description."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                raise ValueError(
                    f"{fn}: {name} has shape {tuple(t.shape)}, expected dim {i} == {want} "
                    f"(expected {tuple('*' if s is None else s for s in shape)})"
                )
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{fn}: {name} has dtype {str(t.dtype).replace('torch.', '')}, expected one of {names}")
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device} (same device as the other inputs)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{fn}: {name} must have a contiguous last dim (strides {t.stride()})")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)


def cdiv(a: int, b: int) -> int:
    """Ceil division on the host (triton.cdiv can go through the JIT's call path: ~20 us a call)."""
    return -(-a // b)


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots exact ("ieee") so float32 tests hold 1e-5; low precision dots ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


_TMA: dict = {}


def tma_available(device: torch.device) -> bool:
    """Host-side TMA descriptors usable here: a CUDA device of compute capability >= 9 and a triton
    that has triton.tools.tensor_descriptor."""
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _TMA:
        ok = torch.cuda.get_device_capability(idx)[0] >= 9
        if ok:
            try:
                from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
            except Exception:  # noqa: BLE001
                ok = False
        _TMA[idx] = ok
    return _TMA[idx]


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
