"""Autograd of ksa_torch.attention.

Run with pytest or plain python (PYTHONPATH=python; the C++ libraries built in $KSA_BUILD_DIR, default
<repo>/build):
  - gradcheck on tiny float64 CPU shapes (the oracle's analytic backward vs finite differences of its
    forward, through the autograd.Function: argument order, GQA shapes, strided views);
  - the CPU float32 kernels' gradients vs the float64 oracle;
  - on CUDA: ksa's bf16 gradients vs a float64 dense reference (mask from the core's rule) and vs
    FlexAttention's gradients (max relative differences printed).
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ksa_torch  # noqa: E402


def stream_len(k, S, T, tail=False):
    full = T // k
    return T + (full + (1 if tail and T % k else 0)) * S


def grid_randn(*shape, generator, grid=2.0 ** -12):
    """Normal values on a 2^-12 grid: float32-exact, and so is every x +- 2^-10 gradcheck tries."""
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) / grid).round() * grid


# (k, S, T, W, Hq, Hkv, D, tail)
TINY = [
    (2, 1, 5, 1, 2, 1, 4, False),
    (3, 2, 7, 0, 2, 2, 3, True),
    (2, 1, 9, 3, 4, 2, 2, False),   # W >= #chunks
    (4, 1, 4, 0, 1, 1, 5, False),   # exactly one chunk
    (1, 1, 6, 1, 2, 1, 3, False),   # k = 1
]


def test_gradcheck_oracle_float64():
    gen = torch.Generator().manual_seed(0)
    for (k, S, T, W, Hq, Hkv, D, tail) in TINY:
        L = stream_len(k, S, T, tail)
        q = grid_randn(1, L, Hq, D, generator=gen).requires_grad_()
        kk = grid_randn(1, L, Hkv, D, generator=gen).requires_grad_()
        v = grid_randn(1, L, Hkv, D, generator=gen).requires_grad_()
        fn = lambda q, kk, v: ksa_torch.attention(q, kk, v, k, S, W, summarize_tail=tail)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, kk, v), eps=2.0 ** -10, atol=1e-5, rtol=1e-3), (k, S, T, W)


def test_gradcheck_strided_views_float64():
    """q, k, v as slices of one fused projection (strided views), as a model passes them."""
    gen = torch.Generator().manual_seed(1)
    k, S, T, W, Hq, Hkv, D = 2, 1, 6, 1, 2, 1, 4
    L = stream_len(k, S, T)
    qkv = grid_randn(1, L, Hq + 2 * Hkv, D, generator=gen).requires_grad_()

    def fn(qkv):
        return ksa_torch.attention(qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:], k, S, W)

    assert torch.autograd.gradcheck(fn, (qkv,), eps=2.0 ** -10, atol=1e-5, rtol=1e-3)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def test_cpu_float32_kernels_match_oracle():
    """The CPU kernels (ksa::cpu::attention_forward/backward) through autograd vs the float64 oracle."""
    gen = torch.Generator().manual_seed(2)
    for (k, S, T, W, Hq, Hkv, D) in [(8, 1, 100, 2, 4, 2, 64), (3, 2, 57, 0, 2, 1, 32), (8, 1, 70, 100, 2, 2, 16)]:
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
            err = rel_l2(a, b)
            print(f"cpu f32 vs oracle k={k} S={S} T={T} W={W}: {name} rel L2 {err:.2e}")
            assert err < 1e-4, (name, err)


def dense_reference(q, k, v, mask, scale):
    """float64 masked attention with torch autograd; q [B, L, Hq, D], k/v [B, L, Hkv, D], mask [L, L]."""
    G = q.shape[2] // k.shape[2]
    kd, vd = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("blhd,bmhd->bhlm", q, kd) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhlm,bmhd->blhd", torch.softmax(s, dim=-1), vd)


def test_cuda_grads_match_reference_and_flex():
    if not torch.cuda.is_available():
        print("SKIPPED test_cuda_grads_match_reference_and_flex: no CUDA device")
        return
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    gen = torch.Generator(device="cuda").manual_seed(3)
    for (k, S, T, W, Hq, Hkv, D, dt) in [(8, 1, 300, 3, 4, 2, 64, torch.bfloat16), (8, 1, 513, 1, 8, 2, 128, torch.bfloat16),
                                         (4, 2, 200, 0, 2, 2, 128, torch.float16), (1, 1, 400, 2, 4, 1, 64, torch.bfloat16)]:
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


if __name__ == "__main__":
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            fn()
            print(f"{name}: ok")
    print("all passed")
