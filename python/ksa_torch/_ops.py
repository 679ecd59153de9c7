"""The registered operators torch.ops.ksa.attention_fwd / attention_bwd (defined and implemented in
csrc/ops.cpp) and the Python entry points over them.

torch >= 2.4: fake (meta) implementations and the autograd formula are registered with torch.library, so
the forward op is differentiable by itself, torch.compile keeps it as one node of the graph (no graph break)
and torch.library.opcheck passes. Older torch (Debian 12 has 1.13): no such registration API; `attention`
wraps the same ops in a plain torch.autograd.Function (eager autograd works, torch.compile would break the
graph around it).
"""
import torch
from torch.autograd.function import once_differentiable

from . import _C  # noqa: F401  (loading it registers the ksa:: operators)

_fwd = torch.ops.ksa.attention_fwd
_bwd = torch.ops.ksa.attention_bwd

HAS_REGISTERED_AUTOGRAD = hasattr(torch.library, "register_fake") and hasattr(torch.library, "register_autograd")


def _empty_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _backward_impl(saved, config, dout):
    q, k, v, out, lse, cu_seqlens = saved
    if dout is None:  # only lse was used (it is not differentiable): no gradient flows
        dout = torch.zeros_like(out)
    return _bwd(dout.to(out.dtype), q, k, v, out, lse, cu_seqlens, *config)


if HAS_REGISTERED_AUTOGRAD:

    @torch.library.register_fake("ksa::attention_fwd")
    def _attention_fwd_fake(q, k, v, cu_seqlens, max_seqlen, chunk_size, S, W, summarize_tail, scale, deterministic,
                            q_begin=0):
        lse = q.new_empty(q.shape[:-1], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        return _empty_like(q), lse

    @torch.library.register_fake("ksa::attention_bwd")
    def _attention_bwd_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, chunk_size, S, W, summarize_tail, scale,
                            deterministic, q_begin=0):
        return _empty_like(q), _empty_like(k), _empty_like(v)

    def _setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens, *config = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.config = tuple(config)  # max_seqlen, chunk_size, S, W, summarize_tail, scale, deterministic[, q_begin]
        ctx.mark_non_differentiable(lse)

    def _attention_fwd_backward(ctx, dout, _dlse):
        dq, dk, dv = _backward_impl(ctx.saved_tensors, ctx.config, dout)
        return (dq, dk, dv, None) + (None,) * len(ctx.config)

    torch.library.register_autograd("ksa::attention_fwd", _attention_fwd_backward, setup_context=_setup_context)
    _apply = _fwd

else:

    class _Attention(torch.autograd.Function):
        """out, lse = KSA attention through torch.ops.ksa.attention_fwd; backward through attention_bwd (lse is
        not differentiable)."""

        @staticmethod
        def forward(ctx, q, k, v, cu_seqlens, *config):
            out, lse = _fwd(q, k, v, cu_seqlens, *config)
            ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
            ctx.config = config
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        @once_differentiable
        def backward(ctx, dout, _dlse):
            dq, dk, dv = _backward_impl(ctx.saved_tensors, ctx.config, dout)
            return (dq, dk, dv, None) + (None,) * len(ctx.config)

    _apply = _Attention.apply


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _call(q, k, v, cu_seqlens, max_seqlen, chunk_size, S, W, summarize_tail, scale, deterministic, q_begin=0):
    # Checked here as well as in the op: the message names the argument, and an integer tensor never reaches
    # the autograd wrapper (which would first ask for its gradient).
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _DTYPES:
            raise RuntimeError(f"ksa: dtype must be float32, bfloat16 or float16, or float64 on the CPU "
                               f"({name} is {t.dtype})")
    return _apply(q, k, v, cu_seqlens, int(max_seqlen), int(chunk_size), int(S), int(W), bool(summarize_tail),
                  float(scale) if scale else 0.0, bool(deterministic), int(q_begin))


def attention(q, k, v, chunk_size, S, W, summarize_tail=False, scale=None, return_lse=False, deterministic=False,
              q_begin=0):
    """KSA attention over a stream: q [B, L, Hq, D] (or [L, Hq, D]), k and v [B, L, Hkv, D].

    Returns out (q's shape, dense) and, with return_lse, lse [B, L, Hq] (fp32, natural log; not
    differentiable). Differentiable in q, k and v. q_begin: q holds only the stream rows [q_begin, L) of the
    L rows of k and v ([B, L - q_begin, Hq, D]): those queries against every key (rows of k and v that no
    such query sees still get their zero gradient). out, lse and dq then have q's rows; the CPU kernels
    compute only them (the CUDA backward pads the rows before q_begin with zeros for now). `deterministic` is passed to the backward: on Hopper
    (sm_90a) with head dimension 128 and deterministic=False the CUDA backward computes dQ inside its dK/dV
    pass and adds it with fp32 reduce-adds, so dq's last bits vary from run to run (faster: 5 instead of 7
    matrix products per tile pair; KSA_CUDA_BWD_FUSED_DQ=0 turns this off). deterministic=True, or any other
    GPU or head dimension, gives the same bits every run. float64 CPU tensors run the oracle, for gradcheck.
    """
    out, lse = _call(q, k, v, None, 0, chunk_size, S, W, summarize_tail, scale, deterministic, q_begin)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, chunk_size, S, W, summarize_tail=False, scale=None,
                     return_lse=False, deterministic=False):
    """KSA attention over packed streams (FlashAttention's varlen form): q [N, Hq, D], k and v [N, Hkv, D] hold
    several streams back to back; stream i is rows [cu_seqlens[i], cu_seqlens[i+1]) (int32 or int64, [n + 1],
    cu_seqlens[0] = 0, cu_seqlens[-1] = N) and must be a whole KSA stream (build_stream makes them). No query
    sees a key of another stream; each stream has its own chunk grid. max_seqlen: the longest stream (checked;
    0 skips the check). A CPU cu_seqlens saves a device-to-host copy on CUDA. Returns out [N, Hq, D] (and lse
    [N, Hq]). The CPU and CUDA kernels walk each stream's own tiles inside one call (on CUDA: one launch of
    each kernel for all streams, no padding to the longest).
    """
    out, lse = _call(q, k, v, cu_seqlens, max_seqlen, chunk_size, S, W, summarize_tail, scale, deterministic)
    return (out, lse) if return_lse else out
