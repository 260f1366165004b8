"""Draw docs/compare.png from bench/compare.py's results (JSON on stdin).

Runs in the bench-only ``plot`` venv (matplotlib), never in the project's.
Usage: python plot.py OUT.png < results.json
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OPS = ["create", "save", "bulk_create", "update", "delete"]


def main(out: str) -> None:
    data = json.load(sys.stdin)
    res, sizes = data["results"], data["sizes"]
    base = res["none"]
    alts = [k for k in res if k != "none"]
    labels = ["create()\n1 row", "save()\n1 row", f"bulk_create\n{sizes['n_bulk']:,} rows",
              f"update()\n{sizes['n_bulk']:,} rows",
              f"cascading delete()\n{sizes['n_delete'] * (1 + sizes['children']):,} rows"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 8.5), sharex=True)
    width = 0.8 / max(len(alts), 1)
    for ax, metric, title, heading in ((axes[0], "times", "time", "Time"), (axes[1], "wal", "WAL bytes", "WAL bytes")):
        for i, key in enumerate(alts):
            if metric == "times":
                ratios = [res[key]["time_ratio"][op] for op in OPS]
            else:
                ratios = [res[key][metric][op] / base[metric][op] if base[metric][op] else 0 for op in OPS]
            xs = [x + (i - (len(alts) - 1) / 2) * width for x in range(len(OPS))]
            missed = [res[key]["capture"].get(op, {}).get("captured", 1) == 0 for op in OPS]
            bars = ax.bar(xs, ratios, width, label=res[key]["label"])
            for bar, x, r, miss in zip(bars, xs, ratios, missed):
                if miss:  # cheap because nothing was recorded: say so on the bar
                    bar.set_hatch("//")
                    bar.set_alpha(0.45)
                text = "not\nrecorded" if miss else f"{r:.1f}"
                ax.annotate(text, (x, r), ha="center", va="bottom", fontsize=6 if miss else 7)
        ax.axhline(1, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{title} / no tracking (log)")
        ax.set_title(f"{heading} per operation, relative to no tracking (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(OPS)), labels)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Django audit trails on PostgreSQL ({data['date']}, {data['machine']['nproc']} cores; "
                 f"median of {sizes['rounds']} interleaved rounds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
