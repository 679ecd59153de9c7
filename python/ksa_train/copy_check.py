"""A micro experiment for the claim behind KSA: a random sequence of n tokens repeated once, so the second
half is predictable only by copying from n tokens back. Full attention copies; a sliding window of W chunks
(W*k < n) cannot; KSA can only through the summaries of the chunks beyond its window.

    python3 -m ksa_train.copy_check [--attn full|swa|ksa] [--steps 600] [--n 24] [--window 1]   (CPU, ~1 min)

Prints the loss of the first half (not predictable: ln(vocab - 1)) and of the second half every 100 steps.
Defaults: vocab 64, 2 layers, hidden 64, 4/2 heads of 16, k 8, S 1, W 1 (a window of 8-15 tokens), n 24,
batch 16, AdamW lr 3e-3; docs/training.md has the numbers.
"""
import argparse

import torch
import torch.nn.functional as F

from .model import Config, KsaLM


def run(attn, steps=600, n=24, window=1, vocab=64, seed=0, log=print):
    torch.manual_seed(seed)
    c = Config(text_vocab=vocab, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, attn=attn,
               windows=[window, window], eos_id=vocab - 1)
    m = KsaLM(c)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    out = []
    for step in range(1, steps + 1):
        a = torch.randint(0, vocab - 1, (16, n))
        x = torch.cat([a, a], 1)
        nll = F.cross_entropy(m(x[:, :-1]).reshape(-1, vocab), x[:, 1:].reshape(-1), reduction="none").view(16, -1)
        opt.zero_grad()
        nll.mean().backward()
        opt.step()
        if step % 100 == 0:
            first, second = nll[:, :n - 1].mean().item(), nll[:, n:].mean().item()
            out.append((step, first, second))
            log(f"{attn} step {step}: first half {first:.3f}, second half {second:.3f}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attn", default="ksa", choices=["full", "swa", "ksa"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--window", type=int, default=1)
    a = ap.parse_args()
    run(a.attn, a.steps, a.n, a.window, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
