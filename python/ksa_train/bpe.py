"""A byte-level BPE tokenizer: trainer, encoder, decoder, and the HF tokenizer.json the C++ tokenizer reads.

    python3 -m ksa_train.bpe train --vocab 4096 --out DIR FILE...     # DIR/tokenizer.json (+ tokenizer_config.json)
    python3 -m ksa_train.bpe encode DIR FILE                           # ids, one per line (for checks)

The format is Qwen2/Qwen3's (src/tokenizer reads it): no normalizer; pre-tokenizer = Split(Qwen2's regex,
Isolated) then ByteLevel(no prefix space, no regex); BPE merges over GPT-2's byte alphabet; ByteLevel decoder.
Qwen2's regex puts every digit in a piece of its own, so a number is always one token per digit (the passkey
task relies on it). Ids: 0..255 the 256 bytes (in GPT-2's alphabet order of bytes), 256.. the merges in rank
order, then the special token <|endoftext|> (end of document). The model's summary token is NOT a tokenizer
token: its id is the first id after the tokenizer's (summary_token_begin = len(tokenizer)), as in the released
KSA checkpoints, so text can never encode to it.

Training (the classic algorithm): text is split by the regex into pieces; identical pieces are counted once
with their frequency; the most frequent adjacent pair (ties: the pair whose tokens come first in id order) is
merged, and only the pieces holding it are updated. Deterministic. Encoding applies the merges by rank (lowest
first), as the C++ tokenizer and HF do; `tests` check ids against the C++ tokenizer.
"""
import argparse
import collections
import heapq
import json
import pathlib
import sys

import regex

# Qwen2/Qwen3's pre-tokenizer pattern (single digits, letters with an optional leading non-letter).
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
EOS = "<|endoftext|>"


def byte_alphabet():
    """GPT-2's byte -> printable character map (bytes 33..126, 161..172, 174..255 stand for themselves)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_B2U = byte_alphabet()
_U2B = {u: b for b, u in _B2U.items()}
_RE = regex.compile(PATTERN)


def pieces(text):
    return _RE.findall(text)


def train(texts, vocab_size, progress=True):
    """Merges (a list of (left id, right id)) learned from `texts` so that 256 + merges + 1 special = vocab_size."""
    n_merges = vocab_size - 256 - 1
    if n_merges < 0:
        raise ValueError(f"vocab_size must be >= 257 (got {vocab_size})")
    counts = collections.Counter()
    for t in texts:
        counts.update(pieces(t))
    words = [list(w.encode("utf-8")) for w in counts]
    freq = list(counts.values())
    pair_count = collections.Counter()
    where = collections.defaultdict(set)  # pair -> indices of words holding it
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] += freq[i]
            where[(a, b)].add(i)
    # Max-heap of (-count, pair); stale entries are skipped when popped.
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        c, p = heapq.heappop(heap)
        if -c != pair_count.get(p, 0) or -c <= 0:
            continue
        new = 256 + len(merges)
        merges.append(p)
        changed = collections.Counter()
        for i in list(where[p]):
            w, f = words[i], freq[i]
            for a, b in zip(w, w[1:]):
                changed[(a, b)] -= f
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == p:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for a, b in zip(out, out[1:]):
                changed[(a, b)] += f
                where[(a, b)].add(i)
        del where[p]
        for q, d in changed.items():
            if d == 0:
                continue
            pair_count[q] += d
            if pair_count[q] > 0:
                heapq.heappush(heap, (-pair_count[q], q))
        if progress and len(merges) % 500 == 0:
            print(f"bpe: {len(merges)} / {n_merges} merges", file=sys.stderr, flush=True)
    return merges


class Tokenizer:
    """Encoder/decoder for the tokenizer.json this module writes (the subset of the format it uses)."""

    def __init__(self, merges):
        self.merges = [tuple(m) for m in merges]
        self.rank = {m: r for r, m in enumerate(self.merges)}
        self.tokens = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.tokens.append(self.tokens[a] + self.tokens[b])
        self.eos_id = len(self.tokens)
        self.specials = {EOS: self.eos_id}
        self._cache = {}

    def __len__(self):
        return self.eos_id + 1

    @classmethod
    def load(cls, path):
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        j = json.loads(path.read_text())
        vocab = j["model"]["vocab"]
        merges = []
        for m in j["model"]["merges"]:
            a, b = m.split(" ") if isinstance(m, str) else m
            merges.append((vocab[a], vocab[b]))
        tok = cls(merges)
        if tok.specials[EOS] != next(t["id"] for t in j["added_tokens"] if t["content"] == EOS):
            raise ValueError(f"{path}: not a tokenizer written by ksa_train.bpe")
        return tok

    def _encode_piece(self, s):
        ids = self._cache.get(s)
        if ids is not None:
            return ids
        ids = list(s.encode("utf-8"))
        while len(ids) > 1:
            best, at = None, -1
            for j in range(len(ids) - 1):
                r = self.rank.get((ids[j], ids[j + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, j
            if best is None:
                break
            ids[at:at + 2] = [256 + best]
        if len(self._cache) < 1_000_000:
            self._cache[s] = ids
        return ids

    def encode(self, text):
        """Ids of `text`; the special token's text <|endoftext|> is encoded as its id."""
        out = []
        for k, part in enumerate(text.split(EOS)):
            if k:
                out.append(self.eos_id)
            for p in pieces(part):
                out.extend(self._encode_piece(p))
        return out

    def decode(self, ids):
        return b"".join(self.tokens[i] if i < self.eos_id else EOS.encode() if i == self.eos_id else b""
                        for i in ids).decode("utf-8", errors="replace")

    def to_json(self):
        tok_str = ["".join(_B2U[b] for b in t) for t in self.tokens]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{"id": self.eos_id, "content": EOS, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {s: i for i, s in enumerate(tok_str)},
                      "merges": [[tok_str[a], tok_str[b]] for a, b in self.merges]},
        }

    def save(self, out_dir):
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1))
        # What HF's AutoTokenizer and the chat template reader look for; no chat template (a base model).
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
            "model_max_length": 1 << 20, "added_tokens_decoder": {str(self.eos_id): {
                "content": EOS, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}}}, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="learn merges from text files, write DIR/tokenizer.json")
    t.add_argument("files", nargs="+")
    t.add_argument("--vocab", type=int, default=4096, help="ids in all: 256 bytes + merges + <|endoftext|>")
    t.add_argument("--out", required=True)
    e = sub.add_parser("encode", help="print the ids of a file, one per line")
    e.add_argument("tokenizer")
    e.add_argument("file")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        texts = [pathlib.Path(f).read_text(encoding="utf-8") for f in a.files]
        tok = Tokenizer(train(texts, a.vocab))
        tok.save(a.out)
        n = sum(len(tok.encode(x)) for x in texts)
        print(f"bpe: vocab {len(tok)} ({len(tok.merges)} merges) -> {a.out}/tokenizer.json; "
              f"{n} tokens for {sum(len(x) for x in texts)} characters")
    else:
        tok = Tokenizer.load(a.tokenizer)
        sys.stdout.write("".join(f"{i}\n" for i in tok.encode(pathlib.Path(a.file).read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()
