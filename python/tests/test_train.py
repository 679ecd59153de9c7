"""The training recipe (python/ksa_train, docs/training.md) against the C++ engine:
  - the BPE tokenizer it writes encodes exactly as the C++ tokenizer reads it (`ksa tokenize`);
  - a CPU smoke run: a few dozen steps on a toy corpus (this repository's docs), the loss falls, the export
    loads in `ksa generate`;
  - the module's logits equal the engine's on exported checkpoints, for the ksa, swa and full modes;
  - `ksa perplexity`: exact token counts, the perplexity the module computes, and a constructed case with a
    known answer (a model whose logits are all zero has perplexity = vocabulary size);
  - `ksa eval passkey`: the prompts are the recipe's (needle, distance, question), the greedy answers are the
    module's, the accuracy is the fraction of trials whose 5 digits are right.
The `ksa` binary comes from KSA_BIN (scripts/test_python.sh sets it to the build's); without it, or without
the `regex` module the tokenizer trainer needs (Debian python3-regex), these tests skip and say why.
"""
import json
import math
import os
import pathlib
import re
import subprocess

import pytest
import torch

SRC = pathlib.Path(__file__).resolve().parents[2]
KSA = os.environ.get("KSA_BIN", "")
HAVE_KSA = bool(KSA) and os.access(KSA, os.X_OK)


def engine_commands():
    """Whether the ksa binary has the engine's commands (tokenize, perplexity, eval, generate): a build with
    -DKSA_ENGINE=OFF (bench/gpu/run.sh's kernels-only build) has only demo, bench and info."""
    r = subprocess.run([KSA, "--help"], capture_output=True, text=True)
    return all(f"  {c} " in r.stdout for c in ("tokenize", "perplexity", "eval", "generate"))


pytestmark = [pytest.mark.skipif(not HAVE_KSA,
                                 reason="KSA_BIN (the ksa binary) not set; scripts/test_python.sh sets it"),
              pytest.mark.skipif(HAVE_KSA and not engine_commands(),
                                 reason=f"{KSA} was built without the engine (KSA_ENGINE=OFF): no tokenize, "
                                        "perplexity, eval or generate to compare with")]
regex = pytest.importorskip("regex", reason="the tokenizer trainer needs the regex module (Debian python3-regex)")

from ksa_train import bpe, data, model as M  # noqa: E402

CORPUS = [SRC / "docs" / n for n in ("ksa.md", "engine.md", "torch.md", "testing.md", "serve.md")]
HELDOUT = SRC / "README.md"  # non-ASCII characters too (the byte-level path)


# The module runs in fp32; the engine's products with the CPU's bf16 dot-product instructions (on by default
# where the CPU has AVX512_BF16) round activations to bf16, about 1% of the logits away. These tests compare
# the same fp32 arithmetic, so the engine runs with fp32 products (KSA_CPU_BF16_DOT=0).
KSA_ENV = {**os.environ, "KSA_CPU_BF16_DOT": "0"}


def ksa(*args, check=True):
    r = subprocess.run([KSA, *map(str, args)], capture_output=True, text=True, env=KSA_ENV)
    if check and r.returncode != 0:
        raise AssertionError(f"ksa {' '.join(map(str, args))}: exit {r.returncode}\n{r.stderr[-2000:]}")
    return r


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tokenizer (vocab 512) trained on the docs and the prepared data folder."""
    d = tmp_path_factory.mktemp("data")
    train_txt = d / "train.txt"
    train_txt.write_text("\n".join(p.read_text(encoding="utf-8") for p in CORPUS), encoding="utf-8")
    tok = bpe.Tokenizer(bpe.train([train_txt.read_text(encoding="utf-8")], 512, progress=False))
    tok.save(d)
    data.prepare(train_txt, HELDOUT, d, d)
    return d


def test_tokenizer_matches_cpp(prepared):
    tok = bpe.Tokenizer.load(prepared)
    assert len(tok) == 512 and tok.eos_id == 511
    for path in (HELDOUT, CORPUS[0]):
        text = path.read_text(encoding="utf-8")
        ours = tok.encode(text)
        cpp = [int(x) for x in ksa("tokenize", "-m", prepared / "tokenizer.json", "-f", path).stdout.split()]
        assert ours == cpp, f"{path.name}: first difference at {next(i for i, (a, b) in enumerate(zip(ours, cpp)) if a != b)}"
        assert tok.decode(ours) == text
    # One token per digit (the passkey task) and the special token.
    assert all(len(tok.encode(str(d))) == 1 for d in range(10))
    assert tok.encode("a<|endoftext|>b")[1] == tok.eos_id


def random_model(c, seed):
    """A module with weights large enough that logits differ clearly between tokens."""
    torch.manual_seed(seed)
    m = M.KsaLM(c)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed" in n:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
    return m


CONFIGS = {
    # Every optional part: hybrid layer, summary layernorm, mix 0.5, S = 2, windows 0..2, GQA 2, inner_chunk
    # positions would change RoPE only (not used by the released models); a plain layer in the middle.
    "ksa": dict(attn="ksa", layers=3, windows=[1, 2, 0], summary_layers=[1, 0, 1], mix_coeff=0.5,
                summary_layernorm=True, S=2, chunk_size=4, tie=True),
    "ksa_untied": dict(attn="ksa", layers=2, windows=[2, 2], mix_coeff=1.0, summary_positions="zeros", tie=False),
    "swa": dict(attn="swa", layers=2, windows=[2, 2]),
    "full": dict(attn="full", layers=2),
}


def export_random(tmp, prepared, name, seed=0):
    pk = json.loads((prepared / "passkey.json").read_text())
    c = M.Config(text_vocab=pk["text_vocab"], hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16,
                 eos_id=pk["eos"], max_positions=4096, **CONFIGS[name])
    m = random_model(c, seed)
    out = M.export(m, tmp / name, prepared)
    # The module the engine will see: bf16-rounded weights (the export's dtype), in fp32.
    return out, M.load_exported(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_engine(tmp_path, prepared, name):
    """Same bf16 weights, fp32 activations on both sides, the engine's KV cache in f32: the only differences
    are fp32 summation orders, so the bound is 2e-4 of the largest |logit| (observed ~1e-6 relative)."""
    d, m = export_random(tmp_path, prepared, name)
    ids = data.read_u16(prepared / "heldout.bin")
    ctx = 75  # not a multiple of k: a partial chunk at the end
    n = len(ids) // ctx
    dump = tmp_path / "logits.f32"
    r = ksa("perplexity", "-m", d, "-f", HELDOUT, "--ctx", ctx, "--chunks", 2, "--all", "--kv-f32", "--device", "cpu",
            "--dump-logits", dump)
    V = m.c.text_vocab
    engine = torch.frombuffer(bytearray(dump.read_bytes()), dtype=torch.float32).reshape(2, ctx, V)
    with torch.no_grad():
        ours = m(ids[:2 * ctx].reshape(2, ctx))
    err = (ours - engine).abs().max().item()
    scale = engine.abs().max().item()
    assert scale > 1.0, "logits too small for a meaningful comparison"
    print(f"{name}: max |logit diff| {err:.3g}, max |logit| {scale:.3g} ({err / scale:.2g} relative)")
    assert err <= 2e-4 * scale, f"{name}: max |logit diff| {err:.3g} vs max |logit| {scale:.3g}"
    # Exact counts: 2 windows, tokens 1..ctx-1 of each.
    assert f"windows 2, ctx {ctx}, tokens scored {2 * (ctx - 1)} " in r.stdout, r.stdout
    assert n >= 2


def test_perplexity_counts_and_value(tmp_path, prepared):
    d, m = export_random(tmp_path, prepared, "ksa", seed=1)
    ids = data.read_u16(prepared / "heldout.bin")
    ctx = 64
    windows = len(ids) // ctx
    r = ksa("perplexity", "-m", d, "-f", HELDOUT, "--ctx", ctx, "--kv-f32", "--device", "cpu")
    first = ctx // 2
    scored = windows * (ctx - 1 - first)
    assert f"windows {windows}, ctx {ctx}, tokens scored {scored} (second half of each window)" in r.stdout, r.stdout
    ppl = float(re.search(r"ppl ([0-9.]+)", r.stdout).group(1))
    with torch.no_grad():
        x = ids[:windows * ctx].reshape(windows, ctx)
        lp = torch.log_softmax(m(x).double(), -1)
        nll = -lp[:, first:-1].gather(-1, x[:, first + 1:, None]).sum().item() / scored
    assert abs(ppl - math.exp(nll)) <= 1e-4 * ppl, (ppl, math.exp(nll))
    assert re.search(r"KV cache at 64 tokens: \d+ bytes", r.stdout)


def test_perplexity_known_answer(tmp_path, prepared):
    """All-zero weights: every logit is 0, so every token has probability 1/V and the perplexity is V."""
    d, m = export_random(tmp_path, prepared, "ksa")
    t = M.load_safetensors(d / "model.safetensors")
    M.save_safetensors({k: torch.zeros_like(v) for k, v in t.items()}, d / "model.safetensors")
    r = ksa("perplexity", "-m", d, "-f", HELDOUT, "--ctx", 100, "--all", "--device", "cpu")
    assert f"mean NLL {math.log(m.c.text_vocab):.6f} nats, ppl {float(m.c.text_vocab):.4f}" in r.stdout, r.stdout


def test_passkey_eval(tmp_path, prepared):
    d, m = export_random(tmp_path, prepared, "ksa", seed=2)
    pk = json.loads((prepared / "passkey.json").read_text())
    lengths, trials = [40, 130], 3
    dump = tmp_path / "pk.jsonl"
    r = ksa("eval", "passkey", "-m", d, "-f", HELDOUT, "--lengths", ",".join(map(str, lengths)), "--trials", trials,
            "--before", 20, "--seed", 7, "--kv-f32", "--device", "cpu", "--dump", dump)
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == len(lengths) * trials
    correct = 0
    for row in rows:
        p, at, key = row["prompt"], row["needle_at"], row["key_ids"]
        # The recipe's pieces, at the stated distance.
        assert p[at - len(pk["needle_pre"]):at] == pk["needle_pre"]
        assert p[at:at + 5] == key == [pk["digits"][int(c)] for c in row["key"]]
        assert p[at + 5:at + 5 + len(pk["needle_post"])] == pk["needle_post"]
        assert p[-len(pk["question"]):] == pk["question"]
        assert len(p) - at == row["distance"]
        assert at - len(pk["needle_pre"]) <= 20
        # The answer is the module's greedy continuation (where its top-2 margin is clear of rounding).
        seq = list(p)
        with torch.no_grad():
            for i in range(5):
                lg = m(torch.tensor([seq]))[0, -1]
                top = lg.topk(2).values
                if (top[0] - top[1]).item() < 1e-3 * lg.abs().max().item():
                    break
                assert int(lg.argmax()) == row["answer"][i], (row["distance"], row["trial"], i)
                seq.append(row["answer"][i])
        assert row["correct"] == (row["answer"] == key)
        correct += row["correct"]
    overall = float(re.search(r"overall accuracy ([0-9.]+) \((\d+) / (\d+)\)", r.stdout).group(1))
    assert abs(overall - correct / len(rows)) < 1e-3
    assert len(re.findall(r"^\s+(40|130)\s+\d+\s+3\s", r.stdout, re.M)) == 2, r.stdout


def test_smoke_training_cpu(tmp_path, prepared):
    """A few dozen steps on the toy corpus: the loss falls; the export loads in `ksa generate`."""
    from ksa_train import train
    out = tmp_path / "run"
    s = train.main(["--data", str(prepared), "--out", str(out), "--device", "cpu", "--steps", "40", "--batch", "4",
                    "--seq", "128", "--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4",
                    "--kv-heads", "2", "--head-dim", "16", "--window", "2", "--warmup", "5", "--lr", "5e-3",
                    "--log-every", "5", "--max-positions", "1024"])
    rows = (out / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert s["steps"] == 40 and len(losses) >= 8
    # Each logged loss is one batch's (5 steps apart; consecutive points differ by up to ~0.3 nats on this toy
    # run): the mean of the last three must lie half a nat below the first (measured: 6.23 -> 5.24).
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert (out / "ckpt.pt").exists() and (out / "model" / "model.safetensors").exists()
    g = ksa("generate", "-m", out / "model", "-p", "The cache", "-n", 8, "--device", "cpu")
    assert "stopped:" in g.stderr and "KV cache" in g.stderr


def test_passkey_rows(prepared):
    """Training rows: every marked answer is the 5 digits of the most recent needle, right after a question,
    at a distance within [min_dist, max_dist]; rows without passkeys are plain corpus windows."""
    pk = json.loads((prepared / "passkey.json").read_text())
    pre, q = pk["needle_pre"], pk["question"]
    b = data.Batches(prepared, "train", 400, seed=5, passkey_frac=1.0, min_dist=30, max_dist=120)
    episodes = 0
    for _ in range(4):
        x, y, ans = b.next(6)
        for r in range(x.shape[0]):
            row = torch.cat([x[r, :1], y[r]]).tolist()  # the T + 1 ids
            marks = [j + 1 for j in ans[r].nonzero().flatten().tolist()]  # positions in `row`
            assert len(marks) % 5 == 0 and marks
            for e in range(0, len(marks), 5):
                at = marks[e]
                assert marks[e:e + 5] == list(range(at, at + 5))
                assert row[at - len(q):at] == q
                needles = [i + len(pre) for i in range(at) if row[i:i + len(pre)] == pre]
                key_at = needles[-1]
                assert row[key_at:key_at + 5] == row[at:at + 5]
                assert all(t in pk["digits"] for t in row[at:at + 5])
                assert 30 <= at - key_at <= 120
                episodes += 1
    assert episodes > 24  # several episodes per row at these distances
    plain = data.Batches(prepared, "train", 400, seed=5, passkey_frac=0.0)
    x, y, ans = plain.next(3)
    assert not ans.any() and torch.equal(x[:, 1:], y[:, :-1])


def test_prepare_joins_several_files(tmp_path, prepared):
    """prepare() takes a list of training files: the token file is the tokenization of their texts joined by a
    blank line (how the shipped model's Austen + King James Bible data is made)."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("First file, its last line.\n", encoding="utf-8")
    b.write_text("\nSecond file.\n", encoding="utf-8")
    assert data.read_texts([a, b]) == "First file, its last line.\n\nSecond file.\n"
    out = tmp_path / "out"
    data.prepare([a, b], HELDOUT, prepared, out)
    tok = bpe.Tokenizer.load(prepared)
    assert data.read_u16(out / "train.bin").tolist() == tok.encode(data.read_texts([a, b]))


def test_dropout_only_in_training(prepared):
    """Config.dropout acts in train() mode only: eval() logits are deterministic and equal those of the same
    weights with dropout 0 (the export carries no dropout)."""
    pk = json.loads((prepared / "passkey.json").read_text())
    kw = dict(text_vocab=pk["text_vocab"], hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, head_dim=16,
              chunk_size=4, S=1, windows=1, max_positions=256)
    torch.manual_seed(0)
    m = M.KsaLM(M.Config(**kw, dropout=0.5))
    ref = M.KsaLM(M.Config(**kw))
    ref.load_state_dict(m.state_dict())
    x = torch.randint(0, pk["text_vocab"], (2, 21))
    m.train()
    assert not torch.equal(m(x), m(x))  # dropout draws differ between calls
    m.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))


def test_side_by_side_runs_agree_on_steps(tmp_path):
    """agree_steps (TRAIN_PARALLEL=1): every run takes the smallest fitted step count; a run that waits for
    the others gives up after the timeout with what it has."""
    import threading
    from ksa_train import train
    got, msgs = {}, []

    def run(name, fit):
        got[name] = train.agree_steps(tmp_path / "sync", name, fit, 3, msgs.append, timeout=30)

    ts = [threading.Thread(target=run, args=a) for a in (("ksa", 4424), ("swa", 4906), ("full", 6999))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == {"ksa": 4424, "swa": 4424, "full": 4424}
    assert train.agree_steps(tmp_path / "alone", "ksa", 100, 2, msgs.append, timeout=0.5) == 100
    assert "only 1 of 2" in msgs[-1]
