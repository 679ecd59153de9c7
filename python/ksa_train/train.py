"""Trains a Qwen3-KSA language model (or a baseline of the same shape) on prepared data and exports it.

    python3 -m ksa_train.train --data DIR --out OUT [--attn ksa|swa|full] [--steps N] [--batch B] [--seq T] ...

OUT/: log.txt (the progress lines), loss.csv (step, tokens, loss, answer loss, lr, seconds), ckpt.pt (model
and optimizer, every --ckpt-every steps and at the end; --resume continues from it), loss.png (when matplotlib
is there; else `python3 -m ksa_train.plot` draws it from the CSVs), summary.json, and model/ (the exported
checkpoint: config.json, model.safetensors in bf16, generation_config.json, tokenizer.json,
tokenizer_config.json, ksa_train_config.json) that `ksa generate -m OUT/model` loads.

Recipe: AdamW (betas 0.9/0.95, weight decay on matrices), linear warm-up then cosine decay to 10% of the peak
learning rate, gradient clipping, bf16 autocast on CUDA (fp32 on the CPU), loss = mean cross-entropy over every
next-token text target plus --answer-weight (1) times the mean loss of the passkey answer digits (their own
term, so that 5 answer tokens per row are not drowned by 4,000 text tokens). The schedule is a function
of --steps alone; --stop-at N stops after step N (the same tokens as another run stopped there), and
--max-seconds stops earlier when the wall clock runs out (summary.json says at which step).
"""
import argparse
import csv
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

from .data import Batches
from .model import Config, KsaLM, add_shape_args, export


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="prepared data folder (ksa_train.prepare)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--attn", default="ksa", choices=["ksa", "swa", "full"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=1000, help="steps of the schedule")
    ap.add_argument("--stop-at", type=int, default=0, help="stop after this step (0: --steps)")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop when this much time has passed (0: no limit)")
    ap.add_argument("--time-budget", type=float, default=0,
                    help="fit the schedule to this many seconds: after --probe-steps steps, --steps becomes what the "
                         "measured step time allows (at most the given --steps); summary.json has the result")
    ap.add_argument("--probe-steps", type=int, default=30)
    ap.add_argument("--sync-dir", default="",
                    help="runs trained side by side: each writes its fitted step count here and all take the smallest")
    ap.add_argument("--fit-margin", type=float, default=1.0,
                    help="fit the schedule to this fraction of the time left after the probe (side by side: 0.92)")
    ap.add_argument("--sync-count", type=int, default=1, help="how many runs share --sync-dir")
    ap.add_argument("--eval-trials", type=int, default=20, help="passkey trials per distance after training (0: none)")
    ap.add_argument("--eval-lengths", default="256,512,1024,2048,4096")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4224, help="text tokens per row")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--passkey-frac", type=float, default=0.5, help="fraction of rows with a passkey")
    ap.add_argument("--answer-weight", type=float, default=1.0,
                    help="loss = mean text loss + this x mean loss of the passkey answer digits")
    ap.add_argument("--min-dist", type=int, default=16)
    ap.add_argument("--max-dist", type=int, default=0, help="longest passkey distance (0: what fits in a row)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--ckpt-every", type=int, default=0, help="save ckpt.pt every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (torch >= 2.4)")
    # Shape.
    add_shape_args(ap, hidden=256, layers=6, window=16)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--mix-coeff", type=float, default=1.0)
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout on the embeddings and residual branches")
    ap.add_argument("--max-positions", type=int, default=8192)
    return ap.parse_args(argv)


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def agree_steps(sync_dir, name, fit, count, say, timeout=300.0):
    """Runs trained side by side (bench/gpu/train.sh, TRAIN_PARALLEL=1) fit their schedules to the same time
    budget while sharing the GPU; each writes its fitted step count into sync_dir and all take the smallest, so
    that the models see the same batches and the same schedule. Waits at most `timeout` seconds for the others."""
    d = pathlib.Path(sync_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.tmp"
    tmp.write_text(str(fit))
    tmp.rename(d / f"{name}.steps")
    t0 = time.time()
    while True:
        got = {f.stem: int(f.read_text()) for f in d.glob("*.steps")}
        if len(got) >= count or time.time() - t0 > timeout:
            break
        time.sleep(0.2)
    agreed = min(got.values())
    say(f"side-by-side runs {sorted(got)} fitted {sorted(got.values())} steps: all take {agreed}"
        + ("" if len(got) >= count else f" (only {len(got)} of {count} answered in {timeout:g} s)"))
    return agreed


def main(argv=None):
    a = parse_args(argv)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "a")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    pk = json.loads((pathlib.Path(a.data) / "passkey.json").read_text())
    cfg = Config(text_vocab=pk["text_vocab"], hidden=a.hidden, intermediate=a.intermediate, layers=a.layers,
                 heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, max_positions=a.max_positions,
                 attn=a.attn, chunk_size=a.chunk_size, S=a.S, windows=[a.window] * a.layers, mix_coeff=a.mix_coeff,
                 eos_id=pk["eos"], dropout=a.dropout)
    model = KsaLM(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    # Every run with the same --seed sees the same batches (the baselines train on the same tokens).
    data = Batches(a.data, "train", a.seq, seed=a.seed + 1, passkey_frac=a.passkey_frac, min_dist=a.min_dist,
                   max_dist=a.max_dist or None)
    start = 0
    if a.resume and (out / "ckpt.pt").exists():
        ck = torch.load(out / "ckpt.pt", map_location=dev)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start = ck["step"]
        for _ in range(start):  # the data stream at that step
            data.next(a.batch)
        say(f"resumed at step {start}")
    fwd = torch.compile(model) if a.compile else model
    amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda"
           else torch.autocast(device_type="cpu", enabled=False))
    say(f"ksa_train: attn {a.attn}, {n_params / 1e6:.2f} M parameters, {cfg.layers} layers, hidden {cfg.hidden}, "
        f"heads {cfg.heads}/{cfg.kv_heads}x{cfg.head_dim}, k {cfg.chunk_size} S {cfg.S} W {a.window} "
        f"(W*k = {a.window * a.chunk_size} tokens), vocab {cfg.text_vocab}; batch {a.batch} x {a.seq} tokens; "
        f"{a.steps} steps; device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    stop = min(a.stop_at or a.steps, a.steps)
    new_csv = not (out / "loss.csv").exists() or start == 0
    fcsv = open(out / "loss.csv", "w" if new_csv else "a", newline="")
    wcsv = csv.writer(fcsv)
    if new_csv:
        wcsv.writerow(["step", "tokens", "loss", "answer_loss", "lr", "seconds"])
    t0 = time.time()
    tok_window, t_window = 0, time.time()
    step, why = start, "steps done"
    loss_hist = []
    while step < stop:
        if a.max_seconds and time.time() - t0 > a.max_seconds:
            why = f"--max-seconds {a.max_seconds:g}"
            break
        lr = lr_at(step, a)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y, ans = data.next(a.batch)
        x, y, ans = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), ans.to(dev, non_blocking=True)
        with amp:
            logits = fwd(x)
        nll = F.cross_entropy(logits.float().reshape(-1, cfg.text_vocab), y.reshape(-1), reduction="none")
        am = ans.reshape(-1).float()
        loss = (nll * (1 - am)).sum() / (1 - am).sum().clamp(min=1)  # the language-model loss over the text
        if a.answer_weight:  # plus the passkey answer digits' mean loss (0 in a batch without any; no host sync)
            loss = loss + a.answer_weight * (nll * am).sum() / am.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        step += 1
        tok_window += x.numel()
        probe0 = max(1, min(5, a.probe_steps // 2))  # the first steps (allocations, autotuning) are not timed
        if a.time_budget and step == probe0:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_probe = time.time()
        if a.time_budget and step == a.probe_steps and step > probe0:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_probe) / (step - probe0)
            fit = int(a.fit_margin * (a.time_budget - (time.time() - t0)) / per_step) + step
            if a.sync_dir:
                fit = agree_steps(a.sync_dir, a.attn, fit, a.sync_count, say)
            a.steps = max(step + 1, min(a.steps, fit))
            stop = min(a.stop_at or a.steps, a.steps)
            say(f"time budget {a.time_budget:g} s: {per_step * 1e3:.1f} ms per step -> {a.steps} steps")
        if step % a.log_every == 0 or step == stop or step == start + 1:
            text_loss = float((nll * (~ans.reshape(-1))).sum() / (~ans).sum())
            n_ans = int(ans.sum())
            ans_loss = float((nll * ans.reshape(-1)).sum() / n_ans) if n_ans else float("nan")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            tps = tok_window / max(1e-9, now - t_window)
            tok_window, t_window = 0, now
            loss_hist.append(text_loss)
            wcsv.writerow([step, step * a.batch * a.seq, f"{text_loss:.5f}", f"{ans_loss:.5f}", f"{lr:.3e}",
                           f"{now - t0:.2f}"])
            fcsv.flush()
            bar = "#" * int(30 * step / stop)
            say(f"[{bar:<30}] step {step}/{stop} loss {text_loss:.4f} answer {ans_loss:.3f} lr {lr:.2e} "
                f"{tps:,.0f} tok/s {now - t0:.0f}s")
        if a.ckpt_every and step % a.ckpt_every == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, out / "ckpt.pt")
    elapsed = time.time() - t0
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, out / "ckpt.pt")
    fcsv.close()
    model.eval()
    # Held-out loss (plain windows, no passkeys), a few batches.
    held = Batches(a.data, "heldout", min(a.seq, 1024), seed=1234, passkey_frac=0.0)
    with torch.no_grad(), amp:
        hl = []
        for _ in range(4):
            x, y, _ = held.next(4)
            lg = model(x.to(dev))
            hl.append(float(F.cross_entropy(lg.float().reshape(-1, cfg.text_vocab), y.to(dev).reshape(-1))))
    pk_acc = {}
    if a.eval_trials:
        from .evaluate import passkey_accuracy
        with amp:
            pk_acc = passkey_accuracy(model, a.data, [int(x) for x in a.eval_lengths.split(",")], a.eval_trials,
                                      max_len=cfg.max_positions)
        say("passkey accuracy (PyTorch, greedy, held-out filler): " +
            ", ".join(f"{d}: {acc:.2f}" for d, acc in pk_acc.items()))
    mdir = export(model, out / "model", a.data)
    summary = {"attn": a.attn, "steps": step, "schedule_steps": a.steps, "stopped": why, "seconds": round(elapsed, 1),
               "tokens": step * a.batch * a.seq, "parameters": n_params, "final_loss": loss_hist[-1] if loss_hist else None,
               "first_loss": loss_hist[0] if loss_hist else None, "heldout_loss_1024": sum(hl) / len(hl), "passkey_torch": pk_acc,
               "model_bytes": (mdir / "model.safetensors").stat().st_size, "args": vars(a)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"ksa_train: stopped at step {step} ({why}) after {elapsed:.0f} s; held-out loss (1024-token windows) "
        f"{summary['heldout_loss_1024']:.4f}; exported {mdir} ({summary['model_bytes'] / 2**20:.2f} MiB)")
    try:
        from .plot import plot
        plot([out], out / "loss.png")
    except ImportError as e:
        say(f"no loss.png here ({e}); draw it with python3 -m ksa_train.plot {out}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
