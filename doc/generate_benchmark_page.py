"""Write ``doc/benchmarks.rst`` from the JSON files under ``benchmarks/results``.

Run by ``conf.py`` at build time, so the page always shows the latest results
that were generated on this machine (``python benchmarks/bench_*.py``).
"""

import glob
import json
import os


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).replace("|", "/")


def _table(rows):
    columns = []
    for row in rows:
        for key in row:
            if key not in columns and not isinstance(row[key], (dict, list)):
                columns.append(key)
    lines = [".. list-table::", "   :header-rows: 1", ""]
    lines.append("   * - " + "\n     - ".join(columns))
    for row in rows:
        lines.append("   * - " + "\n     - ".join(_cell(row.get(c, "")) or " " for c in columns))
    return "\n".join(lines)


def write_benchmark_page(doc_dir):
    results = os.path.join(doc_dir, "..", "benchmarks", "results")
    parts = [
        "Benchmarks",
        "==========",
        "",
        "Generated from the JSON written by ``benchmarks/bench_*.py``. Each",
        "script runs skbilevel and its peers in the same process on the same",
        "machine and reports ratios; rerun a script to refresh its table.",
        "",
    ]
    files = sorted(glob.glob(os.path.join(results, "*.json")))
    if not files:
        parts.append("No results yet: run ``python benchmarks/bench_ridge.py`` (etc.).")
    for path in files:
        with open(path) as fh:
            data = json.load(fh)
        title = f"{data.get('topic', os.path.basename(path))}"
        parts += [title, "-" * len(title), ""]
        parts.append(
            f"torch {data.get('torch')}, {data.get('cpu_count')} CPUs, "
            f"{'quick' if data.get('quick') else 'full'} mode, {data.get('machine')}."
        )
        parts.append("")
        rows = data.get("rows") or []
        if rows:
            parts += [_table(rows), ""]
    with open(os.path.join(doc_dir, "benchmarks.rst"), "w") as fh:
        fh.write("\n".join(parts) + "\n")
