"""MLA prefill (expanded form): causal varlen attention whose keys are per-head nope parts plus one
rotary part shared by every head, and whose values have their own head size.

For a prompt chunk the latent context (cached prefix + chunk) is expanded once per step with
kv_b_proj into per-head k_nope [Nk, Hq, DN] and v [Nk, Hq, DV]; the rotary key k_pe [Nk, DR] is
the same for all heads and is read as is (never repeated per head):

    score[i, h, j] = scale * (q[i, h, :DN] . k_nope[j, h] + q[i, h, DN:] . k_pe[j])

Sequence b has Lq = cu_q[b+1] - cu_q[b] queries and Lk = cu_k[b+1] - cu_k[b] >= Lq keys (its
whole context); query i sits at position Lk - Lq + i and sees keys 0..Lk - Lq + i (causal,
bottom-right aligned). Decode uses the absorbed form instead (kernels/mla_decode.py), which is
cheaper when few queries share a context.

Grid (q-blocks, Hq, B); heaviest q-blocks first; online softmax in fp32 with the scale folded
into exp2; keys left of the diagonal block run without masks.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton import HAS_TRITON, tl, triton
from ._util import (FLOAT_DTYPES, INT_DTYPES, check, check_tensor, dot_precision, interpret_mode, next_pow2,
                    pick_backend)

__all__ = ["mla_prefill", "mla_prefill_ref"]

_LOG2E = 1.4426950408889634

if HAS_TRITON:
    from .flash_attention import _update  # the online-softmax step (masked: rows may see no key yet)

    @triton.jit
    def _mla_tile(q_nope, q_pe, kn_ptr, kp_ptr, v_ptr, rows, kmask, h, s_knt, s_knh, s_kpt, s_vt, s_vh,
                  offs_dn, offs_dr, offs_dv, DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
                  DOT_PREC: tl.constexpr):
        """Scores [BLOCK_M, BLOCK_N] (unscaled) and the value tile of key rows `rows`."""
        k_nope = tl.load(kn_ptr + rows[:, None] * s_knt + h * s_knh + offs_dn[None, :],
                         mask=kmask[:, None] & (offs_dn[None, :] < DN), other=0.0)
        k_pe = tl.load(kp_ptr + rows[:, None] * s_kpt + offs_dr[None, :],
                       mask=kmask[:, None] & (offs_dr[None, :] < DR), other=0.0)
        v = tl.load(v_ptr + rows[:, None] * s_vt + h * s_vh + offs_dv[None, :],
                    mask=kmask[:, None] & (offs_dv[None, :] < DV), other=0.0)
        s = tl.dot(q_nope, tl.trans(k_nope), input_precision=DOT_PREC)
        s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=DOT_PREC)
        return s, v

    @triton.jit
    def _mla_prefill_kernel(
        q_ptr, kn_ptr, kp_ptr, v_ptr, o_ptr, cuq_ptr, cuk_ptr, qk_scale,
        s_qt, s_qh, s_knt, s_knh, s_kpt, s_vt, s_vh, s_ot, s_oh,
        DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
        BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        q_start = tl.load(cuq_ptr + b)
        Lq = tl.load(cuq_ptr + b + 1) - q_start
        k_start = tl.load(cuk_ptr + b)
        Lk = tl.load(cuk_ptr + b + 1) - k_start
        n_mblocks = tl.cdiv(Lq, BLOCK_M)
        if pid >= n_mblocks:
            return
        m0 = (n_mblocks - 1 - pid) * BLOCK_M
        P = Lk - Lq  # keys before this chunk

        offs_m = m0 + tl.arange(0, BLOCK_M)
        mmask = offs_m < Lq
        offs_dn = tl.arange(0, BLOCK_DN)
        offs_dr = tl.arange(0, BLOCK_DR)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_nb = tl.arange(0, BLOCK_N)
        q_rows = (q_start + offs_m).to(tl.int64)
        q_base = q_ptr + q_rows[:, None] * s_qt + h * s_qh
        q_nope = tl.load(q_base + offs_dn[None, :], mask=mmask[:, None] & (offs_dn[None, :] < DN), other=0.0)
        q_pe = tl.load(q_base + DN + offs_dr[None, :], mask=mmask[:, None] & (offs_dr[None, :] < DR), other=0.0)
        qpos = P + offs_m

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        # keys every query of the block sees: full blocks without masks
        full = ((P + m0) // BLOCK_N) * BLOCK_N
        for n0 in range(0, full, BLOCK_N):
            rows = (k_start + n0 + offs_nb).to(tl.int64)
            s, v = _mla_tile(q_nope, q_pe, kn_ptr, kp_ptr, v_ptr, rows, offs_nb >= 0, h, s_knt, s_knh, s_kpt,
                             s_vt, s_vh, offs_dn, offs_dr, offs_dv, DN, DR, DV, DOT_PREC)
            acc, l_i, m_i = _update(acc, l_i, m_i, s * qk_scale, v, 1.0, False, DOT_PREC)  # s is scaled
        # the rest, up to the block's last query: causal mask
        hi = tl.minimum(P + m0 + BLOCK_M, Lk)
        for n0 in range(full, hi, BLOCK_N):
            offs_n = n0 + offs_nb
            kmask = offs_n < hi
            rows = (k_start + offs_n).to(tl.int64)
            s, v = _mla_tile(q_nope, q_pe, kn_ptr, kp_ptr, v_ptr, rows, kmask, h, s_knt, s_knh, s_kpt,
                             s_vt, s_vh, offs_dn, offs_dr, offs_dv, DN, DR, DV, DOT_PREC)
            valid = kmask[None, :] & (offs_n[None, :] <= qpos[:, None])
            s = tl.where(valid, s * qk_scale, float("-inf"))
            acc, l_i, m_i = _update(acc, l_i, m_i, s, v, 1.0, True, DOT_PREC)  # s is scaled

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l == 0 only on padded rows (not stored)
        tl.store(o_ptr + q_rows[:, None] * s_ot + h * s_oh + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=mmask[:, None] & (offs_dv[None, :] < DV))


def mla_prefill_ref(q, k_nope, k_pe, v, cu_seqlens_q, cu_seqlens_k, scale):
    """Plain-torch reference (any device): per sequence, scores from both key parts, causal softmax."""
    T, HQ, _ = q.shape
    DN = k_nope.shape[-1]
    out = torch.empty((T, HQ, v.shape[-1]), dtype=q.dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:
            continue
        qb = q[q0:q1].float()
        s = torch.einsum("qhd,khd->hqk", qb[..., :DN], k_nope[k0:k1].float())
        s = s + torch.einsum("qhd,kd->hqk", qb[..., DN:], k_pe[k0:k1].float())
        qpos = torch.arange(q1 - q0, device=q.device)[:, None] + (k1 - k0) - (q1 - q0)
        allowed = torch.arange(k1 - k0, device=q.device)[None, :] <= qpos
        p = torch.softmax((s * scale).masked_fill(~allowed[None], float("-inf")), dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, v[k0:k1].float()).to(q.dtype)
    return out


def _config(dev: torch.device, dtype: torch.dtype, DV: int) -> dict:
    if interpret_mode() and dev.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)


def mla_prefill(q, k_nope, k_pe, v, cu_seqlens_q, cu_seqlens_k, scale: float, *, max_seqlen_q: Optional[int] = None,
                backend: Optional[str] = None, config: Optional[dict] = None):
    """q `[T, Hq, DN + DR]`, k_nope `[Nk, Hq, DN]`, k_pe `[Nk, DR]`, v `[Nk, Hq, DV]` (strided views
    allowed, last dim contiguous), cu_seqlens_q / cu_seqlens_k int32 `[B+1]` (every Lk >= Lq)
    -> out `[T, Hq, DV]` in q.dtype.

    max_seqlen_q: host-side bound on chunk lengths (default: one host sync to compute it).
    config: override tiles (keys BLOCK_M, BLOCK_N, num_warps, num_stages).
    """
    fn = "mla_prefill"
    check_tensor(fn, "q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    T, HQ, DQK = q.shape
    dev = q.device
    check_tensor(fn, "k_nope", k_nope, ndim=3, shape=(None, HQ, None), dtypes=(q.dtype,), device=dev,
                 last_dim_contiguous=True)
    Nk, _, DN = k_nope.shape
    check(1 <= DN < DQK, f"{fn}: k_nope head size {DN} must be smaller than q's {DQK} (nope + rope)")
    check_tensor(fn, "k_pe", k_pe, ndim=2, shape=(Nk, DQK - DN), dtypes=(q.dtype,), device=dev,
                 last_dim_contiguous=True)
    check_tensor(fn, "v", v, ndim=3, shape=(Nk, HQ, None), dtypes=(q.dtype,), device=dev, last_dim_contiguous=True)
    check_tensor(fn, "cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INT_DTYPES, device=dev, contiguous=True)
    B = cu_seqlens_q.shape[0] - 1
    check(B >= 0, f"{fn}: cu_seqlens_q must have B+1 >= 1 entries")
    check_tensor(fn, "cu_seqlens_k", cu_seqlens_k, ndim=1, shape=(B + 1,), dtypes=INT_DTYPES, device=dev,
                 contiguous=True)
    be = pick_backend(backend, dev, HAS_TRITON, fn)
    if be == "ref":
        return mla_prefill_ref(q, k_nope, k_pe, v, cu_seqlens_q, cu_seqlens_k, scale)
    DV = v.shape[-1]
    out = torch.empty((T, HQ, DV), dtype=q.dtype, device=dev)
    if T == 0 or B == 0:
        return out
    cfg = dict(_config(dev, q.dtype, DV))
    if config:
        cfg.update(config)
    BLOCK_M, BLOCK_N = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    _mla_prefill_kernel[(triton.cdiv(max(max_seqlen_q, 1), BLOCK_M), HQ, B)](
        q, k_nope, k_pe, v, out, cu_seqlens_q, cu_seqlens_k, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), k_nope.stride(0), k_nope.stride(1), k_pe.stride(0), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        DN=DN, DR=DQK - DN, DV=DV, BLOCK_DN=next_pow2(DN, 16), BLOCK_DR=next_pow2(DQK - DN, 16),
        BLOCK_DV=next_pow2(DV, 16), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PREC=dot_precision(q.dtype), **cfg,
    )
    return out
