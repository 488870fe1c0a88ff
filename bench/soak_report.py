"""The soak's picture: RSS per process, Redis and PostgreSQL over time, windows shaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.soak_checks import Windows, series


def chart(samples: Sequence[dict[str, Any]], windows: Windows, path: Path, title: str) -> None:
    """Draw four panels over time: RSS, Redis memory and keys, table sizes, the ledger."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 9), sharex=True)
    rss, redis_ax, tables_ax, ledger_ax = axes.flat
    labels: dict[str, None] = {}
    for sample in samples:
        labels.update(dict.fromkeys(sample["rss_mb"]))
    for label in labels:
        _plot(rss, series(samples, "rss_mb", label), label)
    rss.set_ylabel("RSS MB")
    rss.set_title("resident memory per process")
    _plot(redis_ax, series(samples, "redis_used_mb"), "Redis used_memory MB", color="#c53030")
    redis_ax.set_ylabel("MB")
    keys_ax = redis_ax.twinx()
    _plot(keys_ax, series(samples, "result_keys"), "result keys", color="#2b6cb0")
    keys_ax.set_ylabel("keys")
    redis_ax.set_title("Redis: memory and result keys (expire after retention)")
    _legend(redis_ax, keys_ax)
    names: dict[str, float] = {}
    for sample in samples:
        for name, mb in sample["table_mb"].items():
            names[name] = max(names.get(name, 0.0), mb)
    for name in sorted(names, key=lambda n: -names[n])[:5]:
        _plot(tables_ax, series(samples, "table_mb", name), name)
    tables_ax.set_ylabel("MB (table + indexes + TOAST)")
    tables_ax.set_title("PostgreSQL: largest tables")
    _plot(ledger_ax, series(samples, "jobs_rows"), "rows in jobs", color="#2f855a")
    _plot(ledger_ax, series(samples, "finished_jobs_rows"), "of which finished", "#68d391")
    _plot(ledger_ax, series(samples, "backlog"), "backlog (accepted, not finished)", "#805ad5")
    ledger_ax.set_ylabel("jobs")
    ledger_ax.set_title("PostgreSQL: jobs kept (pruned after retention) and the backlog")
    for ax in axes.flat:
        ax.axvspan(*windows.early, color="#ecc94b", alpha=0.15)
        ax.axvspan(*windows.late, color="#ed8936", alpha=0.15)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in (rss, tables_ax, ledger_ax):
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[1]:
        ax.set_xlabel("seconds into the load (shaded: compared windows)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot(ax: Any, points: list[tuple[float, float]], label: str, color: str | None = None) -> None:
    ax.plot([t for t, _ in points], [v for _, v in points], label=label, color=color, lw=1.2)


def _legend(*axes: Any) -> None:
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    axes[0].legend(handles, labels, fontsize=7, loc="lower right")
