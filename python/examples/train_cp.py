"""Context-parallel training of the ksa_train model (python/ksa_train/model.py): every sequence's KSA stream
is cut into --cp shards, one per rank of a context-parallel group, and each layer's attention runs through
ksa_torch.context_parallel_attention (docs/context_parallel.md). Ranks beyond one group form data-parallel
replicas (world = dp x cp); the parameters are replicated with DDP (or sharded with FSDP2's fully_shard where
the torch has it: --fsdp2), whose gradient averaging over all ranks, with the loss scaled by --cp, gives each
replica's full-sequence gradient averaged over the replicas.

    torchrun --nproc_per_node 2 python/examples/train_cp.py --device cpu --steps 5            # gloo
    torchrun --nproc_per_node 4 python/examples/train_cp.py --device cuda --cp 4 --seq 32768  # NCCL, one GPU per rank

Data: a fixed random batch per replica to memorise (the loss must fall), or --data DIR (a folder of
python -m ksa_train.prepare; rows of --seq text tokens). --check compares the first step's loss and
gradients with the same model run unsharded on every replica's batch (each rank recomputes them all).
The shards are near-equal runs of stream rows, so their boundaries fall anywhere in a chunk.
"""
import argparse
import copy
import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:  # installed beside ksa_torch (pip install ./python); else from this checkout (an editable install)
    import ksa_train  # noqa: F401
except ImportError:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ksa_train.model import Config, KsaLM, Shard, add_shape_args  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cp", type=int, default=0, help="ranks per context-parallel group (default: all)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=1024, help="text tokens per sequence")
    ap.add_argument("--batch", type=int, default=2, help="sequences per replica")
    ap.add_argument("--data", default="", help="a prepared data folder (python -m ksa_train.prepare); else random")
    ap.add_argument("--vocab", type=int, default=256, help="random data: text vocabulary")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--attn", default="ksa", choices=["ksa", "swa", "full"])
    add_shape_args(ap, hidden=128, layers=2, window=4)
    ap.add_argument("--fsdp2", action="store_true", help="shard the parameters with fully_shard (torch >= 2.4)")
    ap.add_argument("--check", action="store_true", help="compare step 0 with the unsharded model")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def fully_shard_fn():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
        return fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
            return fully_shard
        except ImportError:
            return None


def batch_of(replica, a, vocab_text, dev, data):
    """The (inputs, targets) [B, seq] of a data-parallel replica: the same on every rank of its group."""
    if data is not None:
        x, y, _ = data[replica].next(a.batch)
        return x.to(dev), y.to(dev)
    g = torch.Generator().manual_seed(a.seed * 1000 + replica)
    t = torch.randint(0, vocab_text, (a.batch, a.seq + 1), generator=g)
    return t[:, :-1].to(dev), t[:, 1:].to(dev)


def loss_of(logits, targets):
    """Sum of the next-token losses of these logits' tokens (fp32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def main():
    a = parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cp = a.cp or world
    if world % cp:
        sys.exit(f"train_cp: --cp {cp} must divide the world size {world}")
    dp, replica, cp_rank = world // cp, rank // cp, rank % cp
    groups = [dist.new_group(list(range(r * cp, (r + 1) * cp))) for r in range(dp)]  # every rank creates every group
    group = groups[replica]

    data, vocab_text = None, a.vocab
    if a.data:
        import json
        from ksa_train.data import Batches
        pk = json.loads((pathlib.Path(a.data) / "passkey.json").read_text())
        vocab_text = pk["text_vocab"]
        data = [Batches(a.data, "train", a.seq, seed=a.seed + 1 + r, passkey_frac=0.0) for r in range(dp)]
    torch.manual_seed(a.seed)  # the same initial parameters on every rank
    cfg = Config(text_vocab=vocab_text, hidden=a.hidden, intermediate=3 * a.hidden, layers=a.layers, heads=a.heads,
                 kv_heads=a.kv_heads, head_dim=a.head_dim, attn=a.attn, chunk_size=a.chunk_size, S=a.S,
                 windows=[a.window] * a.layers, eos_id=vocab_text - 1, max_positions=max(8192, a.seq))
    model = KsaLM(cfg).to(dev)
    reference = copy.deepcopy(model) if a.check else None
    if a.fsdp2:
        fully_shard = fully_shard_fn()
        if fully_shard is None:
            sys.exit(f"train_cp: --fsdp2 needs torch >= 2.4 (this is {torch.__version__}); leave it out for DDP")
        for layer in model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)  # inputs are already on the device
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda"
           else torch.autocast(device_type="cpu", enabled=False))

    L = model.stream(torch.zeros(1, a.seq, dtype=torch.int64, device=dev))[0].shape[1]  # stream rows per sequence
    shard = Shard.even(L, group, cp_rank, cp)
    t0, t1 = shard.text_range(model.text_rows(a.seq, dev))  # this shard's text tokens
    if rank == 0:
        print(f"train_cp: world {world} = {dp} replica(s) x {cp}-way context parallel ({'FSDP2' if a.fsdp2 else 'DDP'}, "
              f"{dist.get_backend()}), {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"attn {a.attn} k {cfg.chunk_size} S {cfg.S} W {a.window}; {a.batch} x {a.seq} text tokens = {L} stream "
              f"rows per sequence, shards {list(shard.rows)}", flush=True)
    losses = []
    for step in range(a.steps):
        x, y = batch_of(replica, a, vocab_text, dev, data)
        t_start = time.time()
        with amp:
            logits = wrapped(x, shard=shard)               # [B, t1 - t0, vocab]: this shard's text tokens
        local = loss_of(logits, y[:, t0:t1])
        n_tokens = y.numel()
        # DDP/FSDP average the gradients over all world ranks; a replica's loss is the sum of its cp shards'.
        (local * (cp / n_tokens)).backward()
        with torch.no_grad():
            total = local.detach().clone()
            dist.all_reduce(total)                         # every replica's sum
            loss = total.item() / (n_tokens * dp)
        if a.check and step == 0:
            check(a, model, reference, dp, vocab_text, dev, data, amp, loss, rank)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t_start
        losses.append(loss)
        if rank == 0:
            print(f"step {step:3d}  loss {loss:.4f}  {dt * 1e3:.0f} ms  "
                  f"{a.batch * a.seq * dp / dt:,.0f} tok/s", flush=True)
    if rank == 0 and a.steps >= 5 and not a.data:
        assert losses[-1] < losses[0], f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
        print(f"ok: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    dist.destroy_process_group()


def check(a, model, reference, dp, vocab_text, dev, data, amp, loss, rank):
    """The first step's loss and gradients (averaged over the replicas, as DDP/FSDP leave them) against the
    unsharded model on every replica's batch."""
    if data is not None:
        print("train_cp: --check runs on the random data only", flush=True)
        return
    ref_loss = 0.0
    for r in range(dp):
        x, y = batch_of(r, a, vocab_text, dev, None)
        with amp:
            logits = reference(x)
        lr = loss_of(logits, y) / (y.numel() * dp)
        lr.backward()
        ref_loss += lr.item()
    worst = 0.0
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        err = ((g.float() - q.grad.float()).norm() / q.grad.float().norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
    tol = 2e-2 if dev.type == "cuda" else 1e-4  # bf16 autocast on CUDA; fp32 on the CPU
    print(f"rank {rank}: check: loss {loss:.6f} vs unsharded {ref_loss:.6f}; largest relative L2 gradient "
          f"difference {worst:.2e} (tolerance {tol:g})", flush=True)
    assert abs(loss - ref_loss) <= tol * abs(ref_loss) and worst <= tol, "the sharded step differs from the unsharded one"


if __name__ == "__main__":
    main()
