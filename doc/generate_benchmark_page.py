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
        "Generated from the JSON written by ``benchmarks/bench_*.py`` into",
        "``benchmarks/results/`` (the repository ships the last full run of",
        "each). Each script runs skbilevel and its peers in the same process on",
        "the same machine and reports ratios; rerun a script to refresh its",
        "table. The targets are the ones the issues set; a target marked ``no``",
        "is not met. Timings on a shared machine are noisy: treat ratios near 1",
        "as ties.",
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
        when = f", {data['date']}" if data.get("date") else ""
        parts.append(
            f"torch {data.get('torch')}, {data.get('cpu_count')} CPUs, "
            f"{data.get('torch_threads', '?')} torch thread(s), "
            f"{'quick' if data.get('quick') else 'full'} mode, {data.get('machine')}{when}."
        )
        parts.append("")
        rows = data.get("rows") or []
        if rows:
            parts += [_table(rows), ""]
        for key, value in data.items():
            # further tables (memory, peers, ...) and the targets, each under its name
            if key == "rows" or not isinstance(value, list) or not value:
                continue
            if not all(isinstance(r, dict) for r in value):
                continue
            parts += [f"**{key}**", "", _table(value), ""]
    with open(os.path.join(doc_dir, "benchmarks.rst"), "w") as fh:
        fh.write("\n".join(parts) + "\n")
