#!/usr/bin/env python3
"""Quantiles of kontext's latency histograms between two /metrics snapshots.

    bench/histogram_delta.py before.txt after.txt

For each histogram series (kontext_event_to_applied_seconds and kontext_log_to_applied_seconds
by kind, kontext_process_step_seconds by loop and step), prints the values recorded between
the snapshots (updates applied; batches for the processor's steps) and, for p50/p90/p99, the
upper bound of the bucket the quantile falls in ("<=7ms": at most 7 ms).
"""
import re
import sys

LINE = re.compile(r'^kontext_(\w+)_seconds_bucket\{(.*?),?le="([^"]+)"\} (\d+)$')


def load(path):
    series = {}
    with open(path) as f:
        for line in f:
            m = LINE.match(line.strip())
            if m:
                labels = m[2].rstrip(",").replace('"', "")
                series.setdefault((m[1], labels), {})[m[3]] = int(m[4])
    return series


def bound(le):
    return "+Inf" if le == "+Inf" else f"{float(le) * 1000:g}ms"


before, after = load(sys.argv[1]), load(sys.argv[2])
for key, buckets in sorted(after.items()):
    counts = [(le, n - before.get(key, {}).get(le, 0)) for le, n in buckets.items()]
    total = counts[-1][1]
    unit = "batches" if key[0] == "process_step" else "updates"
    if total == 0:
        print(f"{key[0]}{{{key[1]}}} {unit}=0")
        continue
    quantiles = []
    for q in (0.5, 0.9, 0.99):
        le = next((le for le, n in counts if n >= q * total), "+Inf")
        quantiles.append(f"p{round(q * 100)}<={bound(le)}")
    print(f"{key[0]}{{{key[1]}}} {unit}={total} " + " ".join(quantiles))
