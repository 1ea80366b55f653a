"""Source side of the exchange: pack an attention rank's tokens into key regions, sum the partials back.

A token goes to each expert rank j that holds at least one of its top-k slots, once (its row
carries all K slot ids, -1 for slots elsewhere). In the packed buffer, expert rank j's rows start
at ``offset_J[j]``; tokens of j keep their order. Everything is fixed-shape torch on the device:
no host sync, so a CUDA graph captures it (exact-count metadata reads ``counts_J`` afterwards).
"""

from __future__ import annotations

import torch

from comm.layout import RowBuffer


def route_rows(dest_TK: torch.Tensor, offset_J: torch.Tensor, num_ranks: int, scratch: int):
    """(row of each (token, expert rank) pair in the packed buffer [T, J] int64, scratch where the token
    does not go to that rank; hit [T, J] bool; tokens per rank [J])."""
    dest = dest_TK.long()
    match_TJK = dest[:, None, :] == torch.arange(num_ranks, device=dest.device)[None, :, None]
    hit_TJ = match_TJK.any(-1)
    pos_TJ = hit_TJ.cumsum(0) - 1  # the token's place among rank j's tokens
    rows_TJ = torch.where(hit_TJ, offset_J[None, :] + pos_TJ, scratch)
    return rows_TJ, hit_TJ, match_TJK


def pack(buf: RowBuffer, rows_TJ: torch.Tensor, match_TJK: torch.Tensor, x_TD: torch.Tensor,
         slot_TK: torch.Tensor, weight_TK: torch.Tensor, used_rows: int) -> None:
    """Write every (token, rank) pair's row: x, the slots on that rank (-1 elsewhere), their weights.

    Rows [0, used_rows) that receive no token become padding (ids -1, weight 0); pairs that do not
    exist land in the scratch row.
    """
    T, J, K = match_TJK.shape
    D = x_TD.shape[1]
    buf.ids[:used_rows].fill_(-1)
    buf.w[:used_rows].zero_()
    if T == 0:
        return
    flat = rows_TJ.reshape(-1)
    buf.x.index_copy_(0, flat, x_TD.to(buf.x.dtype)[:, None, :].expand(T, J, D).reshape(T * J, D))
    slot = slot_TK.to(torch.int32)[:, None, :].expand(T, J, K)
    buf.ids.index_copy_(0, flat, torch.where(match_TJK, slot, -1).reshape(T * J, K))
    wgt = weight_TK.to(torch.float32)[:, None, :].expand(T, J, K)
    buf.w.index_copy_(0, flat, torch.where(match_TJK, wgt, 0.0).reshape(T * J, K))
    buf.ids[buf.scratch].fill_(-1)  # the scratch row got whatever landed there last


def sum_partials(y: torch.Tensor, rows_TJ: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, D]: per token, the sum over expert ranks of its partial rows of `y` ([rows + 1, D]; rows_TJ
    points at the zero scratch row where the token has no partial), summed in float32."""
    if rows_TJ.shape[1] == 1:
        return y[rows_TJ[:, 0]].to(dtype)
    return y[rows_TJ].float().sum(1).to(dtype)
