"""Autograd of ksa_torch.attention (CPU here; the CUDA comparison is marked `cuda`).

  - gradcheck on tiny float64 CPU shapes (the oracle's analytic backward vs finite differences of its
    forward, through the op: argument order, GQA shapes, strided views, [L, H, D] inputs);
  - the CPU float32 kernels' gradients vs the float64 oracle;
  - on CUDA: ksa's bf16 gradients vs a float64 dense reference (mask from the core's rule) and vs
    FlexAttention's gradients (max relative differences printed).
"""
import math

import pytest
import torch

import ksa_torch
from common import dense_reference, grid_randn, max_rel, rel_l2, stream_len

# (k, S, T, W, Hq, Hkv, D, tail)
TINY = [
    (2, 1, 5, 1, 2, 1, 4, False),
    (3, 2, 7, 0, 2, 2, 3, True),
    (2, 1, 9, 3, 4, 2, 2, False),   # W >= #chunks
    (4, 1, 4, 0, 1, 1, 5, False),   # exactly one chunk
    (1, 1, 6, 1, 2, 1, 3, False),   # k = 1
]


@pytest.mark.parametrize("k,S,T,W,Hq,Hkv,D,tail", TINY)
def test_gradcheck_oracle_float64(k, S, T, W, Hq, Hkv, D, tail):
    gen = torch.Generator().manual_seed(k * 100 + T)
    L = stream_len(k, S, T, tail)
    q = grid_randn(1, L, Hq, D, generator=gen).requires_grad_()
    kk = grid_randn(1, L, Hkv, D, generator=gen).requires_grad_()
    v = grid_randn(1, L, Hkv, D, generator=gen).requires_grad_()
    fn = lambda q, kk, v: ksa_torch.attention(q, kk, v, k, S, W, summarize_tail=tail)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, kk, v), eps=2.0 ** -10, atol=1e-5, rtol=1e-3)


def test_gradcheck_strided_views_float64():
    """q, k, v as slices of one fused projection (strided views), as a model passes them; 3-dim [L, H, D]."""
    gen = torch.Generator().manual_seed(1)
    k, S, T, W, Hq, Hkv, D = 2, 1, 6, 1, 2, 1, 4
    L = stream_len(k, S, T)
    qkv = grid_randn(L, Hq + 2 * Hkv, D, generator=gen).requires_grad_()

    def fn(qkv):
        return ksa_torch.attention(qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:], k, S, W)

    assert torch.autograd.gradcheck(fn, (qkv,), eps=2.0 ** -10, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("k,S,T,W,Hq,Hkv,D", [(8, 1, 100, 2, 4, 2, 64), (3, 2, 57, 0, 2, 1, 32), (8, 1, 70, 100, 2, 2, 16)])
def test_cpu_float32_kernels_match_oracle(k, S, T, W, Hq, Hkv, D):
    """The CPU kernels (ksa::cpu::attention_forward/backward) through autograd vs the float64 oracle."""
    gen = torch.Generator().manual_seed(2 + T)
    L = stream_len(k, S, T)
    x64 = [grid_randn(1, L, h, D, generator=gen) for h in (Hq, Hkv, Hkv)]
    g = grid_randn(1, L, Hq, D, generator=gen)
    grads = {}
    for dt in (torch.float64, torch.float32):
        xs = [x.detach().to(dt).clone().requires_grad_() for x in x64]
        out = ksa_torch.attention(*xs, k, S, W)
        out.backward(g.to(dt))
        grads[dt] = [out.detach()] + [x.grad for x in xs]
    for name, a, b in zip(("out", "dq", "dk", "dv"), grads[torch.float32], grads[torch.float64]):
        # fp32 accumulation over at most a few hundred keys: ~1e-6 relative; a masking error would be O(1).
        assert rel_l2(a, b) < 1e-4, (name, rel_l2(a, b))


def test_lse_and_errors():
    gen = torch.Generator().manual_seed(5)
    L = stream_len(8, 1, 20)
    q, kk, v = (grid_randn(1, L, 2, 16, generator=gen, dtype=torch.float32) for _ in range(3))
    out, lse = ksa_torch.attention(q, kk, v, 8, 1, 1, return_lse=True)
    out64, lse64 = ksa_torch.attention(q.double(), kk.double(), v.double(), 8, 1, 1, return_lse=True)
    assert lse.shape == (1, L, 2) and lse.dtype == torch.float32
    assert (lse.double() - lse64).abs().max().item() < 1e-5
    with pytest.raises(RuntimeError, match="not a valid KSA stream"):
        ksa_torch.attention(q[:, :8], kk[:, :8], v[:, :8], 8, 1, 1)  # 8 text tokens need their summary
    with pytest.raises(RuntimeError, match="dtype"):
        ksa_torch.attention(q.to(torch.int32), kk.to(torch.int32), v.to(torch.int32), 8, 1, 1)


# (k, S, T, W, tail): q_begin at the first row, inside a chunk's text, at a chunk's summaries, in a tail's
# summaries, at the last row and at L (no query).
Q_BEGIN_CASES = [(4, 2, 37, 2, False), (4, 2, 37, 2, True), (8, 1, 150, 0, False), (3, 1, 40, 100, True)]


def q_begin_rows(k, S, T, tail):
    L = stream_len(k, S, T, tail)
    return L, sorted({0, 1, k + 1, k + S + 2, L - S, L - 1, L})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k,S,T,W,tail", Q_BEGIN_CASES)
def test_q_begin_equals_the_full_calls_rows(k, S, T, W, tail, dtype):
    """attention(q[:, qb:], k, v, q_begin=qb) is rows qb: of the full call, bit for bit (the same tiles per row),
    and its dk, dv are the full call's with no gradient on the rows before qb (CPU kernels; float64: the oracle
    on zero-padded rows)."""
    gen = torch.Generator().manual_seed(k * 1000 + T)
    L, begins = q_begin_rows(k, S, T, tail)
    q, kk, v, g = (grid_randn(2, L, h, 8, generator=gen).to(dtype) for h in (4, 2, 2, 4))
    for qb in begins:
        xs = [x.clone().requires_grad_() for x in (q, kk, v)]
        out, lse = ksa_torch.attention(*xs, k, S, W, tail, return_lse=True)
        gz = g.clone()
        gz[:, :qb] = 0
        out.backward(gz)
        ys = [q[:, qb:].clone().requires_grad_(), kk.clone().requires_grad_(), v.clone().requires_grad_()]
        out2, lse2 = ksa_torch.attention(*ys, k, S, W, tail, return_lse=True, q_begin=qb)
        out2.backward(g[:, qb:])
        assert out2.shape == (2, L - qb, 4, 8) and lse2.shape == (2, L - qb, 4), qb
        for name, a, b in (("out", out[:, qb:], out2), ("lse", lse[:, qb:], lse2), ("dq", xs[0].grad[:, qb:], ys[0].grad),
                           ("dk", xs[1].grad, ys[1].grad), ("dv", xs[2].grad, ys[2].grad)):
            assert torch.equal(a, b), (name, qb, (a.double() - b.double()).abs().max().item())


def test_q_begin_gradcheck_oracle_float64():
    gen = torch.Generator().manual_seed(11)
    k, S, T, W, qb = 2, 1, 7, 1, 4
    L = stream_len(k, S, T)
    q = grid_randn(1, L - qb, 2, 3, generator=gen).requires_grad_()
    kk, v = (grid_randn(1, L, 1, 3, generator=gen).requires_grad_() for _ in range(2))
    fn = lambda q, kk, v: ksa_torch.attention(q, kk, v, k, S, W, q_begin=qb)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, kk, v), eps=2.0 ** -10, atol=1e-5, rtol=1e-3)


def test_q_begin_errors():
    L = stream_len(4, 1, 9)
    q, kk = torch.randn(1, L, 2, 8), torch.randn(1, L, 1, 8)
    with pytest.raises(RuntimeError, match="q_begin"):
        ksa_torch.attention(q, kk, kk, 4, 1, 1, q_begin=2)  # q must have L - q_begin rows
    with pytest.raises(RuntimeError, match="q_begin"):
        ksa_torch.attention(q[:, :0], kk, kk, 4, 1, 1, q_begin=L + 1)
    with pytest.raises(RuntimeError, match="q_begin must be 0 with cu_seqlens"):
        torch.ops.ksa.attention_fwd(q[0, 2:], kk[0], kk[0], torch.tensor([0, L]), 0, 4, 1, 1, False, 0.0, False, 2)


@pytest.mark.cuda
@pytest.mark.parametrize("k,S,T,W,tail", [(8, 1, 600, 3, False), (4, 2, 301, 1, True), (8, 1, 500, 100, False)])
def test_q_begin_cuda(k, S, T, W, tail):
    """CUDA: the forward with q_begin (the kernel's own) and the backward (the binding pads the rows before it)
    against the full call's rows, with no gradient on the rows before q_begin (bf16: same tolerance as above)."""
    gen = torch.Generator().manual_seed(T)
    L, begins = q_begin_rows(k, S, T, tail)
    q, kk, v, g = (grid_randn(2, L, h, 64, generator=gen).to("cuda", torch.bfloat16) for h in (4, 2, 2, 4))
    for qb in begins + [200]:
        xs = [x.clone().requires_grad_() for x in (q, kk, v)]
        out, lse = ksa_torch.attention(*xs, k, S, W, tail, return_lse=True, deterministic=True)
        gz = g.clone()
        gz[:, :qb] = 0
        out.backward(gz)
        ys = [q[:, qb:].clone().requires_grad_(), kk.clone().requires_grad_(), v.clone().requires_grad_()]
        out2, lse2 = ksa_torch.attention(*ys, k, S, W, tail, return_lse=True, deterministic=True, q_begin=qb)
        out2.backward(g[:, qb:])
        for name, a, b in (("out", out[:, qb:], out2), ("lse", lse[:, qb:], lse2), ("dq", xs[0].grad[:, qb:], ys[0].grad),
                           ("dk", xs[1].grad, ys[1].grad), ("dv", xs[2].grad, ys[2].grad)):
            if a.numel():
                assert rel_l2(b, a) < 2e-2, (name, qb, rel_l2(b, a))


CUDA_CASES = [(8, 1, 300, 3, 4, 2, 64, torch.bfloat16), (8, 1, 513, 1, 8, 2, 128, torch.bfloat16),
              (4, 2, 200, 0, 2, 2, 128, torch.float16), (1, 1, 400, 2, 4, 1, 64, torch.bfloat16)]


@pytest.mark.cuda
@pytest.mark.parametrize("k,S,T,W,Hq,Hkv,D,dt", CUDA_CASES)
def test_cuda_grads_match_reference_and_flex(k, S, T, W, Hq, Hkv, D, dt):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    gen = torch.Generator(device="cuda").manual_seed(3)
    L = stream_len(k, S, T)
    mask = ksa_torch.visible_mask(k, S, T, W).cuda()
    q, kk, v = (torch.randn(1, L, h, D, device="cuda", dtype=dt, generator=gen) for h in (Hq, Hkv, Hkv))
    g = torch.randn(1, L, Hq, D, device="cuda", dtype=dt, generator=gen)
    scale = 1.0 / math.sqrt(D)

    def grads(fn, inputs):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        out = fn(*xs)
        return [out.detach()] + list(torch.autograd.grad(out, xs, g.to(out.dtype)))

    got = grads(lambda q, kk, v: ksa_torch.attention(q, kk, v, k, S, W, deterministic=True), (q, kk, v))
    ref = grads(lambda q, kk, v: dense_reference(q, kk, v, mask, scale), (q.double(), kk.double(), v.double()))
    bm = create_block_mask(lambda b, h, qi, ki: mask[qi, ki], None, None, L, L, device="cuda")

    def flex_fn(q, kk, v):
        o = flex_attention(q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
                           enable_gqa=Hq != Hkv)
        return o.transpose(1, 2)

    fx = grads(flex_fn, (q, kk, v))
    tol = 2e-2 if dt == torch.bfloat16 else 5e-3  # as tests/cuda/attention_bwd_test.cpp argues
    for name, a, f, r in zip(("out", "dq", "dk", "dv"), got, fx, ref):
        print(f"cuda {dt} k={k} S={S} T={T} W={W} H={Hq}/{Hkv} D={D} {name}: max rel |ksa-flex| "
              f"{max_rel(a, f):.2e}, rel L2 ksa-f64 {rel_l2(a, r):.2e}, flex-f64 {rel_l2(f, r):.2e}")
        assert rel_l2(a, r) < tol, (name, rel_l2(a, r))
        assert rel_l2(a, f) < 2 * tol, (name, rel_l2(a, f))
    # Deterministic: a second backward gives the same bits.
    again = grads(lambda q, kk, v: ksa_torch.attention(q, kk, v, k, S, W, deterministic=True), (q, kk, v))
    for a, b in zip(got, again):
        assert torch.equal(a, b)
