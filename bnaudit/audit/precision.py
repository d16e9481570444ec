"""``inspect``'s deploy-precision findings: a layer whose statistics do not survive the deploy dtype."""

from __future__ import annotations

from collections.abc import Sequence

from bnaudit.audit.read_state import ReadStateDict
from bnaudit.bn.deploy_dtype import DeployDtype
from bnaudit.bn.layerstats import LayerStats
from bnaudit.bn.precision import LIMITS, RELATIVE_BOUND, CastProblem, cast_problems, layers_to_check
from bnaudit.report.model import Finding, FindingKind, Severity

# Without --deploy-dtype, inspect checks the narrowest common deploy dtype, fp16, and only warns: bf16 has
# float32's exponent range, so what survives fp16 survives bf16 too (to within its coarser rounding).
DEFAULT_CHECK = DeployDtype.FP16


def _message(layer: str, problem: CastProblem, dtype: DeployDtype, chosen: bool) -> str:
    limits = LIMITS[dtype]
    what = (
        f"overflows {limits.name} (largest finite {limits.max_finite:.6g}) and becomes {problem.cast_value:g}"
        if problem.overflow
        else f"is below {limits.name}'s smallest normal {limits.min_normal:.3g} and becomes "
        f"{problem.cast_value:.6g} (more than {RELATIVE_BOUND:.0%} lost)"
    )
    fix = (
        "keep BatchNorm in float32 in the deployed model (e.g. convert with a float32 fallback for "
        "normalisation layers) or rescale the preceding layer"
        if problem.overflow
        else "keep BatchNorm in float32 when deploying, or raise eps / recalibrate dead channels"
    )
    unless = "" if chosen else f" if the model is deployed in {limits.name} (pass --deploy-dtype to gate)"
    return (
        f"layer '{layer or '<root>'}': {problem.quantity} of channel {problem.channel} = "
        f"{problem.value:.6g} {what}{unless}; {problem.count} channel(s) affected — {fix}"
    )


def precision_findings(
    stats: LayerStats, eps: float, deploy_dtype: DeployDtype | None, *, file: str, state_dict: str, layer: str
) -> list[Finding]:
    """Findings ``precision-overflow`` / ``precision-underflow`` for one layer.

    ``deploy_dtype`` None: fp16 is checked and every finding is a warning; a chosen dtype makes them errors.
    """
    dtype = deploy_dtype or DEFAULT_CHECK
    severity = Severity.WARN if deploy_dtype is None else Severity.ERROR
    return [
        Finding(
            severity,
            FindingKind.PRECISION_OVERFLOW if p.overflow else FindingKind.PRECISION_UNDERFLOW,
            _message(layer, p, dtype, deploy_dtype is not None),
            file=file,
            state_dict=state_dict,
            layer=layer,
            channel=p.channel,
        )
        for p in cast_problems(stats, eps, dtype)
    ]


def checkpoint_precision_findings(
    read: Sequence[ReadStateDict], eps: float, deploy_dtype: DeployDtype | None, file: str
) -> list[Finding]:
    """:func:`precision_findings` of every layer read, screened in one vectorised pass first."""
    layers = [(one.sd.name, bn.name, stats) for one in read for bn, stats in one.layers]
    dtype = deploy_dtype or DEFAULT_CHECK
    out: list[Finding] = []
    for i in layers_to_check([stats for _, _, stats in layers], eps, dtype):
        state_dict, layer, stats = layers[i]
        out += precision_findings(stats, eps, deploy_dtype, file=file, state_dict=state_dict, layer=layer)
    return out
