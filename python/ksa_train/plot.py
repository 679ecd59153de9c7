"""Loss curves (and the passkey / perplexity figure) as PNG with matplotlib.

    python3 -m ksa_train.plot RUN_DIR... -o loss.png      # RUN_DIR/loss.csv of each training run
"""
import argparse
import csv
import pathlib


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def plot(run_dirs, out_png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for d in run_dirs:
        d = pathlib.Path(d)
        rows = read_csv(d / "loss.csv")
        name = d.name
        tok = [int(r["tokens"]) / 1e6 for r in rows]
        ax[0].plot(tok, [float(r["loss"]) for r in rows], label=name)
        ax[1].plot(tok, [float(r["answer_loss"]) for r in rows], label=name)
    ax[0].set(xlabel="training tokens (M)", ylabel="text loss (nats/token)", title="training loss")
    ax[1].set(xlabel="training tokens (M)", ylabel="answer-digit loss (nats)", title="passkey answer loss",
              yscale="log")
    for x in ax:
        x.grid(alpha=0.3)
        x.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("-o", "--out", default="loss.png")
    a = ap.parse_args()
    plot(a.runs, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
