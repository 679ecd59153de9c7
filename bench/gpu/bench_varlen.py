"""Packed sequences on the GPU: ksa_torch.attention_varlen over documents of different lengths vs one stream
with the same number of visible pairs, and FlexAttention with a document mask, in the same run.

    python3 bench/gpu/bench_varlen.py [--total 131072] [--min 2048] [--max 32768] [--heads 32/8] [--dim 128]

Documents: lengths drawn uniformly in [min, max] text tokens (seeded) until they fill `total` text tokens
(the last one takes the rest; a rest below `min` is added to the previous document). Each document is its own
KSA stream (k, S, W), packed back to back (ksa_torch.stream_layout gives cu_seqlens). The single stream has
the fewest text tokens whose visible pairs (the core counter) reach the documents' total, so both do the same
useful work; the target is packed fwd+bwd <= 1.10 x single fwd+bwd. FlexAttention gets the same packed rows
with a mask_mod that adds "same document" to the KSA rule, in two orders: the interleaved stream, and each
document gathered (its text, then its summaries; ksa's own internal order). Prints medians (ms, CUDA events,
two input sets rotated), useful TFLOP/s from the pair count, and the max |ksa - flex| of the outputs.
"""
import argparse
import random

import torch
from torch.nn.attention.flex_attention import create_block_mask

import ksa_torch
from bench_attention import bench, flex, gathered_perm, ksa_mask, tokens


def doc_lengths(total, lo, hi, seed):
    rng = random.Random(seed)
    out = []
    while sum(out) < total:
        n = min(rng.randint(lo, hi), total - sum(out))
        if n < lo and out:
            out[-1] += n
        else:
            out.append(n)
    return out


def pairs_of(lengths, k, S, W):
    return sum(ksa_torch.count_visible_pairs(k, S, T, W) for T in lengths)


def single_T_for(pairs, k, S, W):
    lo, hi = 1, 1
    while ksa_torch.count_visible_pairs(k, S, hi, W) < pairs:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if ksa_torch.count_visible_pairs(k, S, mid, W) < pairs:
            lo = mid + 1
        else:
            hi = mid
    return lo


def doc_tokens(lengths, k, S, order):
    """Per packed row: document id, chunk, index, is-summary; rows in stream order or per-document gathered
    order; and the permutation (gathered row -> stream row) for the latter."""
    docs, chunks, idxs, summs, perm = [], [], [], [], []
    row0 = 0
    for d, T in enumerate(lengths):
        c, i, s = tokens(T, k, S, order)
        docs.append(torch.full_like(c, d))
        chunks.append(c), idxs.append(i), summs.append(s)
        perm.append(gathered_perm(T, k, S) + row0)
        row0 += c.numel()
    return torch.cat(docs), torch.cat(chunks), torch.cat(idxs), torch.cat(summs), torch.cat(perm)


def doc_mask(doc, chunk, idx, summ, W):
    rule = ksa_mask(chunk, idx, summ, W)

    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & rule(b, h, q, kv)
    return mask_mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=131072, help="text tokens over all documents")
    ap.add_argument("--min", type=int, default=2048)
    ap.add_argument("--max", type=int, default=32768)
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--S", type=int, default=1)
    ap.add_argument("--W", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-interleaved", action="store_true", help="skip FlexAttention on the interleaved stream")
    a = ap.parse_args()
    Hq, Hkv = (int(x) for x in a.heads.split("/"))
    k, S, W, D, dev = a.k, a.S, a.W, a.dim, "cuda"
    lengths = doc_lengths(a.total, a.min, a.max, a.seed)
    st = ksa_torch.stream_layout(lengths, k, S)
    N = int(st.cu_seqlens[-1])
    pairs = pairs_of(lengths, k, S, W)
    T1 = single_T_for(pairs, k, S, W)
    L1 = ksa_torch.stream_layout(T1, k, S).max_seqlen
    flops = 4.0 * D * pairs * Hq
    print(f"{len(lengths)} documents, {sum(lengths)} text tokens, {N} stream rows, lengths {lengths}")
    print(f"visible pairs/head {pairs}; single stream of the same work: T={T1} ({L1} rows, "
          f"{ksa_torch.count_visible_pairs(k, S, T1, W)} pairs); heads {Hq}/{Hkv}, D={D}, k={k} S={S} W={W}, bf16")

    gen = torch.Generator(device=dev).manual_seed(a.seed)

    def make(rows, sets=2, batch=False):
        shape = (1, rows) if batch else (rows,)
        return [tuple(torch.randn(*shape, h, D, device=dev, dtype=torch.bfloat16, generator=gen)
                      for h in (Hq, Hkv, Hkv, Hq)) for _ in range(sets)]

    def leaves(data):
        return [tuple(t.detach().clone().requires_grad_() for t in d[:3]) + (d[3],) for d in data]

    def grad_step(fn):
        def step(q, kk, v, g):
            return torch.autograd.grad(fn(q, kk, v), (q, kk, v), g)
        return step

    cu = st.cu_seqlens.to(dev)
    cu_host = st.cu_seqlens  # a host copy spares the binding a device-to-host read per call

    def varlen(q, kk, v):
        return ksa_torch.attention_varlen(q, kk, v, cu_host, st.max_seqlen, k, S, W)

    def single(q, kk, v):
        return ksa_torch.attention(q, kk, v, k, S, W)

    packed, one = make(N), make(L1, batch=True)
    res = {}
    res["varlen fwd"] = bench(lambda q, kk, v, g: varlen(q, kk, v), packed, reps=a.reps)
    res["single fwd"] = bench(lambda q, kk, v, g: single(q, kk, v), one, reps=a.reps)
    res["varlen fwd+bwd"] = bench(grad_step(varlen), leaves(packed), reps=a.reps)
    res["single fwd+bwd"] = bench(grad_step(single), leaves(one), reps=a.reps)
    res["varlen fwd, device cu_seqlens"] = bench(
        lambda q, kk, v, g: ksa_torch.attention_varlen(q, kk, v, cu, st.max_seqlen, k, S, W), packed, reps=a.reps)

    diffs = {}
    if not a.no_flex:
        q, kk, v, g = packed[0]
        out_ksa = varlen(q, kk, v)
        orders = ["gathered"] + ([] if a.no_interleaved else ["stream"])
        for order in orders:
            doc, ch, ix, sm, perm = (t.to(dev) for t in doc_tokens(lengths, k, S, order))
            bm = create_block_mask(doc_mask(doc, ch, ix, sm, W), 1, 1, N, N, device=dev, _compile=True)
            sel = perm if order == "gathered" else torch.arange(N, device=dev)
            fdata = [tuple(t[sel].unsqueeze(0).transpose(1, 2).contiguous() for t in d) for d in packed]

            def ffn(q, kk, v, bm=bm):
                return flex(q, kk, v, block_mask=bm, enable_gqa=Hq != Hkv)

            name = f"flex ({order}, document mask)"
            try:
                res[name + " fwd"] = bench(lambda q, kk, v, g: ffn(q, kk, v), fdata, reps=a.reps)
                res[name + " fwd+bwd"] = bench(grad_step(ffn), leaves(fdata), reps=max(3, a.reps // 3))
                out_f = torch.empty_like(out_ksa)
                out_f[sel] = ffn(*fdata[0][:3]).transpose(1, 2)[0]
                diffs[order] = (out_ksa.float() - out_f.float()).abs().max().item()
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                torch.cuda.empty_cache()

    print(f"\n{'':44s} {'ms':>9s} {'TFLOP/s':>8s}")
    for name, ms in res.items():
        fb = "fwd+bwd" in name
        tf = (3.5 if fb else 1.0) * flops / (ms * 1e-3) / 1e12  # FlashAttention convention: fwd+bwd = 3.5 x fwd
        print(f"{name:44s} {ms:9.3f} {tf:8.1f}")
    ratio = res["varlen fwd+bwd"] / res["single fwd+bwd"]
    print(f"\npacked / single-stream fwd+bwd: {ratio:.3f} (target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'}); "
          f"fwd {res['varlen fwd'] / res['single fwd']:.3f}")
    for order, d in diffs.items():
        print(f"max |ksa varlen - flex ({order})| = {d:.3e}")


if __name__ == "__main__":
    main()
