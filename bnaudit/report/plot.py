"""``--plot``: per-layer divergence bars over a rank x layer heat map of the worst standardised mean shift.

Needs matplotlib (``pip install 'bnaudit[plot]'``); imported only when a plot is asked for.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from bnaudit.errors import UsageError
from bnaudit.optional import MissingDependencyError, require
from bnaudit.report.model import LayerRow, Report, Severity

PLOT_SUFFIXES = (".png", ".svg")
# Bar colours: red and orange for the severities that fail a gate, green for the rest.
_COLOURS = {Severity.ERROR: "#d62728", Severity.WARN: "#ff7f0e"}
_PASSING_COLOUR = "#2ca02c"


def check_plot_target(path: Path) -> None:
    """Fail early (before any checkpoint is read) when ``path`` cannot be drawn.

    Raises:
        UsageError: the suffix is not .png / .svg, or matplotlib is not installed.
    """
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(
            "the file name must end in .png or .svg (the image format)",
            path=path,
            where="--plot",
            found=repr(path.suffix) if path.suffix else "no suffix",
        )
    require("matplotlib", where="--plot")


def _depth_order(report: Report) -> list[LayerRow]:
    # Rows come worst first; the picture reads top to bottom of the network, so restore the model order.
    def depth(row: LayerRow) -> tuple[bool, float]:
        index = row.metrics.get("layer_index")
        return (index is None, float(index or 0))

    return sorted(report.layers, key=depth)


def _label(row: LayerRow, multi_sd: bool) -> str:
    name = row.name or "<root>"
    return f"{row.state_dict}:{name}" if multi_sd and row.state_dict else name


def _shift_matrix(rows: list[LayerRow], n_ranks: int) -> list[list[float]]:
    matrix = []
    for r in range(n_ranks):
        line = []
        for row in rows:
            values = row.arrays.get("per_rank_max_shift", [])
            value = values[r] if r < len(values) else float("nan")
            line.append(float(value) if value is not None else float("nan"))
        matrix.append(line)
    return matrix


def _draw(report: Report, fmt: str) -> bytes:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError("matplotlib", where="--plot") from exc
    rows = _depth_order(report)
    multi_sd = len({r.state_dict for r in rows}) > 1
    labels = [_label(r, multi_sd) for r in rows]
    ranks = [i.rank if i.rank is not None else n for n, i in enumerate(report.inputs)]
    width = max(6.0, 0.35 * len(rows) + 2.0)
    fig = Figure(figsize=(width, 3.0 + 0.3 * max(len(ranks), 1) + 2.5), constrained_layout=True)
    ratios = [1.0, max(1.0, 0.25 * len(ranks))]
    bars, heat = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    _draw_bars(bars, report, rows)
    image = _draw_heat_map(heat, rows, ranks, labels)
    # One colour bar beside both panels keeps the bars aligned with the heat map's columns.
    fig.colorbar(image, ax=[bars, heat], label="max |m_r - mean| / std", shrink=0.6, anchor=(0.0, 0.0))
    fig.suptitle(f"bnaudit {report.command.value}: {len(ranks)} rank(s), {len(rows)} BatchNorm layer(s)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    return buffer.getvalue()


# What each headline metric is, for the bar chart's title.
_TITLES = {
    "gate_kl": "divergence: mean KL over channels, worst rank (flat layers divided by --flat-factor)",
    "max_kl": "divergence (max over ranks and channels)",
}


def _draw_bars(axes: Any, report: Report, rows: list[LayerRow]) -> None:
    headline = report.headline or "max_kl"
    values = [float(r.metrics.get(headline) or 0.0) for r in rows]
    axes.bar(range(len(rows)), values, color=[_COLOURS.get(r.severity, _PASSING_COLOUR) for r in rows])
    for name, style in (("warn_kl", "--"), ("error_kl", "-")):
        limit = report.settings.get(name)
        if isinstance(limit, int | float):
            label = f"--{name.replace('_', '-')} {limit:g}"
            axes.axhline(limit, color="grey", linestyle=style, linewidth=1, label=label)
    if any(isinstance(report.settings.get(n), int | float) for n in ("warn_kl", "error_kl")):
        axes.legend(loc="upper left", fontsize="small")
    axes.set_ylabel(f"{headline} (nats)" if headline.endswith("kl") else headline)
    axes.set_title(f"per-layer {_TITLES.get(headline, headline)}", fontsize="medium")


def _draw_heat_map(axes: Any, rows: list[LayerRow], ranks: list[int], labels: list[str]) -> Any:
    matrix = _shift_matrix(rows, len(ranks))
    image = axes.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    axes.set_ylabel("rank")
    axes.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")
    axes.set_xlabel("layer (model order)")
    axes.set_title("worst standardised mean shift per rank and layer", fontsize="medium")
    return image


def plot_image(report: Report, path: Path) -> bytes:
    """The image for ``path`` (PNG or SVG by its suffix), as bytes for the caller to write.

    Raises:
        UsageError: bad suffix or matplotlib missing (see :func:`check_plot_target`).
    """
    check_plot_target(path)
    return _draw(report, path.suffix.lower().lstrip("."))
