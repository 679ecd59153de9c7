"""Training data: token files of the prepared corpus, and batches of plain text windows with passkey-retrieval
samples mixed in.

prepare() (run where the tokenizer is, e.g. the development machine) writes DIR/train.bin and DIR/heldout.bin
(token ids as little-endian uint16), DIR/passkey.json (the token ids of the passkey prompt's pieces) and
DIR/tokenizer.json; training then needs only torch (no tokenizer, no regex) and DIR.

A passkey episode (the same pieces as `ksa eval passkey`, tools/ksa/eval_common.hpp; docs/training.md):

    filler[:a] + NEEDLE_PRE + key digits + NEEDLE_POST + filler[a:a+f] + QUESTION + key digits + filler[a+f:]...

Every piece is encoded alone and the ids concatenated (filler is a window of corpus tokens); the key is 5
digits, one token each (the tokenizer splits digits). The distance d is the number of tokens from the needle's
first key digit to the first answer digit: d = 5 + len(NEEDLE_POST) + f + len(QUESTION).
"""
import json
import math
import pathlib
import random

import torch

NEEDLE_PRE = "\nThe pass key is "
NEEDLE_POST = ". Remember it.\n"
QUESTION = "\nWhat is the pass key? The pass key is "
KEY_DIGITS = 5


def write_u16(ids, path):
    t = torch.tensor(ids, dtype=torch.int32)
    assert int(t.max()) < 65536 and int(t.min()) >= 0
    t = torch.where(t >= 32768, t - 65536, t).to(torch.int16)
    from .model import _tensor_bytes
    pathlib.Path(path).write_bytes(_tensor_bytes(t))


def read_u16(path):
    raw = bytearray(pathlib.Path(path).read_bytes())
    return torch.frombuffer(raw, dtype=torch.int16).to(torch.int64) & 0xFFFF


def read_texts(paths):
    """One text from a file or a list of files (joined by a blank line)."""
    if isinstance(paths, (str, pathlib.Path)):
        paths = [paths]
    return "\n\n".join(pathlib.Path(p).read_text(encoding="utf-8").strip("\n") for p in paths) + "\n"


def prepare(train_txt, heldout_txt, tokenizer_dir, out_dir):
    """train_txt, heldout_txt: a file or a list of files each."""
    from .bpe import Tokenizer
    tok = Tokenizer.load(tokenizer_dir)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, src in (("train", train_txt), ("heldout", heldout_txt)):
        ids = tok.encode(read_texts(src))
        write_u16(ids, out / f"{name}.bin")
        stats[name] = len(ids)
    digits = [tok.encode(str(d)) for d in range(10)]
    assert all(len(d) == 1 for d in digits), "the tokenizer must give one token per digit"
    pk = {"needle_pre": tok.encode(NEEDLE_PRE), "needle_post": tok.encode(NEEDLE_POST),
          "question": tok.encode(QUESTION), "digits": [d[0] for d in digits], "eos": tok.eos_id,
          "text_vocab": len(tok)}
    (out / "passkey.json").write_text(json.dumps(pk) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((pathlib.Path(tokenizer_dir) / name).read_bytes())
    return stats


class Batches:
    """Random batches [B, T + 1] from a token file; a fraction p of the rows are passkey samples."""

    def __init__(self, data_dir, split, T, seed, passkey_frac=0.5, min_dist=16, max_dist=None):
        d = pathlib.Path(data_dir)
        self.tokens = read_u16(d / f"{split}.bin")
        self.pk = json.loads((d / "passkey.json").read_text())
        self.T, self.p = T, passkey_frac
        self.rng = random.Random(seed)
        self.fixed = len(self.pk["needle_pre"]) + KEY_DIGITS + len(self.pk["needle_post"]) + len(self.pk["question"])
        self.min_dist = min_dist
        # The longest distance that fits: the whole row but the needle's prefix and the answer.
        longest = T + 1 - len(self.pk["needle_pre"]) - KEY_DIGITS
        self.max_dist = min(max_dist or longest, longest)
        assert self.max_dist >= self.min_dist and len(self.tokens) > 2 * (T + 1)

    def window(self, n):
        s = self.rng.randrange(0, len(self.tokens) - n)
        return self.tokens[s:s + n]

    def passkey_row(self):
        """A row of passkey episodes; returns (ids [T + 1], the positions of the answer digits in it).

        An episode is filler (0..64 tokens), the needle, f filler tokens, the question and the key's digits, at a
        distance d drawn log-uniform in [min_dist, max_dist]; episodes follow each other until the row is full (a
        long distance fills the row alone, short ones give several per row: more retrieval examples per step).
        The question always asks for the most recent needle's key. The filler is one contiguous corpus window.
        """
        pk, T = self.pk, self.T
        fill = self.window(T + 1).tolist()
        ids, ans, used = [], [], 0
        while True:
            dist = int(round(math.exp(self.rng.uniform(math.log(self.min_dist), math.log(self.max_dist)))))
            f = max(0, dist - KEY_DIGITS - len(pk["needle_post"]) - len(pk["question"]))
            a = self.rng.randrange(0, 65)
            need = a + self.fixed + f + KEY_DIGITS
            if ids and len(ids) + need > T + 1:
                break
            if not ids:  # the first episode starts 0..256 tokens into the row (where it fits)
                a = self.rng.randrange(0, max(1, min(257, T + 1 - need + a + 1)))
            key = [pk["digits"][self.rng.randrange(10)] for _ in range(KEY_DIGITS)]
            ids += fill[used:used + a] + pk["needle_pre"] + key + pk["needle_post"] + fill[used + a:used + a + f]
            ids += pk["question"]
            ans += [p for p in range(len(ids), len(ids) + KEY_DIGITS) if p <= T]
            ids += key
            used += a + f
            if len(ids) >= T + 1:
                break
        ids += fill[used:used + max(0, T + 1 - len(ids))]
        return torch.tensor(ids[:T + 1], dtype=torch.int64), ans

    def next(self, B):
        """x [B, T], y [B, T] (next tokens), w [B, T] (1 for text, `answer` marks for answer digits as bool)."""
        rows, ans = [], torch.zeros(B, self.T + 1, dtype=torch.bool)
        for b in range(B):
            if self.rng.random() < self.p:
                r, pos = self.passkey_row()
                ans[b, pos] = True
            else:
                r = self.window(self.T + 1)
            rows.append(r)
        x = torch.stack(rows)
        return x[:, :-1], x[:, 1:], ans[:, 1:]
