"""Prepares the training data folder from text files: trains the BPE tokenizer (ksa_train.bpe) and tokenizes.

    python3 -m ksa_train.prepare --train FILE [FILE...] --heldout FILE --vocab 4096 --out DIR

DIR: tokenizer.json, tokenizer_config.json, train.bin, heldout.bin (uint16 ids), passkey.json (ksa_train.data).
"""
import argparse

from .bpe import Tokenizer, train
from .data import prepare, read_texts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, nargs="+", help="training text files (joined by a blank line)")
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    tok = Tokenizer(train([read_texts(a.train)], a.vocab, progress=False))
    tok.save(a.out)
    stats = prepare(a.train, a.heldout, a.out, a.out)
    print(f"prepare: vocab {len(tok)}; train {stats['train']} tokens, held-out {stats['heldout']} tokens -> {a.out}")


if __name__ == "__main__":
    main()
