"""Stream layout helpers: from text token ids to the KSA stream (summary tokens inserted, RoPE positions,
packed-sequence boundaries) and back. The layout comes from the C++ core (ksa::build_stream, Layout,
rope_position: the engine's rule), not from a re-derivation here.

    st = build_stream(text_ids, chunk_size=8, S=1, cu_seqlens=doc_bounds)   # packed documents, text order
    h = embed(st.input_ids)                                              # [L, d] stream
    ... attention_varlen(q, k, v, st.cu_seqlens, st.max_seqlen, 8, 1, W) ...
    logits = lm_head(stream_to_text(h, st))                              # [T, vocab] text rows only
"""
from typing import NamedTuple, Optional

import torch

from . import _C

DEFAULT_SUMMARY_TOKEN_BEGIN = 151936  # the released models' summary_token_begin


class Stream(NamedTuple):
    input_ids: Optional[torch.Tensor]  # [L] (or [B, L]) stream token ids; None from stream_layout
    position_ids: torch.Tensor  # [L] (or [B, L]) RoPE positions (docs/ksa.md: Positions), int64
    is_summary: torch.Tensor  # [L] bool
    text_rows: torch.Tensor  # [T] the stream row of every text token, in text order (int64)
    cu_seqlens: torch.Tensor  # [n + 1] int32 stream boundaries (attention_varlen's cu_seqlens)
    max_seqlen: int  # the longest stream


def _lengths(x):
    if isinstance(x, int):
        return [x]
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    return [int(t) for t in x]


def _from_dict(d, device, input_ids=None):
    def mv(t):
        return t.to(device) if device is not None else t
    return Stream(input_ids=input_ids, position_ids=mv(d["position_ids"]), is_summary=mv(d["is_summary"]),
                  text_rows=mv(d["text_rows"]), cu_seqlens=mv(d["cu_seqlens"].to(torch.int32)),
                  max_seqlen=int(d["max_seqlen"]))


def stream_layout(text_lengths, chunk_size, S, summarize_tail=False, text_positions="origin",
                  summary_positions="last_chunk_slice_right", device=None):
    """The packed streams of texts of the given lengths (an int, a list, or a 1-D tensor of lengths), back to
    back: positions, summary flags, the stream row of each text token and cu_seqlens (input_ids is None)."""
    d = _C.stream_layout(_lengths(text_lengths), int(chunk_size), int(S), bool(summarize_tail), str(text_positions),
                         str(summary_positions), DEFAULT_SUMMARY_TOKEN_BEGIN, None)
    return _from_dict(d, device)


def build_stream(text_ids, chunk_size, S, cu_seqlens=None, summary_token_begin=DEFAULT_SUMMARY_TOKEN_BEGIN,
                 summarize_tail=False, text_positions="origin", summary_positions="last_chunk_slice_right"):
    """The stream of text token ids: summary ids summary_token_begin + j inserted after every chunk_size text
    tokens (and after a partial tail with summarize_tail), with RoPE positions.

    text_ids [T]: one text, or several packed back to back with cu_seqlens ([n + 1] text boundaries, as
    FlashAttention's); the result's cu_seqlens are the stream boundaries for attention_varlen.
    text_ids [B, T]: B texts of one length; input_ids and position_ids are [B, L], the rest per row.
    The results live on text_ids' device; input_ids has its dtype.
    """
    ids = torch.as_tensor(text_ids)
    if ids.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError("ksa_torch.build_stream: cu_seqlens is for packed 1-D text_ids, not [B, T]")
        B, T = ids.shape
        rows = [build_stream(ids[b], chunk_size, S, None, summary_token_begin, summarize_tail, text_positions,
                             summary_positions) for b in range(B)] if B else []
        if not rows:
            st = stream_layout(T, chunk_size, S, summarize_tail, text_positions, summary_positions, ids.device)
            L = int(st.cu_seqlens[-1])
            return st._replace(input_ids=ids.new_empty(0, L), position_ids=st.position_ids.expand(0, L))
        first = rows[0]
        return first._replace(input_ids=torch.stack([r.input_ids for r in rows]),
                              position_ids=first.position_ids.expand(B, -1))
    if ids.dim() != 1:
        raise ValueError(f"ksa_torch.build_stream: text_ids must be [T] or [B, T] (got shape {tuple(ids.shape)})")
    if cu_seqlens is None:
        lengths = [ids.numel()]
    else:
        cu = _lengths(cu_seqlens)
        if not cu or cu[0] != 0 or cu[-1] != ids.numel() or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"ksa_torch.build_stream: cu_seqlens must rise from 0 to len(text_ids) = {ids.numel()}"
                             f" (got {cu[:8]}{'...' if len(cu) > 8 else ''})")
        lengths = [b - a for a, b in zip(cu, cu[1:])]
    d = _C.stream_layout(lengths, int(chunk_size), int(S), bool(summarize_tail), str(text_positions),
                         str(summary_positions), int(summary_token_begin), ids.detach().cpu())
    return _from_dict(d, ids.device, d["input_ids"].to(device=ids.device, dtype=ids.dtype))


def stream_to_text(x, stream, dim=0):
    """The text rows of a stream tensor (e.g. hidden states before the LM head): x.index_select(dim,
    text_rows). Differentiable."""
    return x.index_select(dim, stream.text_rows.to(x.device))


def text_to_stream(x, stream, dim=0, fill=0):
    """A text tensor placed at its stream rows; summary rows hold `fill`. Differentiable in x."""
    shape = list(x.shape)
    shape[dim] = int(stream.cu_seqlens[-1])
    return x.new_full(shape, fill).index_copy(dim, stream.text_rows.to(x.device), x)
