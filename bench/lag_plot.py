"""Draw docs/operations-lag.png from bench/lag.py's samples (JSON on stdin).

Runs in the bench-only ``plot`` venv (matplotlib), never in the project's.
Usage: python lag_plot.py OUT.png < .bench/lag.json
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str) -> None:
    data = json.load(sys.stdin)
    samples = data["samples"]
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    lag_s, wal, rate = axes

    lag_s.plot(t, [s["lag_seconds"] if s["lag_seconds"] is not None else float("nan") for s in samples],
               color="tab:red")
    lag_s.set_ylabel("seconds")
    lag_s.set_title("bemi_replication_lag_seconds (bemi_status while the worker is down)")

    mb = 1024 * 1024
    wal.plot(t, [(s["lag_bytes"] or 0) / mb for s in samples], label="lag (bemi_replication_lag_bytes)",
             color="tab:orange")
    wal.plot(t, [(s["retained_wal_bytes"] or 0) / mb for s in samples],
             label="WAL the slot retains (bemi_slot_retained_wal_bytes)", color="tab:purple")
    wal.set_ylabel("MB")
    wal.legend(fontsize=8, loc="upper left")
    wal.set_title("WAL behind the worker and WAL kept on disk for it")

    rates, times = [], []
    for a, b in zip(samples, samples[1:]):
        if b["t"] > a["t"]:
            times.append(b["t"])
            rates.append(max(b["stored"] - a["stored"], 0) / (b["t"] - a["t"]))
    rate.plot(times, [r if r > 0 else float("nan") for r in rates], ".-", markersize=3, color="tab:green")
    rate.set_yscale("log")
    rate.set_ylabel("changes/s (log)")
    rate.set_xlabel("seconds since the start of the load")
    rate.set_title("changes stored per second (rate(bemi_changes_written_total[...])); "
                   "a transaction's changes appear at its commit")

    phases = data["phases"]
    end = t[-1] if t else 0
    for ax in axes:
        ax.grid(alpha=0.3)
        for (name, start), (_next, stop) in zip(phases, phases[1:] + [["", end]]):
            if name == "worker stopped":
                ax.axvspan(start, stop, color="grey", alpha=0.15)
            ax.axvline(start, color="grey", linewidth=0.6)
    for name, start in phases:
        lag_s.annotate(name, (start, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                       textcoords="offset points", fontsize=8)
    version = data["postgres"].split()[0]
    fig.suptitle(f"Worker lag during a load run: {data['rate']} transactions/s, a {data['burst_rows']:,}-row burst, "
                 f"the worker stopped for a while\n(bench/lag.py; PostgreSQL {version}, {data['nproc']} cores, "
                 f"{data['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1])
