"""Evaluates trained checkpoints through the C++ engine and writes the README table and figure.

    python3 -m ksa_train.report --ksa build/bin/ksa --runs RUNS_DIR [--names full,swa,ksa] --heldout FILE
        [--ctx 4096] [--lengths 256,512,1024,2048,4096] [--trials 20] [--seed 0] [--out DIR]

For each RUNS_DIR/<name>/model: `ksa perplexity -m ... -f HELDOUT --ctx CTX` (held-out perplexity and the KV
bytes of one sequence at CTX tokens) and `ksa eval passkey -m ... -f HELDOUT --lengths ... --trials ...`;
the outputs are kept verbatim in OUT/<name>.perplexity.txt and OUT/<name>.passkey.txt, parsed into
OUT/results.json, OUT/results.md (a markdown table) and OUT/passkey.png (accuracy vs distance; perplexity and
KV bytes in the legend).
"""
import argparse
import json
import pathlib
import re
import subprocess

LABEL = {"full": "full causal attention", "swa": "sliding window (W*k = 128)", "ksa": "KSA (k=8, S=1, W*k = 128)"}


def run(cmd):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ksa", default="build/bin/ksa")
    ap.add_argument("--runs", required=True)
    ap.add_argument("--names", default="full,swa,ksa")
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--lengths", default="256,512,1024,2048,4096")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    runs = pathlib.Path(a.runs)
    out = pathlib.Path(a.out or runs / "eval")
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    for name in a.names.split(","):
        m = runs / name / "model"
        common = ["-m", m, "--device", "cpu", "-t", a.threads]
        ppl_out = run([a.ksa, "perplexity", *common, "-f", a.heldout, "--ctx", a.ctx])
        (out / f"{name}.perplexity.txt").write_text(ppl_out)
        pk_out = run([a.ksa, "eval", "passkey", *common, "-f", a.heldout, "--lengths", a.lengths, "--trials", a.trials,
                      "--seed", a.seed])
        (out / f"{name}.passkey.txt").write_text(pk_out)
        p = re.search(r"tokens scored (\d+).*mean NLL ([0-9.]+) nats, ppl ([0-9.]+)", ppl_out)
        kv = re.search(r"KV cache at (\d+) tokens: (\d+) bytes .* vs (\d+) bytes full attention", ppl_out)
        acc = {int(x[0]): float(x[1]) for x in re.findall(r"^\s+(\d+)\s+\d+\s+\d+\s+([0-9.]+)\s", pk_out, re.M)}
        summary = runs / name / "summary.json"
        res[name] = {"scored": int(p.group(1)), "nll": float(p.group(2)), "ppl": float(p.group(3)),
                     "kv_ctx": int(kv.group(1)), "kv_bytes": int(kv.group(2)), "kv_full_bytes": int(kv.group(3)),
                     "passkey": acc, "train": json.loads(summary.read_text()) if summary.exists() else None}
        print(f"{name}: ppl {res[name]['ppl']:.3f}, KV {res[name]['kv_bytes']} bytes at {a.ctx}; passkey {acc}")
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    lengths = [int(x) for x in a.lengths.split(",")]
    lines = ["| model | held-out ppl (ctx %d) | KV cache at %d tokens | %s |" % (a.ctx, a.ctx, " | ".join(f"passkey @{d}" for d in lengths)),
             "|---|---|---|" + "---|" * len(lengths)]
    for name, r in res.items():
        lines.append(f"| {LABEL.get(name, name)} | {r['ppl']:.2f} | {r['kv_bytes'] / 2**20:.2f} MiB | " +
                     " | ".join(f"{r['passkey'].get(d, float('nan')):.2f}" for d in lengths) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no passkey.png")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in res.items():
        xs = sorted(r["passkey"])
        ax.plot(xs, [r["passkey"][x] for x in xs], marker="o",
                label=f"{LABEL.get(name, name)}: ppl {r['ppl']:.1f}, KV@{a.ctx} {r['kv_bytes'] / 2**20:.2f} MiB")
    ax.axvline(128, color="gray", ls=":", lw=1)
    ax.set(xscale="log", xlabel="passkey distance (tokens)", ylabel=f"accuracy ({a.trials} trials, greedy)",
           ylim=(-0.05, 1.05), title="Passkey retrieval vs distance (engine, CPU)")
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(x) for x in lengths])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "passkey.png", dpi=110)
    print(f"wrote {out / 'passkey.png'}")


if __name__ == "__main__":
    main()
