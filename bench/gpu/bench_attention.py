"""KSA attention on the GPU: ksa vs FlexAttention (two layouts) vs SDPA dense causal, same shapes, same run.

Run through bench/gpu/run.sh (it builds what it needs). Prints, per shape: ms (median of CUDA-event timed
runs after warm-up, inputs rotated so the L2 does not hold them), useful TFLOP/s from the exact pair count
(the C++ core counter: 4*D*pairs*Hq*B forward), and the max abs difference of ksa vs FlexAttention and vs a
float64 reference on a sample of rows.

Then (unless --no-bwd) forward+backward: the time of out = attn(q, k, v) and the gradients of sum(out * g)
for a random g (torch.autograd.grad), for the same four; backward alone = fwd+bwd - fwd; useful TFLOP/s with
the FlashAttention convention (fwd+bwd = 3.5 x the forward's FLOPs); and the max relative difference
(max|a-b| / max|b|) of ksa's dq, dk, dv vs FlexAttention's (gathered layout). FlexAttention on the interleaved
stream is timed in fwd+bwd only up to --interleaved-bwd-max (it is the slow layout).
"""
import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import ksa_torch

flex = torch.compile(flex_attention, dynamic=False)


def tokens(T, k, S, order):
    """Per-row chunk, index-in-chunk, is-summary for the stream order or the gathered order."""
    C = T // k
    L = T + C * S
    pos = torch.arange(L, device="cuda")
    if order == "stream":
        chunk = pos // (k + S)
        off = pos - chunk * (k + S)
        n = torch.where(chunk < C, torch.full_like(chunk, k), torch.full_like(chunk, T % k))
        summ = off >= n
        idx = torch.where(summ, off - n, off)
    else:  # gathered: text rows, then summaries
        summ = pos >= T
        s = pos - T
        chunk = torch.where(summ, s // S, pos // k)
        idx = torch.where(summ, s % S, pos % k)
    return chunk.int(), idx.int(), summ


def ksa_mask(chunk, idx, summ, W):
    def mask_mod(b, h, q, kv):
        qc, kc, qs, ks, qi, ki = chunk[q], chunk[kv], summ[q], summ[kv], idx[q], idx[kv]
        sum_q = (kc == qc) & (~ks | (ki <= qi))
        same = (kc == qc) & ~ks & (ki <= qi)
        win = (kc < qc) & (kc >= qc - W) & ~ks
        old = (kc < qc - W) & ks
        return torch.where(qs, sum_q, same | win | old)
    return mask_mod


def gathered_perm(T, k, S):
    """stream position of each gathered row."""
    C = T // k
    t = torch.arange(T, device="cuda")
    text = (t // k) * (k + S) + t % k
    s = torch.arange(C * S, device="cuda")
    summ = (s // S) * (k + S) + k + s % S
    return torch.cat([text, summ])


def bench(fn, inputs, warmup=3, reps=10):
    """Median ms over reps with CUDA events; cycles through `inputs` (several sets beat the L2)."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[i % len(inputs)]
        a.record()
        fn(*args)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def reference_rows(q, k, v, rows, chunk, idx, summ, W, G):
    """float64 attention for a sample of stream rows. q [L, Hq, D], k/v [L, Hkv, D]."""
    out = []
    scale = 1.0 / math.sqrt(q.shape[-1])
    kd, vd = k.double().repeat_interleave(G, dim=1), v.double().repeat_interleave(G, dim=1)
    mm = ksa_mask(chunk, idx, summ, W)
    L = q.shape[0]
    kv = torch.arange(L, device="cuda")
    for r in rows:
        m = mm(0, 0, torch.full_like(kv, r), kv)
        s = torch.einsum("hd,lhd->hl", q[r].double(), kd) * scale
        s = s.masked_fill(~m[None, :], float("-inf"))
        p = torch.softmax(s, dim=-1)
        out.append(torch.einsum("hl,lhd->hd", p, vd))
    return torch.stack(out)


def baseline(res, name, fn):
    """Times one baseline into res[name]; a baseline that fails (e.g. FlexAttention out of memory or falling back
    to its unfused path) is recorded as failed instead of ending the run."""
    try:
        res[name] = fn()
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        res[name + "_failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        print(f"  {res['shape']}: {name} failed: {res[name + '_failed']}", flush=True)
        torch.cuda.empty_cache()


def run_shape(T, Hq, Hkv, D, k=8, S=1, W=128, sets=2, skip_interleaved=False, reps=10, with_bwd=True,
              interleaved_bwd_max=32768):
    B = 1
    L = T + (T // k) * S
    G = Hq // Hkv
    dev = "cuda"
    pairs = ksa_torch.count_visible_pairs(k, S, T, W)
    flops = 4.0 * D * pairs * Hq * B
    causal_flops = 4.0 * D * (T * (T + 1) // 2) * Hq * B
    gen = torch.Generator(device=dev).manual_seed(T + Hq + D)
    data = [tuple(torch.randn(B, L, h, D, device=dev, dtype=torch.bfloat16, generator=gen) for h in (Hq, Hkv, Hkv))
            for _ in range(sets)]
    res = {"shape": f"T={T//1024}K H={Hq}/{Hkv} D={D}", "T": T}

    # ksa (stream order in, stream order out); KSA_BENCH_CONFIGS="0,1,2" also times the other tile configs
    import os
    configs = [c for c in os.environ.get("KSA_BENCH_CONFIGS", "").split(",") if c]
    for c in configs:
        os.environ["KSA_CUDA_FWD_CONFIG"] = c
        res[f"ksa_cfg{c}"] = round(bench(lambda q, kk, v: ksa_torch.attention(q, kk, v, k, S, W), data, reps=reps), 3)
    os.environ.pop("KSA_CUDA_FWD_CONFIG", None)
    res["ksa"] = bench(lambda q, kk, v: ksa_torch.attention(q, kk, v, k, S, W), data, reps=reps)
    q, kk, v = data[0]
    out_ksa = ksa_torch.attention(q, kk, v, k, S, W)

    # FlexAttention, summaries gathered into a contiguous block (stream -> gathered permutation)
    perm = gathered_perm(T, k, S)
    cg, ig, sg = tokens(T, k, S, "gathered")
    bm_g = create_block_mask(ksa_mask(cg, ig, sg, W), 1, 1, L, L, device=dev, _compile=True)
    gdata = [tuple(t[:, perm].transpose(1, 2).contiguous() for t in d) for d in data]
    res["flex_gathered"] = bench(lambda q, kk, v: flex(q, kk, v, block_mask=bm_g, enable_gqa=G > 1), gdata, reps=reps)
    out_fg = flex(*gdata[0], block_mask=bm_g, enable_gqa=G > 1).transpose(1, 2)
    out_flex = torch.empty_like(out_fg)
    out_flex[:, perm] = out_fg

    # FlexAttention on the interleaved stream
    cs, is_, ss = tokens(T, k, S, "stream")
    if not skip_interleaved:
        bm_s = create_block_mask(ksa_mask(cs, is_, ss, W), 1, 1, L, L, device=dev, _compile=True)
        sdata = [tuple(t.transpose(1, 2).contiguous() for t in d) for d in data]
        baseline(res, "flex_interleaved", lambda: bench(lambda q, kk, v: flex(q, kk, v, block_mask=bm_s, enable_gqa=G > 1),
                                                            sdata, reps=max(3, reps // 3)))

    # SDPA dense causal over the text only
    tdata = [tuple(t[:, :T].transpose(1, 2).contiguous() for t in d) for d in data]
    res["sdpa_dense"] = bench(lambda q, kk, v: F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=G > 1),
                              tdata, reps=reps)

    # accuracy: vs Flex (all rows) and vs float64 on a row sample (first, last, summaries, random)
    res["diff_flex"] = (out_ksa.float() - out_flex.float()).abs().max().item()
    rows = sorted(set([0, L - 1, k, k + S + 3, L // 2] + torch.randint(0, L, (27,), generator=torch.Generator().manual_seed(1)).tolist()))
    ref = reference_rows(q[0], kk[0], v[0], rows, cs, is_, ss, W, G)
    res["diff_ref"] = (out_ksa[0, rows].double() - ref).abs().max().item()
    res["diff_flex_ref"] = (out_flex[0, rows].double() - ref).abs().max().item()
    res["tflops"] = {n: flops / (res[n] * 1e-3) / 1e12 for n in ("ksa", "flex_gathered", "flex_interleaved") if n in res}
    res["tflops"]["sdpa_dense"] = causal_flops / (res["sdpa_dense"] * 1e-3) / 1e12  # its own (dense) work
    if not with_bwd:
        return res

    # fwd + bwd: gradients of sum(out * g); leaf copies of the same inputs, one g per input set.
    def leaves(sets, gshape_of):
        out = []
        for i, d in enumerate(sets):
            gg = torch.randn(gshape_of(d[0]), device=dev, dtype=torch.bfloat16,
                             generator=torch.Generator(device=dev).manual_seed(1000 + i))
            out.append(tuple(t.detach().clone().requires_grad_() for t in d) + (gg,))
        return out

    def grad_step(fn):
        def step(q, kk, v, g):
            return torch.autograd.grad(fn(q, kk, v), (q, kk, v), g)
        return step

    ksa_fn = lambda q, kk, v: ksa_torch.attention(q, kk, v, k, S, W)  # noqa: E731
    flex_g_fn = lambda q, kk, v: flex(q, kk, v, block_mask=bm_g, enable_gqa=G > 1)  # noqa: E731
    kdata = leaves(data, lambda q: q.shape)
    res["ksa_fb"] = bench(grad_step(ksa_fn), kdata, reps=reps)
    # The same upstream gradient in the gathered [B, H, L, D] layout for FlexAttention.
    gkdata = [tuple(t.detach()[:, perm].transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in d)
              for d in kdata]
    baseline(res, "flex_gathered_fb", lambda: bench(grad_step(flex_g_fn), gkdata, reps=reps))
    if not skip_interleaved and T <= interleaved_bwd_max:
        flex_s_fn = lambda q, kk, v: flex(q, kk, v, block_mask=bm_s, enable_gqa=G > 1)  # noqa: E731
        sk = [tuple(t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in d) for d in kdata]
        baseline(res, "flex_interleaved_fb", lambda: bench(grad_step(flex_s_fn), sk, reps=max(3, reps // 3)))
    sdpa_fn = lambda q, kk, v: F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=G > 1)  # noqa: E731
    tk = [tuple(t.detach()[:, :T].transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in d) for d in kdata]
    baseline(res, "sdpa_dense_fb", lambda: bench(grad_step(sdpa_fn), tk, reps=reps))

    # ksa's gradients vs FlexAttention's (gathered), mapped back to stream order.
    gk = grad_step(ksa_fn)(*kdata[0])
    res["grad_diff_flex"] = {"dq": float("nan"), "dk": float("nan"), "dv": float("nan")}
    gf = None
    if "flex_gathered_fb" in res:
        gf = grad_step(flex_g_fn)(*gkdata[0])
    for name, a, b_g in zip(("dq", "dk", "dv"), gk, gf or ()):
        b = torch.empty_like(a)
        b[:, perm] = b_g.transpose(1, 2)
        res["grad_diff_flex"][name] = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    res["tflops_fb"] = {}
    for n in ("ksa", "flex_gathered", "flex_interleaved", "sdpa_dense"):
        if n + "_fb" in res:
            work = 3.5 * (causal_flops if n == "sdpa_dense" else flops)
            res["tflops_fb"][n] = work / (res[n + "_fb"] * 1e-3) / 1e12
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="full", choices=["full", "quick"])
    ap.add_argument("--no-bwd", action="store_true", help="forward only (skip the fwd+bwd table)")
    ap.add_argument("--interleaved-bwd-max", type=int, default=32768,
                    help="largest T for which FlexAttention on the interleaved stream is timed in fwd+bwd")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated T/Hq/Hkv/D shapes (e.g. 8192/32/8/128,32768/32/8/128) instead of the mode's")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}", flush=True)
    shapes = [(8192, 32, 8, 128), (32768, 32, 8, 128), (131072, 32, 8, 128), (32768, 32, 32, 128), (32768, 32, 8, 64)]
    if args.mode == "quick":
        shapes = [(8192, 32, 8, 128), (32768, 32, 8, 64)]
    if args.shapes:
        try:
            shapes = [tuple(int(x) for x in sh.split("/")) for sh in args.shapes.split(",")]
        except ValueError:
            ap.error(f"--shapes: expected T/Hq/Hkv/D[,T/Hq/Hkv/D...], got {args.shapes!r}")
        if any(len(sh) != 4 for sh in shapes):
            ap.error(f"--shapes: expected four numbers per shape (T/Hq/Hkv/D), got {args.shapes!r}")
    rows = []
    for T, Hq, Hkv, D in shapes:
        t0 = time.time()
        r = run_shape(T, Hq, Hkv, D, skip_interleaved=False, with_bwd=not args.no_bwd,
                      interleaved_bwd_max=args.interleaved_bwd_max)
        print(f"{r['shape']}: done in {time.time() - t0:.0f}s: {r}", flush=True)
        rows.append(r)
    print("\nB=1, bf16, k=8, S=1, W=128. ms (useful TFLOP/s; SDPA: dense causal FLOPs over the text)")
    print(f"{'shape':<24}{'ksa':>18}{'flex gathered':>18}{'flex interleaved':>20}{'sdpa dense':>18}"
          f"{'|ksa-flex|':>12}{'|ksa-f64|':>11}{'|flex-f64|':>11}")
    for r in rows:
        def cell(n):
            return f"{r[n]:.3f} ({r['tflops'][n]:.0f})" if n in r else "-"
        print(f"{r['shape']:<24}{cell('ksa'):>18}{cell('flex_gathered'):>18}{cell('flex_interleaved'):>20}"
              f"{cell('sdpa_dense'):>18}{r['diff_flex']:>12.2e}{r['diff_ref']:>11.2e}{r['diff_flex_ref']:>11.2e}")
    if not args.no_bwd:
        print("\nfwd+bwd (gradients of sum(out * g)): ms (useful TFLOP/s, 3.5 x forward FLOPs); ksa bwd = fwd+bwd - fwd;"
              " max rel diff of ksa's grads vs FlexAttention (gathered)")
        print(f"{'shape':<24}{'ksa':>18}{'ksa bwd':>10}{'flex gathered':>18}{'flex interleaved':>20}{'sdpa dense':>18}"
              f"{'dq':>10}{'dk':>10}{'dv':>10}")
        for r in rows:
            def cell_fb(n):
                return f"{r[n + '_fb']:.3f} ({r['tflops_fb'][n]:.0f})" if n + "_fb" in r else "-"
            gd = r["grad_diff_flex"]
            print(f"{r['shape']:<24}{cell_fb('ksa'):>18}{r['ksa_fb'] - r['ksa']:>10.3f}{cell_fb('flex_gathered'):>18}"
                  f"{cell_fb('flex_interleaved'):>20}{cell_fb('sdpa_dense'):>18}"
                  f"{gd['dq']:>10.2e}{gd['dk']:>10.2e}{gd['dv']:>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
