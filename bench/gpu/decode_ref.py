"""PyTorch references for `ksa bench-decode`'s B=1 cases, timed the way its `step us` column is.

One decode step of one layer, 32 query / 8 KV heads, D=128, bf16, over exactly the key rows the KSA step
sees (`--rows`, the bench's "key rows" column: 2945 at T=16K, 17281 at T=128K), laid out contiguously:
  * sdpa-gqa:   F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
  * repeat-kv:  the release's path: K/V repeated to 32 heads, then SDPA
Timing: median of CUDA events around one call, each call behind a 256 MiB zero_() (cold L2, the host's
launch overlapped; triton.testing.do_bench's convention): called eagerly (`eager us`) and as a replay of the
call captured in a CUDA graph (`graph us`; compare with `ksa bench-decode`'s `step us`, timed the same way).
    python3 bench/gpu/decode_ref.py [--rows 2945,17281] [--reps 50]
"""
import argparse

import torch
import torch.nn.functional as F


def median_us(fn, flush, reps):
    fn()
    torch.cuda.synchronize()
    t = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        t.append(a.elapsed_time(b) * 1e3)
    t.sort()
    return t[len(t) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="2945,17281")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    Hq, Hkv, D = 32, 8, 128
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'rows':>8} {'path':>10} {'eager us':>9} {'graph us':>9} {'GB/s':>8}")
    for L in (int(x) for x in args.rows.split(",")):
        g = torch.Generator(device="cuda").manual_seed(L)
        q = torch.randn(1, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
        paths = {
            "sdpa-gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            "repeat-kv": lambda: F.scaled_dot_product_attention(
                q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)),
        }
        ref = paths["sdpa-gqa"]().float()
        for name, fn in paths.items():
            assert (fn().float() - ref).abs().max().item() < 2e-2, name
            us = median_us(fn, flush, args.reps)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            gus = median_us(graph.replay, flush, args.reps)
            gbs = 2 * L * Hkv * D * 2 / (min(us, gus) * 1e-6) / 1e9
            print(f"{L:>8} {name:>10} {us:>9.2f} {gus:>9.2f} {gbs:>8.1f}")


if __name__ == "__main__":
    main()
