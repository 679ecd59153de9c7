"""Context parallelism for KSA attention: one stream sharded over the ranks of a process group.

Rank r holds the stream rows [a, b) (any boundaries: in a chunk's text, between two summaries of a chunk,
shorter than the window, empty). Before a, its queries see (docs/ksa.md: Who sees whom; c_t and c_l: the
chunks of its first and last text query, c_a: a's chunk):
  - the text of the chunks from cw = max(0, c_t - W) on (the window of the first text query),
  - every row of a's chunk before a (text and, for a summary a, the chunk's earlier summaries),
  - the summaries of the chunks before c_l - W (old for the last text query).
Nothing else: python/tests/test_context_parallel.py checks this set against the core's rule (no gap, no extra
row). The forward receives exactly those K/V rows from the ranks that own them, in one all_to_all_single,
and computes
  A. the KSA kernel on the slice of the stream from chunk c0 = min(cw, c_a) to b (the received rows there, zero
     rows for the few no query sees, the local rows, zero rows completing the last chunk): a valid stream of
     its own (the rule depends on chunk differences only), with q_begin = a - c0 (k + S), so only the local
     queries are computed;
  B. the local text queries against the summaries of the chunks before c0 (the "prefix": every text query of
     the shard sees all of them, no summary query any): dense, in blocks of plain fp32 matrix products;
and merges A and B by their log-sum-exp. The backward runs the kernel's backward on the slice and B's
backward, both with the merged out and lse (so each gives its share of the exact gradient), and returns the
received rows' gradients to their owners with the same all_to_all_single, sizes swapped (an all-to-all is its
own transpose); the owners add them to their rows' own (a row may have gone to several ranks).
"""
import contextlib
import dataclasses
import functools

import torch
import torch.distributed as dist

from . import _C  # noqa: F401  (registers the operators)

_fwd = torch.ops.ksa.attention_fwd
_bwd = torch.ops.ksa.attention_bwd

# Score elements of one block of the prefix attention (B): 2^24 fp32 = 64 MiB per temporary.
PREFIX_BLOCK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (make_plan caches them)
class Plan:
    """What rank `rank` of a sharded stream receives, sends and computes (every rank derives the same plans
    from the shard lengths, so the sizes of the collectives agree without being exchanged)."""
    rank: int
    rows: tuple            # rows per rank, group rank order
    a: int                 # this rank's stream rows [a, b)
    b: int
    h0: int                # the slice starts at stream row h0 = c0 * (k + S) <= a; [h0, a) is the halo
    prefix: int            # received rows before h0: the summaries of the chunks before c0 (part B's keys)
    halo_index: torch.Tensor  # positions in [0, a - h0) of the received halo rows (the other halo rows are
                              # seen by no query of the shard and stay zero)
    pad: int               # zero rows after b that complete the slice [h0, b + pad) to a valid stream
    slice_tail: bool       # summarize_tail of the slice's layout
    text_rows: torch.Tensor   # local indices of the shard's text rows (part B's queries)
    send_rows: torch.Tensor   # local indices of the rows sent, rank after rank
    send_counts: tuple        # rows sent to each rank
    recv_counts: tuple        # rows received from each rank, in stream order (prefix, then halo rows)

    @property
    def halo(self):
        return self.a - self.h0

    @property
    def recv_rows(self):
        return sum(self.recv_counts)


class _Stream:
    """The global stream's row arithmetic (docs/ksa.md: The stream), vectorised over row indices."""

    def __init__(self, chunk_size, S, T, tail):
        self.chunk_size, self.S, self.T, self.tail = chunk_size, S, T, tail
        self.full = T // chunk_size

    def is_summary(self, rows):
        period = self.chunk_size + self.S
        c = rows // period
        n = torch.where(c < self.full, torch.full_like(rows, self.chunk_size),
                        torch.full_like(rows, self.T % self.chunk_size))
        return rows - c * period >= n


class _Needs:
    """The rows before a shard [a, b) that its queries see (docs/ksa.md: Who sees whom, for the shard's first and
    last text chunks c_t, c_l and a's chunk c_a):
      - the text of the chunks from cw = max(0, c_t - W) on (the first text query's window; later ones start later);
      - every row of a's chunk before a (its text for a's chunk's queries, its earlier summaries for a summary a);
      - the summaries of the chunks before c_l - W (old for the last text query; earlier ones see fewer).
    The slice starts at chunk c0 = min(cw, c_a): every summary before it is seen by every text query of the shard
    (they are the `prefix`), and the kernel gets the rows from c0 on, zero where not needed."""

    def __init__(self, st, W, a, b):
        ck = st.chunk_size + st.S
        self.a, self.ck, self.st = a, ck, st
        self.c_a = a // ck
        local = torch.arange(a, b, dtype=torch.int64)
        self.local_summary = st.is_summary(local)
        text = local[~self.local_summary]
        if len(text):
            c_t, c_l = int(text[0]) // ck, int(text[-1]) // ck
            self.cw, self.old = max(0, c_t - W), max(0, c_l - W)
        else:  # summary rows only: their chunk's rows, nothing older
            self.cw, self.old = self.c_a, 0
        self.c0 = min(self.cw, self.c_a)

    def rows(self, lo, hi):
        """The needed rows in [lo, hi), ascending."""
        x = torch.arange(lo, max(lo, min(hi, self.a)), dtype=torch.int64)
        c, summ = x // self.ck, self.st.is_summary(x)
        need = (x >= self.c_a * self.ck) | (~summ & (c >= self.cw)) | (summ & (c < self.old))
        return x[need]


@functools.lru_cache(maxsize=64)
def make_plan(rows, rank, chunk_size, S, W, summarize_tail=False):
    """The Plan of `rank` for shards of `rows` rows (a tuple, in group rank order) of one stream."""
    from . import stream_layout, text_length_of_stream
    chunk_size, S, W, tail = int(chunk_size), int(S), int(W), bool(summarize_tail)
    rows = tuple(int(n) for n in rows)
    if chunk_size < 1 or S < 1 or W < 0 or any(n < 0 for n in rows) or not 0 <= rank < len(rows):
        raise ValueError(f"context_parallel_attention: need chunk_size >= 1, S >= 1, W >= 0, shard lengths >= 0 and a "
                         f"rank among them (got chunk_size={chunk_size}, S={S}, W={W}, rows={list(rows)}, rank={rank})")
    T = text_length_of_stream(chunk_size, S, sum(rows), tail)
    if T < 0:
        raise ValueError(f"context_parallel_attention: the shards hold {sum(rows)} rows in all ({list(rows)}), not "
                         f"the length of a KSA stream with chunk_size={chunk_size}, S={S}, summarize_tail={tail}")
    st = _Stream(chunk_size, S, T, tail)
    off = [0]
    for n in rows:
        off.append(off[-1] + n)
    R, a, b = len(rows), off[rank], off[rank + 1]
    needs = [_Needs(st, W, off[r], off[r + 1]) if rows[r] > 0 else None for r in range(R)]
    none = torch.zeros(0, dtype=torch.int64)
    sends = [needs[r].rows(a, b) - a if needs[r] else none for r in range(R)]
    mine = needs[rank]
    received = torch.cat([mine.rows(off[j], off[j + 1]) for j in range(R)]) if mine else none
    recv_counts = tuple(len(mine.rows(off[j], off[j + 1])) if mine else 0 for j in range(R))
    h0 = mine.c0 * mine.ck if mine else a
    prefix = int((received < h0).sum())
    # The slice [h0, b) as a stream of its own: it starts at a chunk boundary, so it is one once its last chunk
    # is completed. Ending in a chunk's summaries: the rest of them (with the whole stream's tail flag, for a
    # summarised partial tail); ending in text: no tail summaries, and S more rows when that text fills its chunk.
    summ = st.is_summary(torch.arange(h0, b, dtype=torch.int64))
    slice_T = int((~summ).sum())
    slice_tail = bool(tail and b > h0 and bool(summ[-1]))
    L_slice = int(stream_layout(slice_T, chunk_size, S, slice_tail).max_seqlen) if b > h0 else 0
    return Plan(rank=rank, rows=rows, a=a, b=b, h0=h0, prefix=prefix, halo_index=received[prefix:] - h0,
                pad=L_slice - (b - h0), slice_tail=slice_tail,
                text_rows=torch.nonzero(~mine.local_summary).flatten() if mine else none,
                send_rows=torch.cat(sends), send_counts=tuple(len(x) for x in sends), recv_counts=recv_counts)


def _fold(x, G):
    """[B, m, Hq, D] -> [B, Hkv, m * G, D]: the query rows of the G heads of one KV head side by side (GQA)."""
    B, m, Hq, D = x.shape
    return x.reshape(B, m, Hq // G, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hq // G, m * G, D)


def _unfold(x, G):
    """Inverse of _fold: [B, Hkv, m * G, ...] -> [B, m, Hq, ...]."""
    B, Hkv, mG = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(B, Hkv, mG // G, G, *rest).permute(0, 2, 1, 3, *range(4, 4 + len(rest)))
    return x.reshape(B, mG // G, Hkv * G, *rest)


def _blocks(B, Hkv, rows, keys):
    step = max(1, PREFIX_BLOCK_ELEMENTS // max(1, B * Hkv * keys))
    return [(i, min(rows, i + step)) for i in range(0, rows, step)]


@contextlib.contextmanager
def _tf32_if_exact(x):
    """Part B's fp32 products on TF32 tensor cores for bf16/f16 inputs on CUDA: their values are exact in TF32
    (8 and 10 mantissa bits <= 10), so S = Q K^T loses nothing, while P and dS are rounded to 10 bits in their
    products (the kernels round P to bf16 for theirs). Other inputs: the default fp32 products."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _prefix_forward(q, kp, vp, scale):
    """Part B: every query row sees every key, fp32. q [B, m, Hq, D], kp/vp [B, P, Hkv, D] -> out [B, m, Hq, D]
    and lse [B, m, Hq] (fp32)."""
    G = q.shape[2] // kp.shape[2]
    qf, kf, vf = _fold(q, G), kp.transpose(1, 2).float(), vp.transpose(1, 2).float()
    B, Hkv, rows, D = qf.shape
    out = torch.empty(B, Hkv, rows, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hkv, rows, dtype=torch.float32, device=q.device)
    with _tf32_if_exact(q):
        for i, j in _blocks(B, Hkv, rows, kf.shape[2]):
            s = torch.matmul(qf[:, :, i:j].float(), kf.transpose(-1, -2)).mul_(scale)
            m = torch.logsumexp(s, dim=-1)
            out[:, :, i:j] = torch.matmul(s.sub_(m[..., None]).exp_(), vf)
            lse[:, :, i:j] = m
    return _unfold(out, G), _unfold(lse, G)


def _prefix_backward(q, kp, vp, out, lse, dout, scale):
    """Part B's backward with the merged (whole-attention) out and lse, so P = exp(s - lse) is the true
    probability and Delta = rowsum(dout * out) the true one: returns dq [B, m, Hq, D] and dkp, dvp [B, P, Hkv, D]
    (fp32), this part's share of the exact gradient."""
    G = q.shape[2] // kp.shape[2]
    qf, kf, vf = _fold(q, G), kp.transpose(1, 2).float(), vp.transpose(1, 2).float()
    dof = _fold(dout, G)
    delta = _fold((dout.float() * out.float()).sum(-1, keepdim=True), G)[..., 0]
    lsef = _fold(lse[..., None], G)[..., 0]
    B, Hkv, rows, D = qf.shape
    dq = torch.empty(B, Hkv, rows, D, dtype=torch.float32, device=q.device)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    with _tf32_if_exact(q):
        for i, j in _blocks(B, Hkv, rows, kf.shape[2]):
            qb, dob = qf[:, :, i:j].float(), dof[:, :, i:j].float()
            p = torch.matmul(qb, kf.transpose(-1, -2)).mul_(scale).sub_(lsef[:, :, i:j, None]).exp_()
            dv += torch.matmul(p.transpose(-1, -2), dob)
            ds = p.mul_(torch.matmul(dob, vf.transpose(-1, -2)).sub_(delta[:, :, i:j, None]))
            dq[:, :, i:j] = torch.matmul(ds, kf).mul_(scale)
            dk += torch.matmul(ds.transpose(-1, -2), qb).mul_(scale)
    return _unfold(dq, G), dk.transpose(1, 2), dv.transpose(1, 2)


def _exchange(x, out_rows, out_counts, in_counts, group):
    """all_to_all_single over rows: x [n, ...] holds in_counts[r] rows for rank r, rank after rank; returns the
    out_counts[r] rows from each rank r, rank after rank."""
    out = x.new_empty((out_rows,) + tuple(x.shape[1:]))
    if x.dtype == torch.bfloat16 and dist.get_backend(group) == "gloo":  # older gloo has no bfloat16: move the bytes
        dist.all_to_all_single(out.view(torch.uint8), x.contiguous().view(torch.uint8), list(out_counts),
                               list(in_counts), group=group)
    else:
        dist.all_to_all_single(out, x.contiguous(), list(out_counts), list(in_counts), group=group)
    return out


def _zeros_rows(x, n):
    return x.new_zeros((x.shape[0], n) + tuple(x.shape[2:]))


@functools.lru_cache(maxsize=256)
def _on(plan, field, device):
    """An index tensor of a plan on a device (copied there once)."""
    return getattr(plan, field).to(device)


def _halo(received, plan):
    """The halo rows [h0, a) from the received ones (the others, seen by no query of the shard, are zero)."""
    if received.shape[1] == plan.halo:
        return received  # every halo row was needed
    h = _zeros_rows(received, plan.halo)
    return h.index_copy_(1, _on(plan, "halo_index", received.device), received)


def _slice(halo, local, pad):
    """[halo rows, local rows, pad zero rows] along dim 1 (the slice's rows; halo None: none)."""
    parts = ([halo] if halo is not None and halo.shape[1] > 0 else []) + [local] + ([_zeros_rows(local, pad)] if pad else [])
    return torch.cat(parts, dim=1) if len(parts) > 1 else local


class _ContextParallelAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, plan, group, chunk_size, S, W, scale, deterministic):
        n, pad = plan.b - plan.a, plan.pad
        dev = q.device
        # The rows the others need from this shard, rows first ([rows, B, 2, Hkv, D]), and ours from them.
        idx = _on(plan, "send_rows", dev)
        send = torch.stack([k.index_select(1, idx), v.index_select(1, idx)], dim=2).transpose(0, 1)
        recv = _exchange(send, plan.recv_rows, plan.recv_counts, plan.send_counts, group).transpose(0, 1)
        kp, vp = recv[:, :plan.prefix, 0], recv[:, :plan.prefix, 1]
        kh, vh = _halo(recv[:, plan.prefix:, 0], plan), _halo(recv[:, plan.prefix:, 1], plan)
        if n == 0:
            ctx.plan, ctx.group, ctx.empty = plan, group, True
            ctx.save_for_backward(q, k, v)
            return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)
        # A: the slice [halo, local, padding] through the kernel, queries from the halo's end on.
        ks, vs, qs = _slice(kh, k, pad), _slice(vh, v, pad), _slice(None, q, pad)
        out_a, lse_a = _fwd(qs, ks, vs, None, 0, chunk_size, S, W, plan.slice_tail, scale, deterministic, plan.halo)
        del ks, vs, qs  # the backward builds them again from what it keeps: the local inputs and the halo
        out, lse = (out_a[:, :n].contiguous(), lse_a[:, :n].contiguous()) if pad else (out_a, lse_a)
        # B: the text queries against the prefix summaries, merged by log-sum-exp.
        t = _on(plan, "text_rows", dev)
        if plan.prefix > 0 and len(t) > 0:
            out_b, lse_b = _prefix_forward(q.index_select(1, t), kp, vp, scale or q.shape[-1] ** -0.5)
            la = lse.index_select(1, t)
            lse_t = torch.logaddexp(la, lse_b)
            o = (out.index_select(1, t).float() * (la - lse_t).exp()[..., None]
                 + out_b * (lse_b - lse_t).exp()[..., None])
            out, lse = out.clone(), lse.clone()
            out.index_copy_(1, t, o.to(out.dtype))
            lse.index_copy_(1, t, lse_t)
        ctx.plan, ctx.group, ctx.empty = plan, group, False
        ctx.config = (chunk_size, S, W, scale, deterministic)
        ctx.save_for_backward(q, k, v, kh, vh, kp, vp, out, lse, lse_a[:, n:])
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        plan, group = ctx.plan, ctx.group
        n, halo = plan.b - plan.a, plan.halo
        if ctx.empty:
            q, k, v = ctx.saved_tensors
            grads = _zeros_rows(torch.stack([k, v], dim=2), plan.recv_rows).transpose(0, 1)
            back = _exchange(grads, len(plan.send_rows), plan.send_counts, plan.recv_counts, group)
            dkv = torch.zeros(torch.stack([k, v], dim=2).shape, dtype=torch.float32, device=k.device)
            dkv.index_add_(1, _on(plan, "send_rows", k.device), back.transpose(0, 1).float())
            return (torch.zeros_like(q), dkv[:, :, 0].to(k.dtype), dkv[:, :, 1].to(v.dtype)) + (None,) * 7
        q, k, v, kh, vh, kp, vp, out, lse, lse_pad = ctx.saved_tensors
        chunk_size, S, W, scale, deterministic = ctx.config
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.to(out.dtype).contiguous()
        pad = plan.pad
        # A's backward with the merged out and lse; the padding rows (dout 0) add nothing.
        dq_a, dks, dvs = _bwd(_slice(None, dout, pad), _slice(None, q, pad), _slice(kh, k, pad), _slice(vh, v, pad),
                              _slice(None, out, pad), torch.cat([lse, lse_pad], dim=1), None, 0, chunk_size, S, W,
                              plan.slice_tail, scale, deterministic, halo)
        dq = dq_a[:, :n]
        t, hi = _on(plan, "text_rows", q.device), _on(plan, "halo_index", q.device)
        grads = [dks[:, :halo].index_select(1, hi), dvs[:, :halo].index_select(1, hi)]
        if plan.prefix > 0 and len(t) > 0:
            dq_b, dkp, dvp = _prefix_backward(q.index_select(1, t), kp, vp, out.index_select(1, t),
                                              lse.index_select(1, t), dout.index_select(1, t),
                                              scale or q.shape[-1] ** -0.5)
            dq = dq.float().index_add_(1, t, dq_b).to(q.dtype)
            grads = [torch.cat([dkp.to(dks.dtype), grads[0]], dim=1), torch.cat([dvp.to(dvs.dtype), grads[1]], dim=1)]
        else:
            grads = [torch.cat([_zeros_rows(grads[0], plan.prefix), grads[0]], dim=1),
                     torch.cat([_zeros_rows(grads[1], plan.prefix), grads[1]], dim=1)]
        # The received rows' gradients back to their owners, who add them to their rows' own.
        back = _exchange(torch.stack(grads, dim=2).transpose(0, 1), len(plan.send_rows), plan.send_counts,
                         plan.recv_counts, group)
        dkv = torch.stack([dks[:, halo:halo + n], dvs[:, halo:halo + n]], dim=2).float()
        dkv.index_add_(1, _on(plan, "send_rows", dkv.device), back.transpose(0, 1).float())
        return (dq, dkv[:, :, 0].to(k.dtype), dkv[:, :, 1].to(v.dtype)) + (None,) * 7


def shard_rows(n, group=None, device=None):
    """The row counts of every rank's shard (an all_gather of this rank's n), as a tuple in group rank order."""
    world = dist.get_world_size(group)
    t = torch.tensor([int(n)], dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return tuple(int(x.item()) for x in out)


def context_parallel_attention(q, k, v, chunk_size, S, W, group=None, summarize_tail=False, scale=None,
                               return_lse=False, deterministic=False, rows=None):
    """KSA attention over one stream sharded across the ranks of `group` (torch.distributed; gloo on the CPU,
    NCCL on CUDA; None = the default group).

    Rank r passes its shard: q [B, n_r, Hq, D] (or [n_r, Hq, D]), k and v [B, n_r, Hkv, D], the stream rows
    [a_r, a_r + n_r) with a_r = n_0 + ... + n_{r-1} (group rank order). Any boundaries: mid-chunk, between the
    summaries of a chunk, shorter than the window, empty. The whole (n_0 + n_1 + ...) must be a KSA stream
    (chunk_size, S, summarize_tail). Returns this rank's rows of ksa_torch.attention over the whole stream (and,
    with return_lse, their lse, fp32, not differentiable); differentiable in q, k and v: the gradients are this
    rank's rows of the whole attention's gradients.

    rows: the tuple (n_0, n_1, ...) when the caller knows it (e.g. from shard_rows(), once per sequence
    length); otherwise one all_gather of the lengths per call. Each call is one all_to_all_single of K/V rows
    forward and one of their gradients backward (docs/context_parallel.md: what moves and what it costs).
    float32/bfloat16 on the CPU, bfloat16/float16 on CUDA (the kernels' dtypes; the float64 oracle has no
    backward from a given lse, which this needs). All ranks must call it with the same chunk_size, S, W,
    summarize_tail, scale, B, heads and D.
    """
    if q.dtype == torch.float64:
        raise TypeError("context_parallel_attention: float64 is not supported (the float64 oracle recomputes its "
                        "own softmax in the backward, while the shards' parts need the merged one); use float32")
    three = q.dim() == 3
    if three:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"context_parallel_attention: q [B, n, Hq, D] and k, v [B, n, Hkv, D] disagree "
                         f"(got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"context_parallel_attention: Hq={q.shape[2]} must be a multiple of Hkv={k.shape[2]}")
    if rows is None:
        rows = shard_rows(q.shape[1], group, device=q.device if q.device.type == "cuda" else None)
    rank = dist.get_rank(group)
    if len(rows) != dist.get_world_size(group) or int(rows[rank]) != q.shape[1]:
        raise ValueError(f"context_parallel_attention: rows={tuple(rows)} does not match this rank ({rank}) "
                         f"holding {q.shape[1]} rows in a group of {dist.get_world_size(group)}")
    plan = make_plan(tuple(int(n) for n in rows), rank, int(chunk_size), int(S), int(W), bool(summarize_tail))
    out, lse = _ContextParallelAttention.apply(q, k, v, plan, group, int(chunk_size), int(S), int(W),
                                               float(scale) if scale else 0.0, bool(deterministic))
    if three:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out
