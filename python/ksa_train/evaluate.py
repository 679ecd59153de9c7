"""Passkey accuracy of a module in PyTorch (a quick check at the end of training; the reported numbers come
from the C++ engine: `ksa eval passkey`, tools/ksa/cmd_eval.cpp). The prompts are built as ksa_train.data
builds the training samples (held-out filler, 0..64 filler tokens before the needle); greedy decoding of the
5 digits; a trial counts when all five are right.
"""
import json
import pathlib
import random

import torch

from .data import KEY_DIGITS, read_u16


@torch.no_grad()
def passkey_accuracy(model, data_dir, lengths, trials, seed=0, before=64, max_len=None):
    d = pathlib.Path(data_dir)
    pk = json.loads((d / "passkey.json").read_text())
    filler = read_u16(d / "heldout.bin").tolist()
    dev = next(model.parameters()).device
    rng = random.Random(seed)
    out = {}
    for dist in lengths:
        f = dist - KEY_DIGITS - len(pk["needle_post"]) - len(pk["question"])
        if f < 0 or (max_len and dist + before + len(pk["needle_pre"]) + KEY_DIGITS > max_len):
            continue
        ok = 0
        for _ in range(trials):
            key = [pk["digits"][rng.randrange(10)] for _ in range(KEY_DIGITS)]
            a = rng.randrange(before + 1)
            s = rng.randrange(len(filler) - a - f)
            ids = filler[s:s + a] + pk["needle_pre"] + key + pk["needle_post"] + filler[s + a:s + a + f] + pk["question"]
            for i in range(KEY_DIGITS):
                nxt = int(model(torch.tensor([ids], device=dev))[0, -1].argmax())
                if nxt != key[i]:
                    break
                ids.append(nxt)
            else:
                ok += 1
        out[dist] = ok / trials
    return out
