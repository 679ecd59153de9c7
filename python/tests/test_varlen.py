"""ksa_torch.attention_varlen: packed streams of different lengths in one call.

The packed call must give, row for row, exactly what attention() gives on each stream alone (the kernels
walk each stream's own tiles; on the CPU the work is the same, so the bits are the same), gradients
included; float64 runs the oracle and is gradchecked; bad boundaries are rejected with a message.
"""
import pytest
import torch

import ksa_torch
from common import grid_randn, rel_l2

# (text lengths, k, S, W, tail, Hq, Hkv, D)
CASES = [
    ([0, 1, 7, 8, 9, 97, 0, 300, 65, 0], 8, 1, 2, False, 2, 1, 64),
    ([130, 3, 257, 16], 8, 1, 0, True, 4, 2, 32),
    ([11, 40, 6, 77], 5, 2, 1, True, 2, 2, 48),
    ([200, 1, 129], 4, 1, 100, False, 4, 2, 16),  # W >= #chunks: plain causal text
]


def packed(texts, k, S, tail, Hq, Hkv, D, dtype, seed, device="cpu"):
    st = ksa_torch.stream_layout(texts, k, S, tail)
    N = int(st.cu_seqlens[-1])
    gen = torch.Generator().manual_seed(seed)
    xs = [grid_randn(N, h, D, generator=gen).to(device=device, dtype=dtype) for h in (Hq, Hkv, Hkv, Hq)]
    return st, xs[:3], xs[3]


def run(fn, xs, g):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out, lse = fn(*xs)
    return [out.detach(), lse.detach()] + list(torch.autograd.grad(out, xs, g))


def per_stream(st, xs, g, k, S, W, tail, **kw):
    """attention() on each stream alone, results concatenated: out, lse, dq, dk, dv."""
    cu = st.cu_seqlens.tolist()
    parts = [run(lambda q, kk, v: ksa_torch.attention(q, kk, v, k, S, W, tail, return_lse=True, **kw),
                 [x[a:b] for x in xs], g[a:b]) for a, b in zip(cu, cu[1:])]
    return [torch.cat([p[i] for p in parts]) for i in range(5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_varlen_equals_single_streams_cpu(case, dtype):
    texts, k, S, W, tail, Hq, Hkv, D = CASES[case]
    st, xs, g = packed(texts, k, S, tail, Hq, Hkv, D, dtype, seed=100 + case)
    got = run(lambda q, kk, v: ksa_torch.attention_varlen(q, kk, v, st.cu_seqlens, st.max_seqlen, k, S, W, tail,
                                                          return_lse=True), xs, g)
    want = per_stream(st, xs, g, k, S, W, tail)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_varlen_gradcheck_oracle_float64():
    st, xs, _ = packed([3, 0, 5, 4], 2, 1, True, 2, 1, 3, torch.float64, seed=7)
    xs = [x.requires_grad_() for x in xs]
    fn = lambda q, kk, v: ksa_torch.attention_varlen(q, kk, v, st.cu_seqlens, 0, 2, 1, 1, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(xs), eps=2.0 ** -10, atol=1e-5, rtol=1e-3)


def test_varlen_float32_matches_oracle_and_ignores_other_streams():
    texts, k, S, W, tail, Hq, Hkv, D = CASES[0]
    st, xs, g = packed(texts, k, S, tail, Hq, Hkv, D, torch.float32, seed=8)
    f32 = run(lambda q, kk, v: ksa_torch.attention_varlen(q, kk, v, st.cu_seqlens, 0, k, S, W, tail,
                                                          return_lse=True), xs, g)
    f64 = run(lambda q, kk, v: ksa_torch.attention_varlen(q, kk, v, st.cu_seqlens, 0, k, S, W, tail,
                                                          return_lse=True), [x.double() for x in xs], g.double())
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), f32, f64):
        assert rel_l2(a, b) < 1e-4, (name, rel_l2(a, b))  # fp32 rounding, far below any masking error
    # Changing one stream's inputs changes no row of the others.
    cu = st.cu_seqlens.tolist()
    a, b = cu[5], cu[6]  # the 97-token stream
    xs2 = [x.clone() for x in xs]
    for x in xs2:
        x[a:b] = torch.randn_like(x[a:b])
    out2 = ksa_torch.attention_varlen(*xs2, st.cu_seqlens, 0, k, S, W, tail)
    same = torch.ones(out2.shape[0], dtype=torch.bool)
    same[a:b] = False
    assert torch.equal(out2[same], f32[0][same]) and not torch.equal(out2[a:b], f32[0][a:b])


def test_varlen_cu_seqlens_forms_and_errors():
    st, xs, _ = packed([9, 20], 8, 1, False, 2, 1, 16, torch.float32, seed=9)
    want = ksa_torch.attention_varlen(*xs, st.cu_seqlens, st.max_seqlen, 8, 1, 1)
    for cu in (st.cu_seqlens.long(), st.cu_seqlens.int()):
        assert torch.equal(ksa_torch.attention_varlen(*xs, cu, 0, 8, 1, 1), want)
    assert torch.equal(ksa_torch.attention_varlen(*[x.unsqueeze(0) for x in xs], st.cu_seqlens, 0, 8, 1, 1)[0], want)
    N = xs[0].shape[0]
    with pytest.raises(RuntimeError, match="must equal the number of rows"):
        ksa_torch.attention_varlen(*xs, torch.tensor([0, N - 1]), 0, 8, 1, 1)
    with pytest.raises(RuntimeError, match="not the length of a KSA stream"):
        ksa_torch.attention_varlen(*xs, torch.tensor([0, 8, N]), 0, 8, 1, 1)
    with pytest.raises(RuntimeError, match="max_seqlen"):
        ksa_torch.attention_varlen(*xs, st.cu_seqlens, 5, 8, 1, 1)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ksa_torch.attention_varlen(*xs, torch.tensor([0, 23, 10, N]), 0, 8, 1, 1)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        ksa_torch.attention_varlen(*xs, st.cu_seqlens.float(), 0, 8, 1, 1)
    two = [torch.stack([x, x]) for x in xs]
    with pytest.raises(RuntimeError, match="with cu_seqlens"):
        ksa_torch.attention_varlen(*two, st.cu_seqlens, 0, 8, 1, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_cuda_equals_single_streams(dtype):
    """CUDA: packed == one call per stream, bitwise with deterministic=True (each packed CTA runs its tile as
    the call on its stream alone; these short streams split the dK/dV lists alike: the automatic split is at its
    minimum on both sides); with the fused non-deterministic dQ, within the bf16 tolerance of the tests."""
    texts, k, S, W, tail, Hq, Hkv = [0, 1, 7, 8, 9, 97, 0, 300, 65, 700, 0], 8, 1, 2, False, 4, 2
    for D in (64, 128):
        st, xs, g = packed(texts, k, S, tail, Hq, Hkv, D, dtype, seed=11, device="cuda")
        cu = st.cu_seqlens.cuda()
        got = run(lambda q, kk, v: ksa_torch.attention_varlen(q, kk, v, cu, st.max_seqlen, k, S, W, tail,
                                                              return_lse=True, deterministic=True), xs, g)
        want = per_stream(st, xs, g, k, S, W, tail, deterministic=True)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            assert torch.equal(a, b), (D, name)
        fused = run(lambda q, kk, v: ksa_torch.attention_varlen(q, kk, v, cu, st.max_seqlen, k, S, W, tail,
                                                                return_lse=True), xs, g)
        f64 = run(lambda q, kk, v: ksa_torch.attention_varlen(q, kk, v, st.cu_seqlens, 0, k, S, W, tail,
                                                              return_lse=True),
                  [x.double().cpu() for x in xs], g.double().cpu())
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), fused, f64):
            assert rel_l2(a.cpu(), b) < tol, (D, name, rel_l2(a.cpu(), b))
