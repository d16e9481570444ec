"""The study's plot: each gate's metric against the accuracy the checkpoint loses, thresholds drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"pass": "tab:green", "no-fail": "tab:orange", "fail": "tab:red", "any": "tab:purple"}
LABELS = {
    "pass": "synchronised (must pass, no warning)",
    "no-fail": "unsynchronised, iid shards (must not fail)",
    "fail": "unsynchronised, non-iid shards (must fail)",
    "any": "unsynchronised, Dirichlet(1.0) or uneven shards (no requirement)",
}


def write(path: Path, records: list[dict[str, Any]], study: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    _compare_panel(left, study["compare"])
    _drift_panel(right, study["drift"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _thresholds(ax: Any, rule: dict[str, Any]) -> None:
    ax.axvline(rule["warn"], color="goldenrod", linestyle="--", label=f"warn {rule['warn']:g}")
    ax.axvline(rule["error"], color="firebrick", linestyle="--", label=f"error {rule['error']:g}")
    ax.set_xscale("log")


def _compare_panel(ax: Any, study: dict[str, Any]) -> None:
    metric = study["metric"]
    seen = set()
    for p in study["tuning"]["points"] + study["heldout"]["points"]:
        label = p["label"]
        loss = p["loss_points"]
        value = max(p["value"], 1e-7)
        marker = "o" if p["half"] == "tuning" else "^"
        ax.scatter(
            value,
            loss,
            c=COLOURS[label],
            marker=marker,
            s=36,
            edgecolors="black",
            linewidths=0.4,
            label=LABELS[label] if label not in seen else None,
        )
        seen.add(label)
    _thresholds(ax, study["rule"])
    ax.set_xlabel(f"compare: {metric.replace('_', ' ')} KL(pooled || rank), worst layer and rank (nats)")
    ax.set_ylabel("accuracy points the worst rank loses vs. recalibrated")
    ax.set_title("compare (o: tuning half, ^: held-out half)")
    ax.legend(fontsize=7, loc="upper left")


def _drift_panel(ax: Any, study: dict[str, Any]) -> None:
    colours = {"no-fail": "tab:green", "fail": "tab:red", "any": "tab:gray"}
    names = {
        "no-fail": "recalibrated (must pass)",
        "fail": ">= 1 point below recalibrated (must fail)",
        "any": "within 1 point",
    }
    seen = set()
    for p in study["tuning"]["points"] + study["heldout"]["points"]:
        marker = "o" if p["half"] == "tuning" else "^"
        ax.scatter(
            max(p["value"], 1e-7),
            p["loss_points"],
            c=colours[p["label"]],
            marker=marker,
            s=22,
            edgecolors="black",
            linewidths=0.3,
            label=names[p["label"]] if p["label"] not in seen else None,
        )
        seen.add(p["label"])
    _thresholds(ax, study["rule"])
    ax.set_xlabel("drift: mean KL(data || stored) in units of the data sample's own noise, worst layer")
    ax.set_ylabel("accuracy points below the recalibrated checkpoint")
    ax.set_title("drift, every checkpoint (ranks, averages, recalibrated)")
    ax.legend(fontsize=7, loc="upper left")
