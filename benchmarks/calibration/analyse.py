"""Choose the gate rules from the study's runs and judge them on the runs kept out of the choice.

``compare``: each run is one point (its worst layer and rank); the rule is a metric (a summary of the
per-channel KL over a layer's channels) and two thresholds chosen on the tuning half only:
error halfway (geometrically) between the worst run that must not fail and the mildest run that must fail,
warn halfway between the worst synchronised run and the error level, both rounded to two significant digits.
Among the summaries the one with the widest worst-case margin (log scale) on the tuning half wins.

``drift``: each checkpoint (every rank, both averages, the recalibrated one) is a point; it must fail when its
held-out accuracy is at least 1 point below the run's recalibrated checkpoint, and the recalibrated checkpoint
must pass (a warning still passes). See :func:`drift_rule`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

from calibration.metrics import DRIFT_SUMMARIES, SUMMARIES, score

HARM_POINTS = 0.01  # drift must fail a checkpoint this far (or further) below the recalibrated one
FLAT_FACTORS = (1, 2, 4, 8, 16, 32)  # candidate ratios of a flat layer's noise to a spatial layer's


def nice(value: float) -> float:
    """``value`` rounded to two significant digits (thresholds a reader can type)."""
    if value <= 0 or not math.isfinite(value):
        return value
    digits = 1 - math.floor(math.log10(value))
    return round(value, digits)


def _geo(a: float, b: float) -> float:
    return math.sqrt(a * b) if a > 0 and b > 0 else (a + b) / 2


def choose(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Thresholds from points labelled ``pass`` (no warning), ``no-fail`` and ``fail``.

    Returns the thresholds, the margins (ratio of threshold to the closest point on each side) and whether
    the labels are separable at all.
    """
    quiet = [p["value"] for p in points if p["label"] == "pass"]
    tolerated = quiet + [p["value"] for p in points if p["label"] == "no-fail"]
    failing = [p["value"] for p in points if p["label"] == "fail"]
    # A side without points (a smoke run) leaves a factor of 4 of room on that side.
    top_ok = max(tolerated, default=0.0)
    top_quiet = max(quiet, default=0.0)
    low_fail = min(failing, default=16 * top_ok if top_ok > 0 else 1.0)
    separable = top_ok < low_fail and top_quiet < low_fail
    error = nice(_geo(top_ok, low_fail) if top_ok > 0 else low_fail / 4)
    warn = nice(_geo(top_quiet, min(error, low_fail)) if top_quiet > 0 else error / 4)
    warn = min(warn, error)
    margins = {
        "error_over_worst_passing": error / top_ok if top_ok > 0 else math.inf,
        "mildest_failing_over_error": low_fail / error,
        "warn_over_worst_synchronised": warn / top_quiet if top_quiet > 0 else math.inf,
    }
    return {
        "warn": warn,
        "error": error,
        "separable": separable,
        "margins": margins,
        "score": min(margins.values()),
    }


def verdict(value: float, warn: float, error: float) -> str:
    return "fail" if value >= error else "warn" if value >= warn else "pass"


def meets(label: str, outcome: str) -> bool:
    return {"pass": outcome == "pass", "no-fail": outcome != "fail", "fail": outcome == "fail"}.get(
        label, True
    )


def compare_points(records: Iterable[dict[str, Any]], summary: str, flat: float) -> list[dict[str, Any]]:
    out = []
    for r in records:
        value, layer = score(r["rank_profile"], r["kinds"], summary, flat)
        c = r["config"]
        loss = 100 * (r["repaired_accuracy"]["recalibrated"] - min(r["rank_accuracy"]))
        out.append(
            {
                "run": c["name"],
                "half": c["half"],
                "label": c["expectation"],
                "value": value,
                "layer": layer,
                "loss_points": loss,
            }
        )
    return out


def drift_points(records: Iterable[dict[str, Any]], summary: str, flat: float) -> list[dict[str, Any]]:
    out = []
    for r in records:
        accuracies = {f"rank{i}": a for i, a in enumerate(r["rank_accuracy"])} | r["repaired_accuracy"]
        reference = r["repaired_accuracy"]["recalibrated"]
        for name, measured in r["drift"].items():
            harmed = accuracies[name] <= reference - HARM_POINTS + 1e-9
            # The recalibrated checkpoint must pass (a warning still passes); a harmed one must fail.
            label = "no-fail" if name == "recalibrated" else "fail" if harmed else "any"
            value, layer = score(measured["profile"], r["kinds"], summary, flat)
            out.append(
                {
                    "run": r["config"]["name"],
                    "checkpoint": name,
                    "half": r["config"]["half"],
                    "label": label,
                    "value": value,
                    "layer": layer,
                    "accuracy": accuracies[name],
                    "loss_points": 100 * (reference - accuracies[name]),
                }
            )
    return out


def _judge(points: list[dict[str, Any]], rule: dict[str, Any]) -> dict[str, Any]:
    judged = [{**p, "outcome": verdict(p["value"], rule["warn"], rule["error"])} for p in points]
    wrong = [p for p in judged if not meets(p["label"], p["outcome"])]
    return {"points": judged, "wrong": wrong, "right": len(judged) - len(wrong), "total": len(judged)}


def _margins(points: list[dict[str, Any]], rule: dict[str, Any]) -> dict[str, Any]:
    """For each level, the closest point that must stay below it and the closest one that must reach it
    (the error level: what must not fail / must fail; the warn level: what must pass without a warning),
    with the ratio of the level to each."""
    sides = {"warn": (("pass",), ("fail",)), "error": (("pass", "no-fail"), ("fail",))}
    out = {}
    for level, (below_labels, above_labels) in sides.items():
        limit = rule[level]
        below = [p for p in points if p["label"] in below_labels]
        above = [p for p in points if p["label"] in above_labels]
        low = max(below, key=lambda p: p["value"]) if below else None
        high = min(above, key=lambda p: p["value"]) if above else None
        out[level] = {
            "closest_below": low,
            "closest_above": high,
            "level_over_below": limit / low["value"] if low and low["value"] > 0 else None,
            "above_over_level": high["value"] / limit if high else None,
        }
    return out


def _study(points_of: Any, records: list[dict[str, Any]], summaries: tuple[str, ...]) -> dict[str, Any]:
    candidates = {}
    for summary in summaries:
        for flat in FLAT_FACTORS:
            points = points_of(records, summary, flat)
            tuning = [p for p in points if p["half"] == "tuning"]
            rule = {**choose(tuning), "summary": summary, "flat_factor": flat}
            candidates[f"{summary}/flat{flat}"] = {"rule": rule, "points": points}
    best = max(candidates, key=lambda s: (candidates[s]["rule"]["separable"], candidates[s]["rule"]["score"]))
    rule, points = candidates[best]["rule"], candidates[best]["points"]
    result: dict[str, Any] = {
        "metric": best,
        "rule": rule,
        "candidates": {s: c["rule"] for s, c in candidates.items()},
    }
    for half in ("tuning", "heldout"):
        subset = [p for p in points if p["half"] == half]
        result[half] = {**_judge(subset, rule), "margins": _margins(subset, rule)}
    for summary, c in candidates.items():
        held = [p for p in c["points"] if p["half"] == "heldout"]
        result["candidates"][summary]["heldout_right"] = _judge(held, c["rule"])["right"]
        result["candidates"][summary]["heldout_total"] = len(held)
    return result


def _fewest_errors(points: list[dict[str, Any]]) -> float:
    """The threshold between two sorted values that misjudges fewest ``pass`` / ``fail`` points (the
    geometric middle of the widest such gap)."""
    values = sorted({p["value"] for p in points})
    best: tuple[int, float, float] | None = None
    for low, high in itertools.pairwise(values):
        cut = _geo(low, high)
        errors = sum(1 for p in points if not meets(p["label"], "fail" if p["value"] >= cut else "pass"))
        key = (errors, -(high / low if low > 0 else math.inf), cut)
        if best is None or key[:2] < best[:2]:
            best = key
    return best[2] if best else 1.0


def _drift_outcome(profile: list[dict[str, Any]], rule: dict[str, Any]) -> str:
    """The worst layer outcome: each layer must be real (noise ratio) and large (excess) at once."""
    outcome = "pass"
    for row in profile:
        if row["noise_ratio"] < rule["error"]:
            continue
        if row["excess_mean"] >= rule["error_kl"]:
            return "fail"
        if row["excess_mean"] >= rule["warn_kl"]:
            outcome = "warn"
    return outcome


def drift_rule(records: list[dict[str, Any]]) -> dict[str, Any]:
    """drift: a layer fails when its mean KL is both real (``error_noise`` times the data sample's own noise
    or more) and large (an excess over that noise of ``error_kl`` or more). The noise level is chosen on the
    tuning half to misjudge fewest checkpoints; the excess floor is half the smallest excess of a tuning
    checkpoint that must fail, so it decides nothing in the study and keeps large data samples, whose noise
    is tiny, from failing harmless differences."""
    ratio = drift_points(records, "noise_ratio", 1)
    excess = {(p["run"], p["checkpoint"]): p["value"] for p in drift_points(records, "excess_mean", 1)}
    tuning = [p for p in ratio if p["half"] == "tuning"]
    error_noise = nice(_fewest_errors([p for p in tuning if p["label"] != "any"]))
    error_kl = nice(0.5 * min(excess[(p["run"], p["checkpoint"])] for p in tuning if p["label"] == "fail"))
    # A warning: as real as an error, but below the excess floor (between half of it and it).
    rule = {
        "summary": "noise_ratio",
        "flat_factor": 1,
        "error": error_noise,
        "warn": error_noise,
        "error_kl": error_kl,
        "warn_kl": nice(error_kl / 2),
    }
    profiles = {(r["config"]["name"], name): m["profile"] for r in records for name, m in r["drift"].items()}
    judged = []
    for p in ratio:
        outcome = _drift_outcome(profiles[(p["run"], p["checkpoint"])], rule)
        judged.append({**p, "excess": excess[(p["run"], p["checkpoint"])], "outcome": outcome})
    result: dict[str, Any] = {"metric": "noise_ratio+excess", "rule": rule, "candidates": {}}
    for half in ("tuning", "heldout"):
        subset = [p for p in judged if p["half"] == half]
        wrong = [p for p in subset if not meets(p["label"], p["outcome"])]
        result[half] = {
            "points": subset,
            "wrong": wrong,
            "right": len(subset) - len(wrong),
            "total": len(subset),
            "margins": _margins(subset, rule),
        }
    return result


def analyse(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Both gates' rules, how they do on each half, and whether every held-out run was judged right."""
    compare = _study(compare_points, records, SUMMARIES)
    drift = drift_rule(records)
    drift["candidates"] = _study(drift_points, records, DRIFT_SUMMARIES)["candidates"]
    ok = not compare["heldout"]["wrong"] and not drift["heldout"]["wrong"]
    agreement = {"compare": _agreement(records, compare), "drift": _agreement(records, drift)}
    return {"compare": compare, "drift": drift, "ok": ok, "bnaudit_agrees": agreement}


def _bnaudit_outcome(measured: dict[str, Any]) -> str:
    """bnaudit's gate on the layers alone (a counter warning is not part of the rule)."""
    severities = {row["severity"] for row in measured["rows"]}
    return "fail" if "error" in severities else "warn" if "warn" in severities else "pass"


def _agreement(records: list[dict[str, Any]], study: dict[str, Any]) -> dict[str, Any]:
    """Whether bnaudit's own verdicts (recorded per run) are the rule's, computed here independently."""
    measured = {}
    for r in records:
        name = r["config"]["name"]
        measured[(name, None)] = _bnaudit_outcome(r["compare"])
        measured.update({(name, k): _bnaudit_outcome(v) for k, v in r["drift"].items()})
    points = study["tuning"]["points"] + study["heldout"]["points"]
    differ = [
        {
            "run": p["run"],
            "checkpoint": p.get("checkpoint"),
            "rule": p["outcome"],
            "bnaudit": measured[(p["run"], p.get("checkpoint"))],
        }
        for p in points
        if measured[(p["run"], p.get("checkpoint"))] != p["outcome"]
    ]
    return {"same": len(points) - len(differ), "total": len(points), "differ": differ}
