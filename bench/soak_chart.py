"""Draws a soak's CSV (bench/soak.py) as one PNG: memory, descriptors and threads, the buffer,
and the message rates, over time, with the broker restarts, reloads and the replay marked.

    soak_chart.py DIR OUT.png     # DIR holds soak.csv and marks.json
"""

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARK_STYLE = {"broker": ("tab:gray", ":"), "reload": ("tab:green", "--"), "replay": ("tab:red", "-")}


def rates(rows, column):
    """Per-second rate of a cumulative column between samples (0 across a process restart)."""
    out = [0.0]
    for before, after in zip(rows, rows[1:]):
        dt = after["t_s"] - before["t_s"]
        delta = after[column] - before[column]
        out.append(delta / dt if dt > 0 and delta >= 0 else 0.0)
    return out


def main():
    work, target = Path(sys.argv[1]), sys.argv[2]
    with open(work / "soak.csv") as f:
        rows = [{k: (v if k == "lambda_mode" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
    marks = json.loads((work / "marks.json").read_text()) if (work / "marks.json").exists() else []
    minutes = [r["t_s"] / 60 for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    axes[0].plot(minutes, [r["rss_kib"] / 1024 for r in rows], color="tab:blue")
    axes[0].set_ylabel("RSS (MiB)")
    axes[1].plot(minutes, [r["fds"] for r in rows], label="open fds", color="tab:purple")
    axes[1].plot(minutes, [r["threads"] for r in rows], label="threads", color="tab:orange")
    axes[1].set_ylabel("count")
    axes[1].legend(loc="upper left")
    axes[2].plot(minutes, [r["buffer_messages"] for r in rows], label="buffered messages", color="tab:brown")
    axes[2].set_ylabel("messages")
    bytes_axis = axes[2].twinx()
    bytes_axis.plot(minutes, [r["buffer_dir_bytes"] / 1024 for r in rows], color="tab:olive", alpha=0.6)
    bytes_axis.set_ylabel("buffer dir (KiB)", color="tab:olive")
    axes[2].legend(loc="upper left")
    axes[3].plot(minutes, rates(rows, "published"), label="published/s", color="tab:gray")
    axes[3].plot(minutes, rates(rows, "accepted"), label="accepted by Lambda/s", color="tab:green")
    axes[3].set_ylabel("messages/s")
    axes[3].set_xlabel("minutes")
    axes[3].legend(loc="upper left")
    for ax in axes:
        for t, action in marks:
            color, style = MARK_STYLE.get(action, ("black", "-"))
            if action in MARK_STYLE:
                ax.axvline(t / 60, color=color, linestyle=style, linewidth=0.8, alpha=0.7)
        ax.grid(alpha=0.3)
    axes[0].set_title("soak: RSS, fds, buffer, rates (gray: broker restart, green: reload, red: dead-letter replay)")
    fig.tight_layout()
    fig.savefig(target, dpi=80)


if __name__ == "__main__":
    main()
