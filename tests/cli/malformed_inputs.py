#!/usr/bin/env python3
"""Malformed input through the `ksa` command, table-driven (ctest `ksa_cli_malformed`, issue #26).

Every case is a command line, and the files it reads derived from a small valid checkpoint by one
mutation: flags, config.json, safetensors files and their index, tokenizer.json, tokenizer_config.json,
generation_config.json, prompts. Each must end with a clear error: exit code 1 (ksa::Error) or 2 (usage),
as the case says; a message that matches the case's pattern (it names the file, field or flag); never a
signal, a timeout, "unexpected error" (a foreign exception) or a sanitizer report.

    tests/cli/malformed_inputs.py <path to ksa> <scratch dir> [-j N] [-k SUBSTRING] [-v]

Self-contained: the checkpoint (4 layers, hidden 64, vocabulary 320) and its byte-level BPE tokenizer
are made here (ksa make-model, then shrunk), so no download is needed. Needs Python 3 only.
"""
import argparse
import concurrent.futures
import json
import os
import re
import shutil
import struct
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("ksa")
ap.add_argument("scratch")
ap.add_argument("-j", type=int, default=2, help="cases run in parallel")
ap.add_argument("-k", default="", help="run only cases whose name contains this")
ap.add_argument("-v", action="store_true", help="print every case's output")
ARGS = ap.parse_args()
KSA = os.path.abspath(ARGS.ksa)
ROOT = os.path.abspath(os.path.join(ARGS.scratch, "malformed_inputs"))
TIMEOUT_S = 120

V = 320  # vocabulary of the test checkpoint
DEEP = "[" * 200000 + "]" * 200000
LONG_REPEAT = "[1]*1048576" + "*1" * 8000
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


# --- the valid inputs every case starts from ---------------------------------------------------------

def byte_alphabet():
    out, extra = [], 0
    for b in range(256):
        printable = 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255
        out.append(chr(b) if printable else chr(256 + extra))
        extra += 0 if printable else 1
    return out


def base_tokenizer():
    a = byte_alphabet()
    vocab = {a[b]: b for b in range(256)}
    merges = []
    for x, y in [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), (a[32], "w"), ("o", "r")]:
        vocab[x + y] = len(vocab)
        merges.append([x, y])
    added = [{"id": 300, "content": "<|im_start|>", "special": True},
             {"id": 301, "content": "<|im_end|>", "special": True},
             {"id": 302, "content": "<|endoftext|>", "special": True}]
    for t in added:
        t.update({"lstrip": False, "rstrip": False, "single_word": False, "normalized": False})
    return {"version": "1.0", "added_tokens": added, "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "post_processor": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "vocab": vocab, "merges": merges}}


def read_st(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None)
    tensors = []
    for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, e = t["data_offsets"]
        tensors.append([name, t["dtype"], t["shape"], data[b:e]])
    return tensors, meta


def st_bytes(tensors, meta=None, header=None):
    """A safetensors file from [name, dtype, shape, bytes] entries; `header` (a dict) edits the header."""
    h, off, blobs = {}, 0, []
    if meta is not None:
        h["__metadata__"] = meta
    for name, dtype, shape, blob in tensors:
        h[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        off += len(blob)
        blobs.append(blob)
    if header is not None:
        header(h)
    text = json.dumps(h).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def make_base():
    base = os.path.join(ROOT, "base")
    tokdir = os.path.join(ROOT, "tok")
    os.makedirs(tokdir)
    with open(os.path.join(tokdir, "tokenizer.json"), "w") as f:
        json.dump(base_tokenizer(), f)
    raw = os.path.join(ROOT, "raw")
    r = subprocess.run([KSA, "make-model", "--shape", "tiny", "--out", raw, "--tokenizer", tokdir],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("malformed_inputs: ksa make-model failed:\n" + r.stdout + r.stderr)
    # Shrink the vocabulary to V rows so that every case's files are small.
    os.makedirs(base)
    cfg = json.load(open(os.path.join(raw, "config.json")))
    cfg.update({"vocab_size": V, "bos_token_id": 302, "eos_token_id": 302, "summary_token_begin": V - 1,
                "max_position_embeddings": 256})
    json.dump(cfg, open(os.path.join(base, "config.json"), "w"), indent=2)
    json.dump({"bos_token_id": 302, "eos_token_id": [302, 301]}, open(os.path.join(base, "generation_config.json"), "w"))
    tensors, meta = read_st(os.path.join(raw, "model.safetensors"))
    for t in tensors:
        if t[0] == "model.embed_tokens.weight":
            t[2] = [V, t[2][1]]
            t[3] = t[3][:V * t[2][1] * 2]
    with open(os.path.join(base, "model.safetensors"), "wb") as f:
        f.write(st_bytes(tensors, meta))
    shutil.copy(os.path.join(tokdir, "tokenizer.json"), base)
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{{ messages }}", "eos_token": "<|im_end|>"}, f)
    shutil.rmtree(raw)
    return base, tensors, meta


# --- mutations: each edits one file of a case's directory ---------------------------------------------

def write(d, name, data):
    p = os.path.join(d, name)
    if os.path.lexists(p):
        os.unlink(p)  # files are hard links to the base: never write through them
    with open(p, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape"))


def cfg(**kv):
    def m(d):
        c = json.load(open(os.path.join(d, "config.json")))
        c.update(kv)
        write(d, "config.json", json.dumps(c))
    return m


def cfg_del(key):
    def m(d):
        c = json.load(open(os.path.join(d, "config.json")))
        del c[key]
        write(d, "config.json", json.dumps(c))
    return m


def cfg_raw(key, text):
    """config.json with `key` set to raw JSON text (numbers Python's json cannot write, deep nesting)."""
    def m(d):
        c = json.load(open(os.path.join(d, "config.json")))
        c[key] = "@@RAW@@"
        write(d, "config.json", json.dumps(c).replace('"@@RAW@@"', text))
    return m


def text_file(name, text):
    return lambda d: write(d, name, text)


def remove(name):
    def m(d):
        p = os.path.join(d, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    return m


def make_dir(name):
    def m(d):
        remove(name)(d)
        os.makedirs(os.path.join(d, name))
    return m


def st(header=None, tensors=None, raw=None, meta="keep", name="model.safetensors"):
    """model.safetensors rebuilt: `tensors` edits the entry list, `header` the header dict; `raw` maps the
    file's bytes to other bytes."""
    def m(d):
        ts = [list(t) for t in BASE_TENSORS]
        if tensors:
            tensors(ts)
        data = st_bytes(ts, BASE_META if meta == "keep" else meta, header)
        write(d, name, raw(data) if raw else data)
    return m


def st_header_text(text, data_bytes=0):
    b = text.encode("utf-8", "surrogateescape")
    return lambda d: write(d, "model.safetensors", struct.pack("<Q", len(b)) + b + b"\0" * data_bytes)


def sharded(index=None, files=None):
    """Two shards and an index instead of model.safetensors; `index` edits the index dict, `files`
    the {shard name: entries} map before writing."""
    def m(d):
        os.unlink(os.path.join(d, "model.safetensors"))
        half = len(BASE_TENSORS) // 2
        shards = {"model-00001-of-00002.safetensors": [list(t) for t in BASE_TENSORS[:half]],
                  "model-00002-of-00002.safetensors": [list(t) for t in BASE_TENSORS[half:]]}
        if files:
            files(shards)
        wm = {}
        for fname, ts in shards.items():
            write(d, fname, st_bytes(ts, BASE_META))
            for t in ts:
                wm[t[0]] = fname
        idx = {"metadata": {"total_size": 0}, "weight_map": wm}
        if index:
            index(idx)
        write(d, "model.safetensors.index.json", idx if isinstance(idx, str) else json.dumps(idx))
    return m


def index_text(text):
    def m(d):
        sharded()(d)
        write(d, "model.safetensors.index.json", text)
    return m


def tok(edit):
    def m(d):
        t = base_tokenizer()
        edit(t)
        write(d, "tokenizer.json", json.dumps(t))
    return m


def tok_text(text):
    return lambda d: write(d, "tokenizer.json", text)


def tok_raw(path, text):
    """tokenizer.json with the value at `path` (keys) replaced by raw JSON text."""
    def m(d):
        t = base_tokenizer()
        o = t
        for k in path[:-1]:
            o = o[k]
        o[path[-1]] = "@@RAW@@"
        write(d, "tokenizer.json", json.dumps(t).replace('"@@RAW@@"', text))
    return m


def tensor_del(name):
    return lambda ts: ts.__setitem__(slice(None), [t for t in ts if t[0] != name])


def tensor_set(name, **kv):
    def e(ts):
        for t in ts:
            if t[0] == name:
                if "shape" in kv:
                    t[2] = kv["shape"]
                if "dtype" in kv:
                    t[1] = kv["dtype"]
                if "blob" in kv:
                    t[3] = kv["blob"]
    return e


def hdr(name, **kv):
    return lambda h: h[name].update(kv)


# --- the table ----------------------------------------------------------------------------------------

CASES = []


def case(name, argv, rc, pattern, *mutations, stdin=None):
    CASES.append((name, argv, rc, pattern, mutations, stdin))


GEN = ["generate", "-m", "{dir}", "-p", "hello world", "-n", "2"]


def gen(*extra):
    return GEN + list(extra)


# Flags: every integer flag has a range; values outside it, beyond int64, or not numbers are usage errors.
case("flag: unknown", gen("--bogus"), 2, r"unknown flag '--bogus'")
case("flag: missing value at the end", ["generate", "-m"], 2, r"flag '-m' needs a value")
case("flag: no model", ["generate", "-p", "hi"], 2, r"-m/--model: required")
case("flag: no prompt", ["generate", "-m", "{dir}"], 2, r"exactly one of -p/--prompt and -f/--file")
case("flag: prompt and file", gen("-f", "/dev/null"), 2, r"exactly one of")
case("flag: positional word", gen("extra"), 2, r"unexpected argument 'extra'")
case("flag: lone dash", gen("-"), 2, r"unknown flag '-'")
case("flag: double dash", gen("--"), 2, r"unknown flag '--'")
case("flag: short with =", gen("-n=5"), 2, r"unknown flag '-n=5'")
case("flag: switch with value", gen("--kv-f32=1"), 2, r"'--kv-f32' takes no value")
case("flag: switch with value 2", gen("--chat=yes"), 2, r"'--chat' takes no value")
case("flag: --stop without value", gen("--stop"), 2, r"'--stop' needs a value")
case("flag: --system without --chat", gen("--system", "x"), 2, r"need --chat")
case("flag: --no-think without --chat", gen("--no-think"), 2, r"need --chat")
for flag, val, msg in [
        ("-n", "abc", "not a valid integer"), ("-n", "-1", r"out of range \(must be in \[0, 2147483647\]\)"),
        ("-n", "99999999999999999999", "out of range"), ("-n", "2147483648", "out of range"),
        ("-n", "1.5", "not a valid integer"), ("-n", "", "not a valid integer"), ("-n", " 3", "not a valid integer"),
        ("-n", "3 ", "not a valid integer"), ("-n", "0x", "not a valid integer"), ("-n", "--", "not a valid integer"),
        ("--n-predict", "1e3", "not a valid integer"),
        ("-t", "4294967297", r"4294967297 is out of range \(must be in \[0, 1024\]\)"),
        ("-t", "-1", "out of range"), ("-t", "1025", "out of range"), ("-t", "0x100000001", "out of range"),
        ("--threads", "abc", "not a valid integer"), ("--threads", "-9223372036854775809", "out of range"),
        ("--ctx", "9223372036854775807", r"9223372036854775807 is out of range \(must be in \[0, 2147483647\]\)"),
        ("--ctx", "-5", "out of range"), ("--ctx", "2147483648", "out of range"),
        ("--top-k", "-1", "out of range"), ("--top-k", "1e3", "not a valid integer"),
        ("--seed", "-2", r"out of range \(must be >= -1\)"), ("--seed", "18446744073709551616", "out of range"),
        ("--seed", "abc", "not a valid integer"),
        ("--temp", "nan", "not a valid number"), ("--temp", "inf", "not a valid number"),
        ("--temp", "-inf", "not a valid number"), ("--temp", "1e999", "out of range"), ("--temp", "x", "not a valid number"),
        ("--top-p", "0x", "not a valid number"), ("--presence-penalty", "nan", "not a valid number"),
        ("--frequency-penalty", "inf", "not a valid number"), ("--min-p", "", "not a valid number")]:
    case(f"flag: generate {flag} '{val}'", gen(flag, val), 2, rf"flag '{re.escape(flag)}': .*{msg}")
for flag, val, msg in [("--temp", "-1", "temperature: must be >= 0"), ("--top-p", "1.5", r"top_p: must be in \(0, 1\]"),
                       ("--top-p", "0", "top_p"), ("--min-p", "2", r"min_p: must be in \[0, 1\]"),
                       ("--repeat-penalty", "0", "repetition_penalty: must be > 0"),
                       ("--repeat-penalty", "-1", "repetition_penalty")]:
    case(f"sampler: {flag} {val}", gen("--temp", "0.7", flag, val) if flag != "--temp" else gen(flag, val), 1, msg)
case("command: none", [], 2, r"usage: ksa <command>")
case("command: unknown", ["frobnicate"], 2, r"unknown command 'frobnicate'")
for argv, msg in [
        (["bench", "model"], "-m/--model: required"), (["bench", "model", "-m", "{dir}", "-p", "-1"], "out of range"),
        (["bench", "model", "-m", "{dir}", "-n", "x"], "not a valid integer"), (["bench", "model", "-m", "{dir}", "-r", "0"], "out of range"),
        (["bench", "model", "-m", "{dir}", "-t", "5000"], "out of range"), (["bench", "model", "-m", "{dir}", "--bw-mib", "-1"], "out of range"),
        (["bench", "model", "-m", "{dir}", "-p", "0", "-n", "0"], "must not both be 0"),
        (["bench"], "expected a benchmark"), (["bench", "foo"], "unknown benchmark 'foo'"),
        (["bench", "attn", "--T", "0"], "out of range"), (["bench", "attn", "--T", "99999999"], "out of range"),
        (["bench", "attn", "--k", "0"], "out of range"), (["bench", "attn", "--S", "0"], "out of range"),
        (["bench", "attn", "--W", "-1"], "out of range"), (["bench", "attn", "--batch", "0"], "out of range"),
        (["bench", "attn", "--dim", "0"], "out of range"), (["bench", "attn", "--heads", "3/2"], "--heads"),
        (["bench", "attn", "--heads", "x"], "--heads"), (["bench", "attn", "--dtype", "f64"], "--dtype"),
        (["bench", "attn", "--device", "tpu"], "--device"), (["bench", "attn", "--reps", "0"], "out of range"),
        (["bench", "attn", "--gemm-n", "8"], "out of range"), (["bench", "attn", "-t", "99999"], "out of range"),
        (["bench", "attn", "--docs", "100,x"], "--docs"), (["bench", "attn", "--docs", "0"], "--docs"),
        (["bench", "attn", "--docs", "5,,6"], "--docs"), (["bench", "attn", "--docs", "64"], "--device cuda only"),
        (["bench", "sgemm", "--n", "0"], "out of range"), (["bench", "sgemm", "--n", "100000"], "out of range"),
        (["bench", "sgemm", "--reps", "0"], "out of range"),
        (["demo", "-T", "0"], "out of range"), (["demo", "-k", "0"], "out of range"), (["demo", "-S", "70000"], "out of range"),
        (["demo", "-W", "-1"], "out of range"), (["demo", "--dim", "2000"], "out of range"),
        (["demo", "--check-rows", "-1"], "out of range"), (["demo", "--dtype", "f16"], "--dtype"),
        (["demo", "--heads", "0/0"], "--heads"), (["demo", "--seed", "abc"], "not a valid integer"),
        (["info", "-k", "0"], "out of range"), (["info", "-S", "0"], "out of range"), (["info", "-W", "-1"], "out of range"),
        (["info", "--bogus"], "unknown flag"),
        (["make-model"], "--out: required"), (["make-model", "--out", "{dir}/new", "--shard-mb", "0"], "out of range"),
        (["make-model", "--out", "{dir}/new", "--seed", "x"], "not a valid integer")]:
    case("flag: " + " ".join(a.replace("{dir}", "D") for a in argv), argv, 2, msg)
case("flag: make-model --shape huge", ["make-model", "--out", "{dir}/new", "--shape", "huge"], 1, r"shape: must be tiny, small or 4b")
case("flag: make-model --dtype f64", ["make-model", "--out", "{dir}/new", "--dtype", "f64"], 2, r"--dtype")
case("flag: bench model missing dir", ["bench", "model", "-m", "/nonexistent/model"], 1, r"/nonexistent/model")
case("flag: info missing dir", ["info", "-m", "/nonexistent/model"], 1, r"/nonexistent/model")
case("flag: generate missing dir", gen() + ["-m", "/nonexistent/model"], 1, r"'/nonexistent/model' does not exist")
LONG_PATH = "/tmp/" + "x" * 300  # over NAME_MAX: std::filesystem throws where it is not given an error_code
case("flag: generate -m beyond NAME_MAX", gen() + ["-m", LONG_PATH], 1, r"error: .*File name too long")
case("flag: info -m beyond NAME_MAX", ["info", "-m", LONG_PATH], 1, r"error: .*config\.json: cannot open config\.json")
case("flag: bench model -m beyond NAME_MAX", ["bench", "model", "-m", LONG_PATH], 1, r"error: .*config\.json: cannot open")
case("prompt: file name beyond NAME_MAX", ["generate", "-m", "{dir}", "-f", LONG_PATH], 1, r"cannot read the prompt file")

# config.json
CFG = r"config\.json: .*"
case("config: missing", gen(), 1, r"config\.json: cannot open config\.json", remove("config.json"))
case("config: a directory", gen(), 1, r"config\.json: is a directory, not config\.json", make_dir("config.json"))
case("config: empty", gen(), 1, CFG + "invalid JSON: .*unexpected end of input", text_file("config.json", ""))
case("config: not JSON", gen(), 1, CFG + "invalid JSON", text_file("config.json", "hidden_size = 64"))
case("config: truncated", gen(), 1, CFG + "invalid JSON", text_file("config.json", '{"hidden_size": 64,'))
case("config: a list", gen(), 1, CFG + r"top level: must be a JSON object \(got \[1,2\]\)", text_file("config.json", "[1, 2]"))
case("config: null", gen(), 1, CFG + "top level: must be a JSON object", text_file("config.json", "null"))
case("config: invalid UTF-8", gen(), 1, CFG + "invalid JSON", text_file("config.json", '{"model_type": "\udcff"}'))
case("config: 200,000 levels deep", gen(), 1, CFG + r"invalid JSON: nested deeper than 100 levels \(at byte 100\)",
     text_file("config.json", DEEP))
case("config: deep value", gen(), 1, CFG + "invalid JSON: nested deeper than 100 levels", cfg_raw("hidden_size", DEEP))
case("config: rope_theta 1e309", gen(), 1, CFG + r"invalid JSON: number overflow parsing '1e309' \(a number must fit in a double\)",
     cfg_raw("rope_theta", "1e309"))
case("config: hidden_size -1e400", gen(), 1, CFG + "invalid JSON: number overflow", cfg_raw("hidden_size", "-1e400"))
case("config: unknown key 1e309", gen(), 1, CFG + "invalid JSON: number overflow", cfg_raw("dropout", "1e309"))
for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]:
    case(f"config: {key} missing", gen(), 1, CFG + f"{key}: missing \\(required\\)", cfg_del(key))
    for val, msg in [('"64"', "must be an integer"), ("1.5", "must be an integer"), ("true", "must be an integer"),
                     ("[]", "must be an integer"), ("0", "must be in"), ("-1", "must be in"),
                     ("9223372036854775807", "must be in"), ("18446744073709551615", "must be an integer in range")]:
        case(f"config: {key} = {val}", gen(), 1, CFG + f"{key}: {msg}", cfg_raw(key, val))
for key, val, msg in [
        ("num_key_value_heads", "3", "num_key_value_heads: must be a divisor of num_attention_heads=4 \\(got 3\\)"),
        ("num_key_value_heads", "0", "num_key_value_heads"), ("num_key_value_heads", "-4", "num_key_value_heads"),
        ("head_dim", "15", r"head_dim: must be even and in \[2, 1024\]"), ("head_dim", "0", "head_dim"),
        ("head_dim", "4096", "head_dim"), ("rms_norm_eps", "-1", "rms_norm_eps: must be > 0"), ("rms_norm_eps", "0", "rms_norm_eps"),
        ("rms_norm_eps", '"x"', "rms_norm_eps: must be a number"), ("rope_theta", "0", "rope_theta: must be > 0"),
        ("rope_theta", "-1", "rope_theta"), ("rope_theta", '"big"', "rope_theta: must be a number"),
        ("max_position_embeddings", "0", r"max_position_embeddings: must be in \[1, 2\^31-1\]"),
        ("max_position_embeddings", "9223372036854775807", r"max_position_embeddings: must be in \[1, 2\^31-1\] \(got 9223372036854775807\)"),
        ("max_position_embeddings", "2147483648", "max_position_embeddings"),
        ("summary_token_begin", "9223372036854775807", "summary_token_begin: must be a token id with room for S summary ids"),
        ("summary_token_begin", "-1", "summary_token_begin"), ("summary_token_begin", "400", "summary_token_begin: summary ids 400..400 need vocab_size >= 401"),
        ("summary_chunk_size", "0", r"chunk_size \(summary_chunk_size\): must be in"), ("summary_chunk_size", "2000000", r"chunk_size \(summary_chunk_size\): must be in \[1, 1048576\] \(got 2000000\)"),
        ("summary_token_num", "0", r"S \(summary_token_num\)"), ("summary_token_num", "100000", r"S \(summary_token_num\): must be in \[1, 65536\]"),
        ("summary_sliding_chunk_num", '"[]*9007199254740992"', "summary_sliding_chunk_num: has 0 entries but the model has 4 layers"),
        ("summary_sliding_chunk_num", json.dumps(LONG_REPEAT), "summary_sliding_chunk_num: pattern needs too much work"),
        ("summary_sliding_chunk_num", json.dumps(" " * 300000 + "1"), "summary_sliding_chunk_num: pattern text is 300001 bytes"),
        ("summary_sliding_chunk_num", json.dumps("(" * 100 + "1" + ")" * 100), "summary_sliding_chunk_num: nesting too deep"),
        ("summary_sliding_chunk_num", '"__import__(\'os\')"', "summary_sliding_chunk_num: unexpected '_'"),
        ("summary_sliding_chunk_num", '"[1]*3"', "summary_sliding_chunk_num: has 3 entries but the model has 4 layers"),
        ("summary_sliding_chunk_num", '"([2]*3+[64]*1)**1"', "summary_sliding_chunk_num: '\\*\\*' is not allowed"),
        ("summary_sliding_chunk_num", "1.5", "summary_sliding_chunk_num: must be an integer, a list or a pattern string"),
        ("summary_sliding_chunk_num", '{"a": 1}', "summary_sliding_chunk_num: must be"),
        ("summary_sliding_chunk_num", '"[-1]*4"', "summary_sliding_chunk_num: layer 0 has value -1"),
        ("summary_sliding_chunk_num", "2199023255552", "summary_sliding_chunk_num: layer 0 has value 2199023255552"),
        ("summary_sliding_chunk_num", "[1, [2]]", "summary_sliding_chunk_num: nested lists are not allowed"),
        ("summary_layer_freq", "-2", "summary_layer_freq: must be 0"), ("summary_layer_freq", '"x"', "summary_layer_freq: unexpected 'x'"),
        ("summary_layer_freq", "[2, 0, 0, 0]", "summary_layer_freq: layer 0 has value 2"),
        ("summary_layer_freq", "1.5", "summary_layer_freq: must be"),
        ("use_summary_attention", '"yes"', "use_summary_attention: must be true or false"),
        ("model_type", '"llama"', 'model_type: "llama" is not supported'), ("hidden_act", '"gelu"', "hidden_act"),
        ("attention_bias", "true", "attention_bias: true is not supported"), ("use_sliding_window", "true", "use_sliding_window"),
        ("torch_dtype", '"float64"', 'torch_dtype: "float64" is not supported'), ("torch_dtype", "5", "torch_dtype: must be a string"),
        ("rope_scaling", '{"rope_type": "yarn", "factor": 4}', 'rope_scaling: RoPE type "yarn" is not supported'),
        ("rope_scaling", "5", "rope_scaling: must be null or an object"),
        ("rope_parameters", '{"rope_type": "llama3"}', "rope_parameters: RoPE type"),
        ("rope_parameters", '{"rope_theta": 1e999}', "invalid JSON: number overflow"),
        ("layer_types", '["sliding_attention", "full_attention", "full_attention", "full_attention"]', "layer_types: layer 0"),
        ("layer_types", '"x"', "layer_types: must be a list of strings"), ("layer_types", "[1]", "layer_types: must be a list of strings"),
        ("layer_types", '["full_attention"]', "layer_types: has 1 entries but the model has 4 layers"),
        ("architectures", '"x"', "architectures: must be a list"),
        ("eos_token_id", "999999", "eos_token_id: must be a token id < vocab_size"), ("eos_token_id", '"x"', "eos_token_id: must be an integer"),
        ("eos_token_id", '[1, "x"]', "eos_token_id: must be an integer"), ("bos_token_id", "999999", "bos_token_id"),
        ("mix_coeff", "2", r"mix_coeff: must be in \[0, 1\]"), ("truncate_predict_nums", "-1", "truncate_predict_nums: must be >= 0"),
        ("summary_chunk_position_ids_type", '"middle"', "summary_chunk_position_ids_type: must be"),
        ("summary_token_position_ids_type", "5", "summary_token_position_ids_type: must be a string")]:
    # (once "D/config.json: D/config.json: summary_token_position_ids_type: ...": the prefix only once)
    case(f"config: {key} = {val[:40]}", gen(), 1, r"error: [^:]*config\.json: " + msg, cfg_raw(key, val))
case("config: plain Qwen3 with a context of 2^63-1", gen(), 1, CFG + "max_position_embeddings: must be in",
     cfg(use_summary_attention=False, max_position_embeddings=2**63 - 1))
case("config: plain Qwen3 with a context of 2^31", gen(), 1, CFG + "max_position_embeddings", cfg(use_summary_attention=False, max_position_embeddings=2**31))
case("config: hidden_size unlike the tensors", gen(), 1, r"model\.embed_tokens\.weight.*shape", cfg(hidden_size=128))
case("config: vocab_size unlike the tensors", gen(), 1, r"model\.embed_tokens\.weight.*shape", cfg(vocab_size=400))
case("config: one layer more than the tensors", gen(), 1, r"model\.layers\.4\.", cfg(num_hidden_layers=5, summary_sliding_chunk_num=64))
case("config: untied head without lm_head", gen(), 1, r"lm_head\.weight", cfg(tie_word_embeddings=False))
case("config: head_dim unlike the tensors", gen(), 1, r"q_proj\.weight.*shape", cfg(head_dim=32))

# safetensors checkpoints
ST = r"model\.safetensors: .*"
EMB = "model.embed_tokens.weight"
case("checkpoint: no weights", gen(), 1, r"no model\.safetensors or model\.safetensors\.index\.json", remove("model.safetensors"))
case("checkpoint: a directory", gen(), 1, ST + "not a regular file", make_dir("model.safetensors"))
case("checkpoint: empty file", gen(), 1, ST + "file is 0 bytes, too short", text_file("model.safetensors", ""))
case("checkpoint: 3 bytes", gen(), 1, ST + "file is 3 bytes, too short", text_file("model.safetensors", "abc"))
case("checkpoint: header length 2^64-1", gen(), 1, ST + "header length 18446744073709551615 exceeds the limit",
     st(raw=lambda b: b"\xff" * 8 + b[8:]))
case("checkpoint: header past the end", gen(), 1, ST + "header length .* runs past the end of the file",
     st(raw=lambda b: struct.pack("<Q", len(b)) + b[8:]))
case("checkpoint: header length 1", gen(), 1, ST + "header length 1 is too small", st(raw=lambda b: struct.pack("<Q", 1) + b[8:]))
case("checkpoint: truncated data", gen(), 1, ST + "tensor .* run past the end of the data", st(raw=lambda b: b[:len(b) // 2]))
case("checkpoint: header not JSON", gen(), 1, ST + "header is not valid JSON", st_header_text("not json at all"))
case("checkpoint: header a list", gen(), 1, ST + "header must be a JSON object", st_header_text('["a"]'))
case("checkpoint: header 200,000 levels deep", gen(), 1, ST + r"header is not valid JSON: nested deeper than 100 levels",
     st_header_text('{"a": ' + DEEP + "}"))
case("checkpoint: deep __metadata__", gen(), 1, ST + "nested deeper than 100 levels", st_header_text('{"__metadata__": ' + DEEP + "}"))
case("checkpoint: __metadata__ 1e309", gen(), 1, ST + r"header is not valid JSON: number overflow parsing '1e309'",
     st_header_text('{"__metadata__": {"a": 1e309}}'))
case("checkpoint: shape 1e309", gen(), 1, ST + "number overflow", st_header_text('{"a": {"dtype": "F32", "shape": [1e309], "data_offsets": [0, 4]}}', 4))
case("checkpoint: header invalid UTF-8", gen(), 1, ST + "header is not valid JSON", st_header_text('{"\udcff": 1}'))
case("checkpoint: __metadata__ not strings", gen(), 1, ST + r"__metadata__\.format must be a string", st(meta={"format": 3}))
case("checkpoint: __metadata__ a list", gen(), 1, ST + "__metadata__ must be an object", st(meta=[1]))
case("checkpoint: dtype F64", gen(), 1, ST + 'tensor "model.embed_tokens.weight": dtype "F64" is not supported', st(header=hdr(EMB, dtype="F64")))
case("checkpoint: dtype a number", gen(), 1, ST + "dtype must be a string", st(header=hdr(EMB, dtype=5)))
case("checkpoint: negative dimension", gen(), 1, ST + "shape must be a list of non-negative integers", st(header=hdr(EMB, shape=[-1, 64])))
case("checkpoint: shape a string", gen(), 1, ST + "shape must be a list of integers", st(header=hdr(EMB, shape="x")))
case("checkpoint: shape too large", gen(), 1, ST + "too large", st(header=hdr(EMB, shape=[2**40, 2**40, 2**40])))
case("checkpoint: dimension 2^64-1", gen(), 1, ST + "shape must be a list of non-negative integers", st(header=hdr(EMB, shape=[2**64 - 1])))
case("checkpoint: data_offsets one number", gen(), 1, ST + r"data_offsets must be \[begin, end\]", st(header=hdr(EMB, data_offsets=[0])))
case("checkpoint: data_offsets negative", gen(), 1, ST + "data_offsets must be", st(header=hdr(EMB, data_offsets=[-8, 0])))
case("checkpoint: data_offsets reversed", gen(), 1, ST + "end before they begin", st(header=hdr(EMB, data_offsets=[40960, 0])))
case("checkpoint: data_offsets past the end", gen(), 1, ST + "run past the end of the data",
     st(header=hdr(EMB, data_offsets=[0, 2**63])))
case("checkpoint: bytes unlike the shape", gen(), 1, ST + "needs 40960 bytes but data_offsets", st(header=hdr(EMB, data_offsets=[0, 40958])))
case("checkpoint: overlapping tensors", gen(), 1, ST + "overlap",
     st(header=lambda h: h["model.norm.weight"].update(data_offsets=[0, 128])))
case("checkpoint: a tensor twice", gen(), 1, ST + 'header names tensor "a" twice',
     st_header_text('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', 8))
case("checkpoint: unknown field", gen(), 1, ST + 'unknown field "extra"', st(header=hdr(EMB, extra=1)))
case("checkpoint: entry not an object", gen(), 1, ST + "must be an object with dtype, shape, data_offsets",
     st(header=lambda h: h.__setitem__(EMB, [1, 2])))
case("checkpoint: a layer tensor missing", gen(), 1, r"model\.layers\.1\.self_attn\.q_proj\.weight",
     st(tensors=tensor_del("model.layers.1.self_attn.q_proj.weight")))
case("checkpoint: final norm missing", gen(), 1, r"model\.norm\.weight", st(tensors=tensor_del("model.norm.weight")))
case("checkpoint: embedding of the wrong shape", gen(), 1, r"model\.embed_tokens\.weight.*shape",
     st(tensors=tensor_set(EMB, shape=[V, 32], blob=b"\0" * (V * 32 * 2))))
case("checkpoint: q_proj transposed", gen(), 1, r"q_proj\.weight.*shape",
     st(tensors=tensor_set("model.layers.0.self_attn.q_proj.weight", shape=[32, 128])))
# 8-bit weights (docs/quantization.md): U8 blocks [N, K/32, 34] in a file whose __metadata__ says q8_0.
Q8_META = {"format": "pt", "ksa.quantization": "q8_0"}
QP = "model.layers.0.self_attn.q_proj.weight"  # [64, 64]: 64 rows of 2 blocks


def q8(name, shape, nbytes):
    return tensor_set(name, dtype="U8", shape=shape, blob=b"\0" * nbytes)


case("q8_0: U8 without the metadata", gen(), 1,
     ST + r"dtype \"U8\" is read only as 8-bit weights, and the header's __metadata__ has no \"ksa\.quantization\"",
     st(tensors=q8(QP, [64, 2, 34], 4352)))
case("q8_0: another quantization", gen(), 1, ST + r'__metadata__\.ksa\.quantization is "q4_0"; only "q8_0" is supported',
     st(meta={"format": "pt", "ksa.quantization": "q4_0"}))
case("q8_0: blocks of 33 bytes", gen(), 1, ST + r"must have shape \[N, K/32, 34\], rows of 34-byte blocks \(got \[64, 2, 33\]\)",
     st(tensors=q8(QP, [64, 2, 33], 4224), meta=Q8_META))
case("q8_0: a U8 matrix without blocks", gen(), 1, ST + r"must have shape \[N, K/32, 34\].*\(got \[64, 68\]\)",
     st(tensors=q8(QP, [64, 68], 4352), meta=Q8_META))
case("q8_0: bytes unlike N x K/32 x 34", gen(), 1, ST + r"needs 64 x 2 x 34 = 4352 bytes but data_offsets \[[0-9]+, [0-9]+\] span 4350",
     st(tensors=q8(QP, [64, 2, 34], 4350), meta=Q8_META))
case("q8_0: a norm", gen(), 1, r"model\.norm\.weight: dtype U8 \(q8_0\), expected BF16/F16/F32",
     st(tensors=q8("model.norm.weight", [1, 2, 34], 68), meta=Q8_META))
case("q8_0: a matrix of half the K", gen(), 1, r"q_proj\.weight: shape \[64, 32\], expected \[64, 64\]",
     st(tensors=q8(QP, [64, 1, 34], 2176), meta=Q8_META))
case("control: a q8_0 matrix", gen(), 0, r"weights [0-9.]+ [KM]iB bf16/q8_0 \(norms bf16\)",
     st(tensors=q8(QP, [64, 2, 34], 4352), meta=Q8_META))


def nan_weight(ts):
    for t in ts:
        if t[0] == QP:
            t[3] = b"\xc0\x7f" + t[3][2:]  # bf16 NaN as element 0


def quantized(d):
    r = subprocess.run([KSA, "quantize", "-m", d, "--out", os.path.join(d, "q8"), "-q"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("ksa quantize failed: " + r.stdout + r.stderr)


QUANTIZE = ["quantize", "-m", "{dir}", "--out", "{dir}/q8"]
case("quantize: no --out", ["quantize", "-m", "{dir}"], 2, r"-o/--out: required")
case("quantize: no -m", ["quantize", "--out", "{dir}/q8"], 2, r"-m/--model: required")
case("quantize: --type q4_0", QUANTIZE + ["--type", "q4_0"], 2, r"--type: must be q8_0 \(got 'q4_0'\)")
case("quantize: --shard-mb 0", QUANTIZE + ["--shard-mb", "0"], 2, r"out of range")
case("quantize: into its own directory", ["quantize", "-m", "{dir}", "--out", "{dir}"], 1, r"is the input checkpoint's directory")
case("quantize: a checkpoint unlike its config", QUANTIZE, 1, r"checkpoint does not match config\.json", cfg(hidden_size=128))
case("quantize: already q8_0", QUANTIZE, 1, r"already quantised \(model\.layers\.0\.self_attn\.q_proj\.weight is q8_0\)",
     st(tensors=q8(QP, [64, 2, 34], 4352), meta=Q8_META))
case("quantize: a NaN weight", QUANTIZE, 1, r'"model\.layers\.0\.self_attn\.q_proj\.weight" element 0 \(row 0\) is .*non-finite weight cannot be quantised',
     st(tensors=nan_weight))
case("control: quantize, then generate", ["generate", "-m", "{dir}/q8", "-p", "hello world", "-n", "2"], 0,
     r"weights [0-9.]+ [KM]iB q8_0 \(norms bf16\)", quantized)
case("index: invalid JSON", gen(), 1, r"model\.safetensors\.index\.json: invalid JSON", index_text("{"))
case("index: 200,000 levels deep", gen(), 1, r"index\.json: invalid JSON: nested deeper than 100", index_text('{"weight_map": ' + DEEP + "}"))
case("index: total_size 1e999", gen(), 1, r"index\.json: invalid JSON: number overflow",
     index_text('{"metadata": {"total_size": 1e999}, "weight_map": {}}'))
case("index: no weight_map", gen(), 1, r"index\.json: weight_map: missing", sharded(index=lambda i: i.pop("weight_map")))
case("index: weight_map a list", gen(), 1, r"index\.json: weight_map: must be an object", sharded(index=lambda i: i.__setitem__("weight_map", [])))
case("index: empty weight_map", gen(), 1, r"index\.json: weight_map is empty", sharded(index=lambda i: i.__setitem__("weight_map", {})))
case("index: file name a number", gen(), 1, r"must be a file name", sharded(index=lambda i: i["weight_map"].__setitem__(EMB, 7)))
case("index: file outside the directory", gen(), 1, r"must be a plain file name",
     sharded(index=lambda i: i["weight_map"].__setitem__(EMB, "../model.safetensors")))
case("index: names a missing shard", gen(), 1, r"weight_map names \"model-00003-of-00003\.safetensors\", which does not exist",
     sharded(index=lambda i: i["weight_map"].__setitem__(EMB, "model-00003-of-00003.safetensors")))
case("index: tensor mapped to the other shard", gen(), 1, r"maps it to",
     sharded(index=lambda i: i["weight_map"].__setitem__("model.norm.weight",
                                                          "model-00001-of-00002.safetensors" if i["weight_map"]["model.norm.weight"].startswith("model-00002") else "model-00002-of-00002.safetensors")))
case("index: a tensor not in the map", gen(), 1, r"is not in the weight_map", sharded(index=lambda i: i["weight_map"].pop(EMB)))
case("index: maps a tensor no shard has", gen(), 1, r'has no tensor "extra\.weight"',
     sharded(index=lambda i: i["weight_map"].__setitem__("extra.weight", "model-00001-of-00002.safetensors")))
case("index: shard name beyond NAME_MAX", gen(), 1, r'weight_map names "a{300}", which cannot be read: File name too long',
     sharded(index=lambda i: i["weight_map"].__setitem__(EMB, "a" * 300)))
case("index: tensor in both shards", gen(), 1, r'is here but model\.safetensors\.index\.json maps it to',
     sharded(files=lambda s: s["model-00002-of-00002.safetensors"].append(list(s["model-00001-of-00002.safetensors"][0]))))
case("index: shard header deep", gen(), 1, r"model-00001-of-00002\.safetensors: header is not valid JSON: nested deeper",
     lambda d: (sharded()(d), write(d, "model-00001-of-00002.safetensors", struct.pack("<Q", 400006) + ('{"a":' + "[" * 200000 + "]" * 200000 + "}").encode())))

# tokenizer.json
TJ = r"tokenizer\.json: .*"
case("tokenizer: missing", gen(), 1, r"has no tokenizer\.json", remove("tokenizer.json"))
case("tokenizer: a directory", gen(), 1, r"tokenizer\.json", make_dir("tokenizer.json"))
case("tokenizer: empty", gen(), 1, TJ + "invalid JSON", tok_text(""))
case("tokenizer: a list", gen(), 1, TJ + "top level: must be a JSON object", tok_text("[]"))
case("tokenizer: 200,000 levels deep", gen(), 1, TJ + r"invalid JSON: nested deeper than 100 levels \(at byte 100\)", tok_text(DEEP))
case("tokenizer: deep dropout", gen(), 1, TJ + "invalid JSON: nested deeper than 100 levels", tok_raw(["model", "dropout"], DEEP))
case("tokenizer: deep added token", gen(), 1, TJ + "invalid JSON: nested deeper", tok_raw(["added_tokens"], "[" + DEEP + "]"))
case("tokenizer: dropout 1e309", gen(), 1, TJ + r"invalid JSON: number overflow parsing '1e309'", tok_raw(["model", "dropout"], "1e309"))
case("tokenizer: vocab id 1e309", gen(), 1, TJ + "invalid JSON: number overflow", tok_raw(["model", "vocab", "h"], "1e309"))
case("tokenizer: invalid UTF-8", gen(), 1, TJ + "invalid JSON", tok_raw(["model", "unk_token"], '"\udcff"'))
case("tokenizer: dropout 0.1", gen(), 1, TJ + r"model\.dropout: BPE dropout is not supported", tok(lambda t: t["model"].update(dropout=0.1)))
case("tokenizer: no model", gen(), 1, TJ + "model: missing or not an object", tok(lambda t: t.pop("model")))
case("tokenizer: WordPiece", gen(), 1, TJ + r'model\.type: "WordPiece" is not supported', tok(lambda t: t["model"].update(type="WordPiece")))
case("tokenizer: type a number", gen(), 1, TJ + r"model\.type: must be a string", tok(lambda t: t["model"].update(type=3)))
case("tokenizer: no vocab", gen(), 1, TJ + r"model\.vocab: missing", tok(lambda t: t["model"].pop("vocab")))
case("tokenizer: vocab a list", gen(), 1, TJ + r"model\.vocab: missing or not an object", tok(lambda t: t["model"].update(vocab=[1])))
case("tokenizer: vocab id a string", gen(), 1, TJ + r'model\.vocab\["h"\]: must be a token id', tok(lambda t: t["model"]["vocab"].update(h="x")))
case("tokenizer: vocab id -1", gen(), 1, TJ + r"model\.vocab\[\"h\"\]: must be a token id in \[0, 2\^31\)", tok(lambda t: t["model"]["vocab"].update(h=-1)))
case("tokenizer: vocab id 2^64-1", gen(), 1, TJ + r"model\.vocab\[\"h\"\]: must be a token id", tok(lambda t: t["model"]["vocab"].update(h=2**64 - 1)))
case("tokenizer: vocab id 2^31-1", gen(), 1, TJ + r'model\.vocab\["zz"\]: 2147483647 is far beyond', tok(lambda t: t["model"]["vocab"].update(zz=2**31 - 1)))
case("tokenizer: vocab lacks a byte", gen(), 1, TJ + r"model\.vocab: lacks the byte-level symbol", tok(lambda t: t["model"]["vocab"].pop("a")))
case("tokenizer: two tokens, one id", gen(), 1, TJ + r"model\.vocab: id 104 is given to both", tok(lambda t: t["model"]["vocab"].update(zz=104)))
case("tokenizer: no merges", gen(), 1, TJ + r"model\.merges: missing or not a list", tok(lambda t: t["model"].pop("merges")))
case("tokenizer: merges an object", gen(), 1, TJ + r"model\.merges: missing or not a list", tok(lambda t: t["model"].update(merges={})))
case("tokenizer: merge of one token", gen(), 1, TJ + r"model\.merges\[0\]: must be two tokens", tok(lambda t: t["model"]["merges"].__setitem__(0, "he")))
case("tokenizer: merge of numbers", gen(), 1, TJ + r"model\.merges\[0\]: must be", tok(lambda t: t["model"]["merges"].__setitem__(0, [1, 2])))
case("tokenizer: merge of three", gen(), 1, TJ + r"model\.merges\[0\]: must be", tok(lambda t: t["model"]["merges"].__setitem__(0, ["h", "e", "l"])))
case("tokenizer: merge of an unknown token", gen(), 1, TJ + r'token "zz" is not in the vocabulary', tok(lambda t: t["model"]["merges"].__setitem__(0, ["zz", "e"])))
case("tokenizer: merge result unknown", gen(), 1, TJ + r'the merged token "xy" is not in the vocabulary', tok(lambda t: t["model"]["merges"].__setitem__(0, ["x", "y"])))
case("tokenizer: added_tokens an object", gen(), 1, TJ + "added_tokens: must be a list", tok(lambda t: t.update(added_tokens={})))
case("tokenizer: added token a string", gen(), 1, TJ + r"added_tokens\[0\]: must be an object", tok(lambda t: t["added_tokens"].__setitem__(0, "x")))
case("tokenizer: added id a string", gen(), 1, TJ + r"added_tokens\[0\]: must be an object with an integer id", tok(lambda t: t["added_tokens"][0].update(id="x")))
case("tokenizer: added id -1", gen(), 1, TJ + r"added_tokens\[0\]\.id: must be in \[0, 2\^31\)", tok(lambda t: t["added_tokens"][0].update(id=-1)))
case("tokenizer: added id 200,000,000", gen(), 1, TJ + r"added_tokens\[0\]\.id: 200000000 is far beyond the 265 tokens",
     tok(lambda t: t["added_tokens"][0].update(id=200000000)))
case("tokenizer: added id 2^31-1", gen(), 1, TJ + r"added_tokens\[0\]\.id: 2147483647 is far beyond", tok(lambda t: t["added_tokens"][0].update(id=2**31 - 1)))
case("tokenizer: added id 2^31", gen(), 1, TJ + r"added_tokens\[0\]\.id: must be in", tok(lambda t: t["added_tokens"][0].update(id=2**31)))
case("tokenizer: added content empty", gen(), 1, TJ + r"added_tokens\[0\]\.content: must not be empty", tok(lambda t: t["added_tokens"][0].update(content="")))
case("tokenizer: added content missing", gen(), 1, TJ + r"added_tokens\[0\]: must be an object", tok(lambda t: t["added_tokens"][0].pop("content")))
case("tokenizer: added flag a string", gen(), 1, TJ + r"added_tokens\[0\]\.special: must be true or false", tok(lambda t: t["added_tokens"][0].update(special="yes")))
case("tokenizer: normalizer Lowercase", gen(), 1, TJ + r'normalizer\.type: "Lowercase" is not supported', tok(lambda t: t.update(normalizer={"type": "Lowercase"})))
case("tokenizer: normalizer a string", gen(), 1, TJ + "normalizer: must be an object with a type", tok(lambda t: t.update(normalizer="NFC")))
case("tokenizer: normalizer Sequence without list", gen(), 1, TJ + r"normalizer\.normalizers: must be a list", tok(lambda t: t.update(normalizer={"type": "Sequence"})))
case("tokenizer: no pre_tokenizer", gen(), 1, TJ + "pre_tokenizer: missing", tok(lambda t: t.pop("pre_tokenizer")))
case("tokenizer: pre_tokenizer Metaspace", gen(), 1, TJ + r'pre_tokenizer\.type: "Metaspace" is not supported', tok(lambda t: t.update(pre_tokenizer={"type": "Metaspace"})))
case("tokenizer: no ByteLevel step", gen(), 1, TJ + "pre_tokenizer: has no ByteLevel step", tok(lambda t: t["pre_tokenizer"]["pretokenizers"].pop(1)))
case("tokenizer: pretokenizers not a list", gen(), 1, TJ + r"pre_tokenizer\.pretokenizers: must be a list", tok(lambda t: t["pre_tokenizer"].update(pretokenizers=5)))
case("tokenizer: regex that does not compile", gen(), 1, TJ + r"pre_tokenizer\.pretokenizers\[0\]\.pattern\.Regex: ICU cannot compile",
     tok(lambda t: t["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex="(a")))
case("tokenizer: Split without pattern", gen(), 1, TJ + r"pattern: must be", tok(lambda t: t["pre_tokenizer"]["pretokenizers"][0].pop("pattern")))
case("tokenizer: Split Removed", gen(), 1, TJ + r'behavior: "Removed" is not supported', tok(lambda t: t["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed")))
case("tokenizer: Split inverted", gen(), 1, TJ + r"invert: true is not supported", tok(lambda t: t["pre_tokenizer"]["pretokenizers"][0].update(invert=True)))
case("tokenizer: decoder WordPiece", gen(), 1, TJ + r'decoder: type "WordPiece" is not supported', tok(lambda t: t.update(decoder={"type": "WordPiece"})))
case("tokenizer: post_processor TemplateProcessing", gen(), 1, TJ + r"post_processor: type", tok(lambda t: t.update(post_processor={"type": "TemplateProcessing"})))
case("tokenizer: byte_fallback", gen(), 1, TJ + r"model\.byte_fallback: true is not supported", tok(lambda t: t["model"].update(byte_fallback=True)))
case("tokenizer: subword prefix", gen(), 1, TJ + r"model\.continuing_subword_prefix: is not supported", tok(lambda t: t["model"].update(continuing_subword_prefix="##")))

# tokenizer_config.json (read with --chat) and generation_config.json
TC = r"tokenizer_config\.json: "
CHAT = gen("--chat")
case("chat: tokenizer_config invalid JSON", CHAT, 1, TC + "invalid JSON", text_file("tokenizer_config.json", "{"))
case("chat: tokenizer_config deep", CHAT, 1, TC + "invalid JSON: nested deeper than 100 levels", text_file("tokenizer_config.json", '{"chat_template": ' + DEEP + "}"))
case("chat: tokenizer_config 1e309", CHAT, 1, TC + "invalid JSON: number overflow", text_file("tokenizer_config.json", '{"model_max_length": 1e309, "chat_template": "x"}'))
case("chat: no chat_template", CHAT, 1, TC + "chat_template: missing", text_file("tokenizer_config.json", '{"eos_token": "x"}'))
case("chat: chat_template a number", CHAT, 1, TC + "chat_template: must be a string", text_file("tokenizer_config.json", '{"chat_template": 3}'))
case("chat: template list without default", CHAT, 1, TC + 'chat_template: a list without a "default" entry',
     text_file("tokenizer_config.json", '{"chat_template": [{"name": 1, "template": "x"}]}'))
case("chat: tokenizer_config a list", CHAT, 1, TC + "must be a JSON object", text_file("tokenizer_config.json", "[]"))
GC = r"generation_config\.json: "
case("generation_config: invalid JSON", gen(), 1, GC + "invalid JSON", text_file("generation_config.json", "{"))
case("generation_config: deep", gen(), 1, GC + "invalid JSON: nested deeper than 100 levels", text_file("generation_config.json", '{"eos_token_id": ' + DEEP + "}"))
case("generation_config: 1e309", gen(), 1, GC + "invalid JSON: number overflow", text_file("generation_config.json", '{"temperature": 1e309}'))
case("generation_config: eos a string", gen(), 1, GC + "eos_token_id: expected an integer token id", text_file("generation_config.json", '{"eos_token_id": "x"}'))
case("generation_config: eos list with a string", gen(), 1, GC + "eos_token_id", text_file("generation_config.json", '{"eos_token_id": [1, "x"]}'))
case("generation_config: a list", gen(), 1, GC + "expected a JSON object", text_file("generation_config.json", "[1]"))

# Prompts
case("prompt: invalid UTF-8", ["generate", "-m", "{dir}", "-p", "ok \udcff bad", "-n", "1"], 1, r"not valid UTF-8 \(byte 3 of 8\)")
case("prompt: empty", ["generate", "-m", "{dir}", "-p", "", "-n", "1"], 1, r"the prompt is empty")
case("prompt: missing file", ["generate", "-m", "{dir}", "-f", "/nonexistent/prompt.txt"], 1, r"/nonexistent/prompt\.txt: cannot read")
case("prompt: file is a directory", ["generate", "-m", "{dir}", "-f", "{dir}"], 1, r"cannot read|prompt")
case("prompt: file of invalid UTF-8", ["generate", "-m", "{dir}", "-f", "{dir}/p.txt"], 1, r"not valid UTF-8", text_file("p.txt", "a\udcfe\udcff"))
case("prompt: stdin of invalid UTF-8", ["generate", "-m", "{dir}", "-f", "-"], 1, r"not valid UTF-8", stdin=b"\xc3\x28")
case("prompt: 1 MB of spaces over the context", ["generate", "-m", "{dir}", "-f", "{dir}/p.txt", "--ctx", "16"], 1,
     r"the prompt is \d+ tokens, more than the context limit of 16 \(--ctx\)", text_file("p.txt", " " * 1000000))
case("prompt: 500 KB of newlines over the context", ["generate", "-m", "{dir}", "-f", "{dir}/p.txt", "--ctx", "8"], 1,
     r"more than the context limit of 8", text_file("p.txt", "\n" * 500000))
case("prompt: 500 KB of CRLF over the config's context", ["generate", "-m", "{dir}", "-f", "{dir}/p.txt"], 1,
     r"more than the context limit of 256 \(config\.json max_position_embeddings", text_file("p.txt", "\r\n" * 250000))
case("prompt: 200 KB of letters over the context", ["generate", "-m", "{dir}", "-f", "{dir}/p.txt", "--ctx", "16"], 1,
     r"more than the context limit", text_file("p.txt", "a" * 200000))
case("prompt: over --ctx 1", gen("--ctx", "1"), 1, r"more than the context limit of 1 \(--ctx\)")
case("prompt: chat system message of invalid UTF-8", gen("--chat", "--system", "\udcff"), 1, r"not valid UTF-8")
# Controls: the base checkpoint works, so the errors above come from the mutations.
case("control: the base checkpoint generates", gen(), 0, r"prompt eval time")
case("control: chat", gen("--chat", "--no-think"), 0, r"prompt eval time")
case("control: sharded", gen(), 0, r"prompt eval time", sharded())
case("control: a norm stored in F32", gen(), 0, r"prompt eval time",
     st(tensors=tensor_set("model.norm.weight", dtype="F32", blob=b"\0\0\x80\x3f" * 64)))


# --- running ---------------------------------------------------------------------------------------------

BAD_OUTPUT = re.compile(r"unexpected error|runtime error:|Sanitizer|terminate called|Assertion")


def run_case(i, c):
    name, argv, rc_want, pattern, mutations, stdin = c
    d = os.path.join(ROOT, "cases", f"{i:03d}")
    os.makedirs(d)
    for f in os.listdir(BASE):
        os.link(os.path.join(BASE, f), os.path.join(d, f))
    for m in mutations:
        m(d)
    cmd = [KSA] + [a.replace("{dir}", d).encode("utf-8", "surrogateescape") for a in argv]
    try:
        r = subprocess.run(cmd, input=stdin if stdin is not None else b"", capture_output=True, timeout=TIMEOUT_S)
        out, rc = (r.stdout + r.stderr).decode("utf-8", "replace"), r.returncode
    except subprocess.TimeoutExpired:
        out, rc = "", "timeout"
    problems = []
    if rc == "timeout":
        problems.append(f"no exit within {TIMEOUT_S} s")
    elif rc < 0:
        problems.append(f"killed by signal {-rc}")
    elif rc != rc_want:
        problems.append(f"exit {rc}, expected {rc_want}")
    if BAD_OUTPUT.search(out):
        problems.append("output has " + repr(BAD_OUTPUT.search(out).group(0)))
    if not re.search(pattern, out):
        problems.append(f"output lacks /{pattern}/")
    if not problems:
        shutil.rmtree(d)
    return name, problems, out


if __name__ == "__main__":
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    BASE, BASE_TENSORS, BASE_META = make_base()
    BASE_TENSORS = [tuple(t) for t in BASE_TENSORS]
    cases = [c for c in CASES if ARGS.k in c[0]]
    fails = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=ARGS.j) as pool:
        for (name, problems, out), c in zip(pool.map(lambda ic: run_case(*ic), enumerate(cases)), cases):
            last = out.strip().splitlines()[-1] if out.strip() else ""
            if problems:
                fails += 1
                print(f"FAIL {name}: {'; '.join(problems)}\n     {' '.join(a[:60] for a in c[1])}\n     "
                      + "\n     ".join(out.strip().splitlines()[-4:])[:1500])
            else:
                print(f"ok   {name}: exit {c[2]}: {last[:160]}")
            if ARGS.v:
                print(out)
    print(f"{len(cases)} cases, {fails} failed")
    if fails == 0:
        shutil.rmtree(ROOT, ignore_errors=True)
    sys.exit(1 if fails else 0)
