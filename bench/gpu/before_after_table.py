#!/usr/bin/env python3
"""The table of bench/gpu/before_after.sh: median over the rounds of each timing, before and after."""
import re
import statistics
import sys

times = {}  # (metric, which) -> [values]
which = shape = None  # shape: what the next forward/backward lines time
for line in open(sys.argv[1]):
    m = re.match(r"== round \d+ (before|after) (attn T=(\d+)|decode|docs)", line)
    if m:
        which = m.group(1)
        shape = f"T={int(m.group(3)) // 1024}K" if m.group(3) else "packed docs" if m.group(2) == "docs" else None
        continue
    if line.startswith("one stream of the same visible pairs"):
        shape = "one stream, the docs' pairs"
        continue
    m = re.match(r"(forward|backward):\s+median\s+([\d.]+) ms", line)
    if m and shape:
        times.setdefault((f"{m.group(1)} {shape} (ms)", which), []).append(float(m.group(2)))
        continue
    m = re.match(r"packed / one stream: forward ([\d.]+)x, backward ([\d.]+)x, forward\+backward ([\d.]+)x", line)
    if m:
        for name, g in (("forward", 1), ("backward", 2), ("forward+backward", 3)):
            times.setdefault((f"packed / one stream, {name} (ratio)", which), []).append(float(m.group(g)))
        continue
    m = re.match(r"(B=1 T=16K|B=1 T=128K|B=64 mixed 4K-128K)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", line)
    if m:
        times.setdefault((f"decode step {m.group(1)} (us)", which), []).append(float(m.group(4)))
        times.setdefault((f"decode {m.group(1)} (GB/s)", which), []).append(float(m.group(6)))
        times.setdefault((f"decode plan {m.group(1)} (us, host)", which), []).append(float(m.group(7)))

metrics = list(dict.fromkeys(k[0] for k in times))
print("| timing | before (median) | after (median) | after / before | spread before | spread after |")
print("|---|---|---|---|---|---|")
for name in metrics:
    b, a = times.get((name, "before"), []), times.get((name, "after"), [])
    if not b or not a:
        continue
    mb, ma = statistics.median(b), statistics.median(a)
    print(f"| {name} | {mb:.3f} | {ma:.3f} | {ma / mb:.3f} | {min(b):.3f}-{max(b):.3f} | {min(a):.3f}-{max(a):.3f} |")
