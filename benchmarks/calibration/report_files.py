"""Write the study's results: runs.json (by the driver), runs.csv, rule.json, table.md and plot.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

SHORT = {"broadcast": "broadcast", "syncbn": "SyncBN", "epoch_allreduce": "all-reduce/epoch", "none": "none"}


def _points(study: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {
        (p["run"], p.get("checkpoint")): p for half in ("tuning", "heldout") for p in study[half]["points"]
    }


def _row(
    record: dict[str, Any],
    compare: dict[tuple[str, str | None], Any],
    drift: dict[tuple[str, str | None], Any],
) -> dict[str, Any]:
    c = record["config"]
    point = compare[(c["name"], None)]
    ranks = record["rank_accuracy"]
    repaired = record["repaired_accuracy"]
    return {
        "run": c["name"],
        "half": c["half"],
        "framework": c["framework"],
        "arch": c["arch"],
        "dataset": c["dataset"],
        "sync": c["sync"],
        "shards": c["shards"],
        "world_size": c["world_size"],
        "batch_size": c["batch_size"],
        "epochs": c["epochs"],
        "expectation": c["expectation"],
        "compare_metric": point["value"],
        "worst_layer": point["layer"],
        "compare_verdict": point["outcome"],
        "max_channel_kl": max(row["max_channel"] for row in record["rank_profile"]),
        "rank0_acc": ranks[0],
        "worst_rank_acc": min(ranks),
        "pooled_acc": repaired["pooled"],
        "mean_acc": repaired["mean"],
        "recalibrated_acc": repaired["recalibrated"],
        "rank0_drift": drift[(c["name"], "rank0")]["value"],
        "rank0_drift_verdict": drift[(c["name"], "rank0")]["outcome"],
        "recalibrated_drift": drift[(c["name"], "recalibrated")]["value"],
        "recalibrated_drift_verdict": drift[(c["name"], "recalibrated")]["outcome"],
        "bnaudit_compare": record["compare"]["verdict"],
        "bnaudit_compare_warnings": record["compare"]["warnings"],
        "bnaudit_cause": (record["compare"]["cause"] or {}).get("kind", ""),
        "bnaudit_drift_cause_rank0": (record["drift"]["rank0"]["cause"] or {}).get("kind", ""),
    }


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def _rule_text(rule: dict[str, Any]) -> str:
    if rule["summary"] == "noise_ratio":
        return (
            f"a layer's mean KL at least {rule['error']:g}x the data sample's own noise and at least "
            f"{rule['error_kl']:g} above it (warn: {rule['warn_kl']:g} above it)"
        )
    return (
        f"{rule['summary'].replace('_', ' ')} KL, flat layers divided by {rule['flat_factor']:g}, "
        f"warn {rule['warn']:g}, error {rule['error']:g}"
    )


def table(rows: list[dict[str, Any]], study: dict[str, Any]) -> str:
    compare, drift = study["compare"], study["drift"]
    lines = [
        f"compare rule: {_rule_text(compare['rule'])}; drift rule: {_rule_text(drift['rule'])}",
        "",
        "| half | run | sync | shards | ranks | batch | epochs | compare KL | verdict | expected | rank 0 "
        "acc | worst rank | pooled | recalibrated | rank 0 drift | drift verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows, key=lambda r: (r["half"] != "tuning", r["arch"], r["dataset"], r["sync"], r["shards"])
    ):
        model = f"{r['arch']}/{r['dataset']}" + (" (Lightning)" if r["framework"] == "lightning" else "")
        cells = (
            r["half"],
            model,
            SHORT[r["sync"]],
            r["shards"],
            r["world_size"],
            r["batch_size"],
            r["epochs"],
            f"{r['compare_metric']:.5f}",
            r["compare_verdict"],
            r["expectation"],
            f"{r['rank0_acc']:.3f}",
            f"{r['worst_rank_acc']:.3f}",
            f"{r['pooled_acc']:.3f}",
            f"{r['recalibrated_acc']:.3f}",
            f"{r['rank0_drift']:.4f}",
            r["rank0_drift_verdict"],
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write(out: Path, records: list[dict[str, Any]], study: dict[str, Any]) -> None:
    compare, drift = _points(study["compare"]), _points(study["drift"])
    rows = [_row(r, compare, drift) for r in records]
    write_csv(out / "runs.csv", rows)
    slim = {
        gate: {k: v for k, v in study[gate].items() if k not in ("tuning", "heldout")}
        | {
            half: {k: study[gate][half][k] for k in ("right", "total", "wrong", "margins")}
            for half in ("tuning", "heldout")
        }
        for gate in ("compare", "drift")
    }
    summary = {**slim, "ok": study["ok"], "bnaudit_agrees": study["bnaudit_agrees"]}
    (out / "rule.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text(table(rows, study))
    from calibration import plot

    plot.write(out / "plot.png", records, study)
