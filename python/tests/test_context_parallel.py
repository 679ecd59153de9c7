"""ksa_torch.context_parallel_attention: one stream sharded over 2 and 4 processes (gloo on this machine).

Every case gives each rank a shard of a random stream (fixed seed; boundaries chosen to be awkward: in a
chunk's text, between the two summaries of a chunk, in a summarised tail's summaries, shards shorter than the
window, a shard without summary rows, an empty shard), runs the forward and the backward of
context_parallel_attention on every rank, and the parent puts the shards' out, lse, dq, dk, dv back together.

Tolerance (docs/design.md: tolerances): against the float64 oracle on the whole stream, the sharded result may
err by at most 4x what single-process ksa_torch.attention in the same dtype errs, plus the rounding floor of the dtype
(2^-20 of the largest magnitude in float32, 2^-8 in bfloat16). The sharded result sums in another order (the
halo's keys in their own tiles, the prefix summaries in plain matrix products, a log-sum-exp merge), so equal
bits are not expected; a missing or extra key would be an O(1) error.

Also: the rows each rank receives are exactly the keys before its shard that its queries see (the core's rule,
visible_mask: no gap, no extra) and as many as the formula of docs/context_parallel.md says
(python/examples/cp_comm_volume.py), and the bytes the collectives move are those rows' K and V forward and
their gradients backward, counted by wrapping torch.distributed.all_to_all_single in the processes.

And ksa_train's model with a Shard (python/examples/train_cp.py's path) against the same model unsharded.

The processes are forked (spawn would import torch again in each: ~3 s apiece on the 2-core CI machine), or
spawned once the session has used CUDA; all
cases of one world size run in one process group. Each child uses one intra-op thread. The `cuda` variant
spawns one process per GPU (2 to 4) with NCCL; it skips without 2 devices.
"""
import os
import pathlib
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ksa_torch
from ksa_torch import context_parallel as cp
from common import grid_randn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from cp_comm_volume import formula_rows  # noqa: E402  (the formula of docs/context_parallel.md)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()) or sys.platform != "linux",
                                reason="needs torch.distributed with gloo and fork (Linux)")


def stream_len(k, S, T, tail):
    return int(ksa_torch.stream_layout(T, k, S, tail).max_seqlen)


def case(name, cuts, k, S, T, W, tail=False, Hq=4, Hkv=2, D=8, B=1, dtype=torch.float32, three_dim=False):
    """cuts: the first stream row of every rank's shard (the first is 0)."""
    L = stream_len(k, S, T, tail)
    assert cuts[0] == 0 and all(a <= b for a, b in zip(cuts, cuts[1:] + [L])), (name, cuts, L)
    rows = tuple(b - a for a, b in zip(cuts, cuts[1:] + [L]))
    return dict(name=name, rows=rows, k=k, S=S, T=T, W=W, tail=tail, Hq=Hq, Hkv=Hkv, D=D, B=B, dtype=dtype,
                three_dim=three_dim)


# k=4, S=2: chunks of 6 rows, text at offsets 0..3, summaries at 4, 5. W=2: the window is 12 rows.
CASES = {
    2: [
        case("mid-chunk text", [0, 15], 4, 2, 30, 2),                         # row 15: chunk 2, text offset 3
        case("between two summaries", [0, 23], 4, 2, 30, 2),                 # row 23: chunk 3, summary 1
        case("S=1 long, MHA, B=2", [0, 170], 8, 1, 300, 3, Hq=2, Hkv=2, D=16, B=2),
        case("W=0", [0, 20], 4, 1, 40, 0),
        case("W >= chunks (causal text)", [0, 20], 4, 1, 40, 100, three_dim=True),
        case("bfloat16", [0, 101], 8, 1, 200, 2, D=16, dtype=torch.bfloat16),
    ],
    4: [
        # shard 0: 3 text rows (no summary row); 1: 7 rows; 2: 1 row (a summary); 3: the rest. All but the last
        # are shorter than the window (12 rows).
        case("short shards", [0, 3, 10, 11], 4, 2, 30, 2),
        case("summarised tail, last shard in its summaries", [0, 12, 30, 51], 4, 2, 35, 2, tail=True),  # L = 52
        case("an empty shard", [0, 40, 40, 77], 8, 1, 100, 1),
        case("S=2 long, GQA 4/2", [0, 64, 129, 200], 8, 2, 250, 4, D=16),
        case("S=1, cuts at chunk boundaries", [0, 9, 18, 27], 8, 1, 40, 1),
    ],
    # CUDA (NCCL, one GPU per rank, up to 4; the kernels take D = 64 or 128, bf16/f16).
    "nccl": [
        case("cuda bf16 GQA", [0, 700, 1409, 1700], 8, 1, 2000, 16, Hq=8, Hkv=2, D=64, dtype=torch.bfloat16),
        case("cuda bf16 S=2 D=128", [0, 333, 334, 1000], 8, 2, 1200, 4, Hq=4, Hkv=4, D=128, dtype=torch.bfloat16),
        case("cuda f16 W >= chunks", [0, 100, 611, 777], 4, 1, 900, 1000, Hq=4, Hkv=1, D=64, dtype=torch.float16),
    ],
}


def inputs(c, seed):
    gen = torch.Generator().manual_seed(seed)
    L = sum(c["rows"])
    q, k, v, g = (grid_randn(c["B"], L, h, c["D"], generator=gen).to(c["dtype"]) for h in (c["Hq"], c["Hkv"], c["Hkv"], c["Hq"]))
    return q, k, v, g


def counted_all_to_all(counter):
    """torch.distributed.all_to_all_single, counting the bytes this rank sends to other ranks and receives."""
    real = dist.all_to_all_single

    def wrapped(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        me = dist.get_rank(group)
        row_in = input.element_size() * (input[0].numel() if input.shape[0] else 0)
        row_out = output.element_size() * (output[0].numel() if output.shape[0] else 0)
        counter["sent"] += sum(n for r, n in enumerate(input_split_sizes) if r != me) * row_in
        counter["received"] += sum(n for r, n in enumerate(output_split_sizes) if r != me) * row_out
        counter["calls"] += 1
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    return real, wrapped


def cuda_world():
    return min(4, torch.cuda.device_count())


def shards_for(c, world):
    """c's shards for `world` ranks: the first world - 1 cuts and the rest of the stream in the last shard."""
    cuts = [sum(c["rows"][:i]) for i in range(len(c["rows"]))][:world]
    L = sum(c["rows"])
    return dict(c, rows=tuple(b - a for a, b in zip(cuts, cuts[1:] + [L])))


def worker(rank, world, port, out_dir, key):
    torch.set_num_threads(1)
    if key == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if key == "nccl" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    dev = torch.device("cuda", rank) if key == "nccl" else torch.device("cpu")
    results = []
    try:
        for i, c in enumerate(CASES[key]):
            c = shards_for(c, world)
            q, k, v, g = (x.to(dev) for x in inputs(c, 100 + i))
            a = sum(c["rows"][:rank])
            n = c["rows"][rank]
            xs = [x[:, a:a + n].clone().requires_grad_() for x in (q, k, v)]
            counter = {"sent": 0, "received": 0, "calls": 0}
            real, wrapped = counted_all_to_all(counter)
            dist.all_to_all_single = wrapped
            try:
                args = [x[0] if c["three_dim"] else x for x in xs]
                out, lse = ksa_torch.context_parallel_attention(*args, c["k"], c["S"], c["W"], None, c["tail"],
                                                                return_lse=True, rows=c["rows"] if i % 2 else None)
                if c["three_dim"]:
                    out, lse = out[None], lse[None]
                out.backward(g[:, a:a + n])
            finally:
                dist.all_to_all_single = real
            results.append({name: x.cpu() for name, x in dict(out=out.detach(), lse=lse, dq=xs[0].grad,
                                                              dk=xs[1].grad, dv=xs[2].grad).items()} | counter)
        if key != "nccl":
            results.append(sharded_model_step(rank, world))
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def tiny_model():
    """A 2-layer ksa_train model: a KSA layer (W = 1) and a plain causal layer (W covers every chunk)."""
    import ksa_train.model as M
    torch.manual_seed(5)
    cfg = M.Config(text_vocab=64, hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, head_dim=8, chunk_size=4,
                   S=2, windows=[1, 1], summary_layers=[1, 0], eos_id=63)
    text = torch.randint(0, 64, (2, 47), generator=torch.Generator().manual_seed(6))
    return M, M.KsaLM(cfg), text


def sharded_model_step(rank, world):
    """The model's loss (sum over this shard's text tokens) and, summed over the ranks, the parameters'
    gradients, with the stream cut into near-equal shards (python/examples/train_cp.py's cut)."""
    M, model, text = tiny_model()
    inp, tgt = text[:, :-1], text[:, 1:]
    L = model.stream(inp)[0].shape[1]
    shard = M.Shard.even(L, None, rank, world)
    t0, t1 = shard.text_range(model.text_rows(inp.shape[1], inp.device))
    logits = model(inp, shard=shard)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tgt[:, t0:t1].reshape(-1), reduction="sum")
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    return dict(model=True, loss=total, grads=grads, rows=shard.rows)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(key, world, tmp_path):
    # CUDA cannot be used in a forked child once the parent has touched it, and torch (2.11 seen) refuses a
    # backward in a forked child once the parent's autograd engine has started its device threads (any CUDA
    # backward earlier in the session): spawn there.
    fork_ok = key != "nccl" and not torch.cuda.is_initialized()
    mp.start_processes(worker, args=(world, free_port(), str(tmp_path), key), nprocs=world,
                       start_method="fork" if fork_ok else "spawn")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    return [[per_rank[r][i] for r in range(world)] for i in range(len(per_rank[0]))]


def reference(c, seed, device="cpu"):
    """out, lse, dq, dk, dv of single-process attention over the whole stream, in c's dtype (on `device`) and
    in float64 (the CPU oracle)."""
    q, k, v, g = inputs(c, seed)
    res = {}
    for dt in (c["dtype"], torch.float64):
        dv = device if dt != torch.float64 else "cpu"
        xs = [x.to(device=dv, dtype=dt).clone().requires_grad_() for x in (q, k, v)]
        out, lse = ksa_torch.attention(*xs, c["k"], c["S"], c["W"], c["tail"], return_lse=True)
        out.backward(g.to(device=dv, dtype=dt))
        res[dt] = {name: x.cpu() for name, x in dict(out=out.detach(), lse=lse, dq=xs[0].grad, dk=xs[1].grad,
                                                      dv=xs[2].grad).items()}
    return res[c["dtype"]], res[torch.float64]


def seen_before(c):
    """seen[r][j]: how many rows of shard j some query of shard r sees (j != r), from the core's rule."""
    mask = ksa_torch.visible_mask(c["k"], c["S"], c["T"], c["W"], c["tail"])
    off = [sum(c["rows"][:i]) for i in range(len(c["rows"]) + 1)]
    return [[int(mask[off[r]:off[r + 1], off[j]:off[j + 1]].any(dim=0).sum()) if j != r else 0
             for j in range(len(c["rows"]))] for r in range(len(c["rows"]))]


def check_world(key, world, tmp_path, device="cpu"):
    t0 = time.time()
    all_results = run_world(key, world, tmp_path)
    spent = time.time() - t0
    worst = {}
    if key != "nccl":
        check_model(all_results.pop()[0], world)
    for i, (c, shards) in enumerate(zip(CASES[key], all_results)):
        c = shards_for(c, world)
        got = {name: torch.cat([s[name] for s in shards], dim=1) for name in ("out", "lse", "dq", "dk", "dv")}
        single, f64 = reference(c, 100 + i, device)
        floor = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(c["dtype"], 2.0 ** -20)
        for name in got:
            ref = f64[name].double()
            err = (got[name].double() - ref).abs().max().item()
            err_single = (single[name].double() - ref).abs().max().item()
            tol = 4 * err_single + floor * max(1.0, ref.abs().max().item())
            worst[(c["name"], name)] = (err, tol)
            assert err <= tol, f"{c['name']} ({world} ranks, rows {c['rows']}): {name} max error {err:.3g} vs float64, " \
                               f"single process {err_single:.3g}, tolerance {tol:.3g}"
        # The bytes moved to and from other ranks: forward, K and V of the rows of other shards this shard's
        # queries see, and of this shard's rows that other shards' queries see; backward, their gradients the
        # other way. Exactly those rows (the rule's), each once per direction.
        row_bytes = c["B"] * 2 * c["Hkv"] * c["D"] * torch.tensor([], dtype=c["dtype"]).element_size()
        seen = seen_before(c)
        for r, s in enumerate(shards):
            assert s["calls"] == 2, s["calls"]  # one all_to_all_single forward, one backward
            moved = (sum(seen[r]) + sum(seen[j][r] for j in range(world))) * row_bytes
            assert s["sent"] == moved and s["received"] == moved, (c["name"], r, s["sent"], s["received"], moved)
    print(f"\n{key}: {world} ranks, {len(CASES[key])} cases: {spent:.2f} s (start, init, forward, backward); "
          f"largest error/tolerance {max(e / t for e, t in worst.values()):.3f}")


def check_model(got, world):
    """ksa_train's model with a Shard (python/examples/train_cp.py's path) against the same model unsharded:
    the summed loss and the summed parameter gradients (fp32; 1e-5 relative: the attention's own error)."""
    M, model, text = tiny_model()
    inp, tgt = text[:, :-1], text[:, 1:]
    loss = torch.nn.functional.cross_entropy(model(inp).reshape(-1, 64), tgt.reshape(-1), reduction="sum")
    loss.backward()
    assert abs(got["loss"].item() - loss.item()) <= 1e-5 * abs(loss.item()), (got["loss"].item(), loss.item())
    for n, p in model.named_parameters():
        err, ref = (got["grads"][n] - p.grad).norm().item(), p.grad.norm().item()
        assert err <= 1e-5 * ref, (world, got["rows"], n, err, ref)  # 0 for layer 0's q_proj_summary (no effect)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_single_process(world, tmp_path):
    check_world(world, world, tmp_path)


def test_one_rank_equals_single_process(tmp_path):
    """A group of one rank: the whole stream is its shard, nothing to receive (the exchange still runs, with
    empty splits), and the model step is the unsharded one."""
    check_world(2, 1, tmp_path)


@pytest.mark.cuda
def test_sharded_equals_single_process_cuda_nccl(tmp_path):
    if cuda_world() < 2 or not dist.is_nccl_available():
        pytest.skip(f"needs 2 CUDA devices and NCCL (found {torch.cuda.device_count()} devices)")
    check_world("nccl", cuda_world(), tmp_path, device="cuda")


@pytest.mark.cuda
def test_one_rank_cuda_nccl(tmp_path):
    """What one GPU allows: the CUDA kernels under the context-parallel wrapper, over an NCCL group of one."""
    if torch.cuda.device_count() < 1 or not dist.is_nccl_available():
        pytest.skip(f"needs a CUDA device and NCCL (found {torch.cuda.device_count()} devices)")
    check_world("nccl", 1, tmp_path, device="cuda")


@pytest.mark.parametrize("key", [2, 4, "nccl"])
def test_received_rows_are_exactly_the_visible_keys(key):
    """No gap, no extra: rank r receives exactly the rows before its shard that some query of its shard sees."""
    for c in CASES[key]:
        world = len(c["rows"])
        mask = ksa_torch.visible_mask(c["k"], c["S"], c["T"], c["W"], c["tail"])
        for r in range(world):
            plan = cp.make_plan(c["rows"], r, c["k"], c["S"], c["W"], c["tail"])
            a, b = plan.a, plan.b
            want = torch.nonzero(mask[a:b, :a].any(dim=0)).flatten().tolist() if b > a else []
            got = []
            for j in range(world):
                pj = cp.make_plan(c["rows"], j, c["k"], c["S"], c["W"], c["tail"])
                start = sum(pj.send_counts[:r])
                got += (pj.send_rows[start:start + pj.send_counts[r]] + pj.a).tolist()
            assert got == want, (c["name"], r, got, want)
            assert len(got) == formula_rows(c["rows"], r, c["k"], c["S"], c["W"], c["tail"]), (c["name"], r)
            assert len(got) == plan.recv_rows and (plan.halo_index + plan.h0).tolist() == got[plan.prefix:]
            # Part B's keys (the prefix) are seen by every text query of the shard and by no summary query.
            if b > a and plan.prefix:
                pre = torch.tensor(got[:plan.prefix])
                is_text = torch.zeros(b - a, dtype=torch.bool)
                is_text[plan.text_rows] = True
                assert mask[a:b][is_text][:, pre].all() and not mask[a:b][~is_text][:, pre].any()


def test_errors():
    with pytest.raises(ValueError, match="not the length of a KSA stream"):
        cp.make_plan((5, 4), 0, 4, 1, 1)  # 9 rows: 4 text + 1 summary + 4 text need a summary
    with pytest.raises(TypeError, match="float64"):
        ksa_torch.context_parallel_attention(torch.zeros(1, 2, 1, 4, dtype=torch.float64),
                                             torch.zeros(1, 2, 1, 4, dtype=torch.float64),
                                             torch.zeros(1, 2, 1, 4, dtype=torch.float64), 4, 1, 1)
