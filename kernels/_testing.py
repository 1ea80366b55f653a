"""Test helpers shared by tests/test_kernels.py (CPU, interpreter) and tests/test_kernels_gpu.py:
straightforward float64 computations (loops, no tricks), random input builders, output poisoning.
Not imported by the package itself.
"""

from __future__ import annotations

import contextlib
import math

import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; NaN/inf anywhere in out gives inf."""
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    if not torch.isfinite(o).all():
        return float("inf")
    den = r.norm().item()
    return (o - r).norm().item() / (den if den > 0 else 1.0)


@contextlib.contextmanager
def poisoned_alloc():
    """Within the block, torch.empty / empty_like return NaN-filled float tensors (ints filled
    with a large negative sentinel), so any output element a kernel forgets to write shows."""
    orig_empty, orig_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64, torch.int16):
            t.fill_(-(2 ** 15) + 7)
        return t

    def empty(*a, **k):
        return fill(orig_empty(*a, **k))

    def empty_like(*a, **k):
        return fill(orig_like(*a, **k))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = orig_empty, orig_like


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, gen=None):
    """Random normal without exact zeros."""
    x = torch.randn(*shape, dtype=torch.float32, generator=gen) * scale
    x = torch.where(x == 0, torch.full_like(x, 1e-3), x)
    return x.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- float64 straightforward versions

def rmsnorm_f64(x, w, eps, residual=None):
    xd = x.double() if residual is None else x.double() + residual.double()
    ms = (xd * xd).mean(-1, keepdim=True)
    return w.double() * xd / torch.sqrt(ms + eps), xd


def rotary_f64(x, positions, head_dim, base):
    T, Hn, D = x.shape
    half = D // 2
    out = torch.empty(x.shape, dtype=torch.float64)
    xd = x.double().cpu()
    for t in range(T):
        p = int(positions[t])
        for i in range(half):
            ang = p * (base ** (-(2 * i) / D))
            c, s = math.cos(ang), math.sin(ang)
            out[t, :, i] = xd[t, :, i] * c - xd[t, :, i + half] * s
            out[t, :, i + half] = xd[t, :, i + half] * c + xd[t, :, i] * s
    return out


def topk_f64(logits, k, renormalize, scoring):
    ld = logits.double().cpu()
    p = torch.softmax(ld, -1) if scoring == "softmax" else torch.sigmoid(ld)
    T, E = p.shape
    ws = torch.empty(T, k, dtype=torch.float64)
    ids = torch.empty(T, k, dtype=torch.int64)
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-p[t, e].item(), e))[:k]
        ids[t] = torch.tensor(order)
        ws[t] = p[t, order]
        if renormalize:
            ws[t] = ws[t] / ws[t].sum()
    return ws, ids


def _attend_f64(q_h, keys, vals):
    """q_h [D], keys/vals [n, D] float64 -> [D]."""
    s = keys @ q_h
    s = s - s.max()
    p = torch.exp(s)
    return (p[:, None] * vals).sum(0) / p.sum()


def paged_token_kv(k_cache, v_cache, block_table_row, pos):
    page = k_cache.shape[1]
    blk = int(block_table_row[pos // page])
    return k_cache[blk, pos % page], v_cache[blk, pos % page]


def decode_f64(q, k_cache, v_cache, block_tables, seq_lens, scale, window=None):
    q, k_cache, v_cache = q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu()
    block_tables, seq_lens = block_tables.cpu(), seq_lens.cpu()
    B, HQ, D = q.shape
    HK = k_cache.shape[2]
    G = HQ // HK
    out = torch.empty(B, HQ, D, dtype=torch.float64)
    for b in range(B):
        L = int(seq_lens[b])
        p = L - 1
        poss = [j for j in range(L) if window is None or j > p - window]
        ks = torch.stack([paged_token_kv(k_cache, v_cache, block_tables[b], j)[0] for j in poss])  # [n, HK, D]
        vs = torch.stack([paged_token_kv(k_cache, v_cache, block_tables[b], j)[1] for j in poss])
        for h in range(HQ):
            out[b, h] = _attend_f64(q[b, h] * scale, ks[:, h // G], vs[:, h // G])
    return out


def prefill_f64(q, k, v, cu, k_cache, v_cache, block_tables, prefix_lens, scale, window=None):
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    cu, prefix_lens = cu.cpu(), prefix_lens.cpu()
    T, HQ, D = q.shape
    HK = k.shape[1]
    G = HQ // HK
    out = torch.empty(T, HQ, D, dtype=torch.float64)
    for b in range(len(cu) - 1):
        s0, s1, P = int(cu[b]), int(cu[b + 1]), int(prefix_lens[b])
        keys, vals = [], []
        for j in range(P):
            kk, vv = paged_token_kv(k_cache.double().cpu(), v_cache.double().cpu(), block_tables[b].cpu(), j)
            keys.append(kk)
            vals.append(vv)
        for j in range(s1 - s0):
            keys.append(k[s0 + j])
            vals.append(v[s0 + j])
        for i in range(s1 - s0):
            p = P + i
            poss = [j for j in range(p + 1) if window is None or j > p - window]
            ks = torch.stack([keys[j] for j in poss])
            vs = torch.stack([vals[j] for j in poss])
            for h in range(HQ):
                out[s0 + i, h] = _attend_f64(q[s0 + i, h] * scale, ks[:, h // G], vs[:, h // G])
    return out


def moe_f64(x, w13, w2, ids, wts):
    x, w13, w2 = x.double().cpu(), w13.double().cpu(), w2.double().cpu()
    ids, wts = ids.cpu(), wts.double().cpu()
    T, H = x.shape
    E, I2, _ = w13.shape
    I = I2 // 2
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for kk in range(ids.shape[1]):
            e = int(ids[t, kk])
            if e < 0 or e >= E:
                continue
            g = w13[e, :I] @ x[t]
            u = w13[e, I:] @ x[t]
            h = g / (1 + torch.exp(-g)) * u
            out[t] += wts[t, kk] * (w2[e] @ h)
    return out


# ---------------------------------------------------------------- input builders

def make_paged_cache(seq_kv_lens, page, HK, D, dtype, device="cpu", gen=None, extra_blocks=3):
    """Random caches with shuffled block tables; unused table entries are -1."""
    B = len(seq_kv_lens)
    need = [max(1, -(-L // page)) for L in seq_kv_lens]
    nb = sum(need) + extra_blocks
    perm = torch.randperm(nb, generator=gen).tolist()
    maxb = max(need) + 1
    bt = torch.full((B, maxb), -1, dtype=torch.int32)
    i = 0
    for b in range(B):
        bt[b, : need[b]] = torch.tensor(perm[i : i + need[b]], dtype=torch.int32)
        i += need[b]
    kc = randn(nb, page, HK, D, dtype=dtype, device=device, gen=gen)
    vc = randn(nb, page, HK, D, dtype=dtype, device=device, gen=gen)
    return kc, vc, bt.to(device)
