"""Measures what ksa_torch.context_parallel_attention moves between ranks and checks it against the formula of
docs/context_parallel.md.

    python3 python/examples/cp_comm_volume.py [--text 16384] [--ranks 4] [--k 8] [--S 1] [--W 16]
                                               [--hq 4] [--hkv 2] [--d 64] [--dtype float32] [--cuts 0,5000,...]

Forks --ranks processes on this machine (gloo, CPU), gives each a shard of one random stream (near-equal
stream rows, or the given first rows --cuts), runs one forward and backward, and counts per rank the bytes that
torch.distributed.all_to_all_single sends to and receives from other ranks (the function is wrapped in each
process; it is the only collective the attention uses when `rows` is given). Prints per rank: its rows, the
rows received forward by the formula and as measured, the bytes forward and backward, and the totals next to
an all-gather of every rank's K and V (the baseline of context parallelism for plain attention). Exits 1 when a
count differs from the formula.

The formula (one stream, B = 1, chunk c = k + S rows): a shard [a, b) with text rows, c_a = a // c, o = a - c_a c,
c_t and c_l the chunks of its first and last text rows, receives forward

    o + k * max(0, c_a - max(0, c_t - W)) + S * min(c_a, max(0, c_l - W))

rows (its first chunk's rows before a; the window's text before that chunk; the summaries before its first
chunk that its last text query sees as old), each 2 * Hkv * D elements (K and V); a shard without text rows
receives o. The backward sends the same rows' gradients back (same bytes), and every rank sends, forward, the
rows of its shard that the others receive (and receives their gradients backward).
"""
import argparse
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def formula_rows(rows, r, k, S, W, tail=False):
    """Rows rank r receives forward (the module docstring's formula)."""
    import ksa_torch
    c = k + S
    a = sum(rows[:r])
    b = a + rows[r]
    if b == a:
        return 0
    T = ksa_torch.text_length_of_stream(k, S, sum(rows), tail)
    full = T // k
    text = [x for x in range(a, b) if x % c < (k if x // c < full else T % k)]
    c_a, o = a // c, a % c
    if not text:
        return o
    c_t, c_l = text[0] // c, text[-1] // c
    return o + k * max(0, c_a - max(0, c_t - W)) + S * min(c_a, max(0, c_l - W))


def worker(rank, world, port, a, rows, out_dir):
    import ksa_torch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dtype = getattr(torch, a.dtype)
    gen = torch.Generator().manual_seed(1)
    L = sum(rows)
    q, k, v, g = (torch.randn(1, L, h, a.d, generator=gen).to(dtype) for h in (a.hq, a.hkv, a.hkv, a.hq))
    lo, hi = sum(rows[:rank]), sum(rows[:rank + 1])
    xs = [x[:, lo:hi].clone().requires_grad_() for x in (q, k, v)]
    counts = []
    real = dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        me = dist.get_rank(group)
        row_in = input.element_size() * (input[0].numel() if input.shape[0] else 0)
        row_out = output.element_size() * (output[0].numel() if output.shape[0] else 0)
        counts.append(dict(sent=sum(n for j, n in enumerate(input_split_sizes) if j != me) * row_in,
                           received=sum(n for j, n in enumerate(output_split_sizes) if j != me) * row_out,
                           rows_received=sum(n for j, n in enumerate(output_split_sizes) if j != me)))
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counted
    out = ksa_torch.context_parallel_attention(*xs, a.k, a.S, a.W, rows=rows)
    out.backward(g[:, lo:hi])
    dist.all_to_all_single = real
    torch.save(counts, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=int, default=16384, help="text tokens of the stream")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--S", type=int, default=1)
    ap.add_argument("--W", type=int, default=16)
    ap.add_argument("--hq", type=int, default=4)
    ap.add_argument("--hkv", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--cuts", default="", help="first stream row of each rank's shard, comma-separated (from 0)")
    a = ap.parse_args()
    import ksa_torch
    L = int(ksa_torch.stream_layout(a.text, a.k, a.S).max_seqlen)
    cuts = [int(x) for x in a.cuts.split(",")] if a.cuts else [L * r // a.ranks for r in range(a.ranks)]
    rows = tuple(y - x for x, y in zip(cuts, cuts[1:] + [L]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(worker, args=(len(rows), port, a, rows, d), nprocs=len(rows), start_method="fork")
        counts = [torch.load(os.path.join(d, f"{r}.pt")) for r in range(len(rows))]
    el = torch.tensor([], dtype=getattr(torch, a.dtype)).element_size()
    row_bytes = 2 * a.hkv * a.d * el
    print(f"stream: {a.text} text tokens, {L} rows, k={a.k} S={a.S} W={a.W}, Hq={a.hq} Hkv={a.hkv} D={a.d} "
          f"{a.dtype} ({row_bytes} bytes of K and V per row); {len(rows)} ranks, shards {list(rows)}")
    print(f"{'rank':>4} {'rows':>7} {'recv rows: formula':>19} {'measured':>9} {'fwd recv MiB':>12} "
          f"{'fwd sent MiB':>12} {'bwd recv MiB':>12} {'bwd sent MiB':>12}")
    bad = 0
    for r, c in enumerate(counts):
        fwd, bwd = c
        want = formula_rows(rows, r, a.k, a.S, a.W)
        ok = fwd["rows_received"] == want and fwd["received"] == want * row_bytes and bwd["sent"] == fwd["received"]
        bad += not ok
        print(f"{r:>4} {rows[r]:>7} {want:>19} {fwd['rows_received']:>9} {fwd['received'] / 2**20:>12.3f} "
              f"{fwd['sent'] / 2**20:>12.3f} {bwd['received'] / 2**20:>12.3f} {bwd['sent'] / 2**20:>12.3f}"
              + ("" if ok else "   <- differs from the formula"))
    total = sum(c[0]["received"] for c in counts)
    gather = sum(L - n for n in rows) * row_bytes
    print(f"forward, all ranks: {total / 2**20:.3f} MiB received (the backward returns as much); an all-gather of "
          f"K and V would move {gather / 2**20:.3f} MiB ({total / gather:.3f}x)")
    if bad:
        print(f"{bad} rank(s) differ from the formula")
        sys.exit(1)
    print("every rank: measured == formula")


if __name__ == "__main__":
    main()
