"""A few training steps of a tiny 2-layer KSA language model on random tokens, through ksa_torch's autograd.

    python3 python/examples/train_tiny.py [--steps 40] [--device cuda|cpu]     (ksa_torch installed: docs/torch.md)

Model: embedding (text vocab + S summary ids), 2 blocks of [RMSNorm, fused qkv projection, ksa_torch.attention
on the stream (q, k, v are strided slices of the projection), o projection, residual, RMSNorm, SwiGLU MLP,
residual], final RMSNorm, lm head. No RoPE (positions come from the causal/chunk structure alone; this only
exercises the op). The stream is the text with S summary tokens after every k text tokens (docs/ksa.md: The
stream, built by ksa_torch.build_stream); logits are taken at text positions only (stream_to_text) and
predict the next text token. One fixed batch is trained on, so the loss must go down (memorisation); the
script prints it every step and asserts that it fell.

On CUDA the blocks run under bf16 autocast (the CUDA kernels take bf16/f16); on the CPU everything is fp32
(the CPU kernels).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import ksa_torch


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class Block(nn.Module):
    def __init__(self, d, hq, hkv, hd, chunk_size, S, W):
        super().__init__()
        self.hq, self.hkv, self.hd, self.chunk_size, self.S, self.W = hq, hkv, hd, chunk_size, S, W
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, (hq + 2 * hkv) * hd, bias=False)
        self.o = nn.Linear(hq * hd, d, bias=False)
        self.gate, self.up = nn.Linear(d, 4 * d, bias=False), nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, L, self.hq + 2 * self.hkv, self.hd)
        q, k, v = qkv[:, :, :self.hq], qkv[:, :, self.hq:self.hq + self.hkv], qkv[:, :, self.hq + self.hkv:]
        a = ksa_torch.attention(q, k, v, self.chunk_size, self.S, self.W)  # strided views in, dense grads out
        x = x + self.o(a.reshape(B, L, self.hq * self.hd))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyKsaLM(nn.Module):
    def __init__(self, vocab, d=256, layers=2, hq=4, hkv=2, hd=64, chunk_size=8, S=1, W=2):
        super().__init__()
        self.vocab, self.chunk_size, self.S = vocab, chunk_size, S
        self.embed = nn.Embedding(vocab + S, d)  # rows vocab..vocab+S-1: the summary tokens
        self.blocks = nn.ModuleList(Block(d, hq, hkv, hd, chunk_size, S, W) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, text):
        # The stream (docs/ksa.md: The stream) from the C++ core's layout: summary ids vocab..vocab+S-1 after
        # every k tokens.
        st = ksa_torch.build_stream(text, self.chunk_size, self.S, summary_token_begin=self.vocab)
        x = self.embed(st.input_ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(ksa_torch.stream_to_text(x, st, dim=1)))  # logits at text positions only


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = TinyKsaLM(args.vocab).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    text = torch.randint(0, args.vocab, (args.batch, args.T + 1), device=dev)
    inputs, targets = text[:, :-1], text[:, 1:]
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
        device_type="cpu", enabled=False)
    losses = []
    for step in range(args.steps):
        with amp:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), "bad gradients"
    # Memorising one fixed batch: the loss must clearly fall below its start (about ln(vocab) = 4.16).
    assert losses[-1] < 0.9 * losses[0], f"loss did not go down: {losses[0]:.4f} -> {losses[-1]:.4f}"
    print(f"ok: loss {losses[0]:.4f} -> {losses[-1]:.4f} on {dev}")


if __name__ == "__main__":
    main()
