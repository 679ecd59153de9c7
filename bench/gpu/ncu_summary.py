"""Sums Nsight Compute's per-kernel durations (ncu --csv --metrics gpu__time_duration.sum) by kernel name,
over the launches of the last forward pass in the file (the launches after the last embedding kernel).

    python3 bench/gpu/ncu_summary.py ncu.csv
"""
import collections
import csv
import sys


def main():
    rows = []
    with open(sys.argv[1], newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        rows.append((r["Kernel Name"], float(r["Metric Value"].replace(",", ""))))
    if not rows:
        print("no kernel durations in", sys.argv[1])
        return
    starts = [i for i, (n, _) in enumerate(rows) if "embed" in n]
    last = rows[starts[-2]:starts[-1]] if len(starts) >= 2 else rows[starts[0]:] if starts else rows
    total = sum(t for _, t in last)
    by = collections.defaultdict(lambda: [0, 0.0])
    for n, t in last:
        short = n.split("(")[0][:90]
        by[short][0] += 1
        by[short][1] += t
    print(f"one forward: {len(last)} kernels, {total / 1e3:.1f} us of kernel time")
    print("| kernel | launches | us | share |")
    print("|---|---|---|---|")
    for n, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"| {n} | {c} | {t / 1e3:.1f} | {100 * t / total:.1f}% |")


if __name__ == "__main__":
    main()
