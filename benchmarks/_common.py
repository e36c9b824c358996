"""Shared plumbing for the benchmark scripts: arguments, timing, tables, JSON.

Every ``bench_*.py`` script compares skbilevel with its peers in one run and
reports ratios. ``--quick`` shrinks the problems so CI can run the script in
well under a minute; full runs are what the closing notes quote.
"""

import argparse
import datetime
import json
import os
import platform
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(topic, description):
    """Standard command line: ``--quick`` and ``--json PATH``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small problems, for CI")
    parser.add_argument(
        "--json",
        default=None,
        help=(
            f"where to write the results (default: benchmarks/results/{topic}.json, "
            f"or benchmarks/results/quick/{topic}.json with --quick, so that a quick "
            "pass never replaces the shipped full run)"
        ),
    )
    args = parser.parse_args()
    if args.json is None:
        folder = os.path.join(RESULTS_DIR, "quick") if args.quick else RESULTS_DIR
        args.json = os.path.join(folder, f"{topic}.json")
    return args


def timed(fn, *args, repeat=1, **kwargs):
    """Run ``fn`` ``repeat`` times; return ``(last result, best wall time in s)``."""
    best, result = float("inf"), None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return result, best


def _fmt(value):
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def print_table(rows, columns=None, title=None):
    """Print a list of dicts as an aligned text table; return the text."""
    if not rows:
        return ""
    columns = columns or list(rows[0])
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path, topic, rows, quick, **extra):
    """Write results with enough context (machine, versions, mode) to compare runs."""
    import numpy as np
    import torch

    import skbilevel

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {
        "topic": topic,
        "quick": bool(quick),
        "skbilevel": skbilevel.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "rows": rows,
        **extra,
    }
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, default=float)
    print(f"wrote {path}")
