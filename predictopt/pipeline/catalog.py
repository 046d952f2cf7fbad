r"""The built-in pipeline methods, one :class:`~predictopt.pipeline.methods.Method` each.

Each entry says what a stage's forwards and backwards see, the update cadence, the prediction
rule and the per-stage transforms (:mod:`predictopt.pipeline.transforms`); the documentation
page "Methods" gives the math and the sources. Everything that accepts a method name resolves it
here through :func:`~predictopt.pipeline.methods.get_method`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..rules import (
    AdamRule,
    ObservedUpdateRule,
    PredictionRule,
    _value,
    available_rules,
    get_rule,
    register_rule,
    state_tensors,
)
from .methods import PER_STEP, WINDOW, Cadence, Method, register_method
from .transforms import (
    BasisRotation,
    DelayCompensation,
    DelayScaledLR,
    DelayScaledMomentum,
    DiscrepancyCorrection,
    ErrorFeedback,
    NesterovMomentum,
    QuasiHyperbolicMomentum,
    RequireMomentumSGD,
    SpikeCompensation,
)

__all__ = ["FirstMomentRule", "splits_update"]


# ---------------------------------------------------------------------------------------------
# SpecTrain's rule
# ---------------------------------------------------------------------------------------------


def _has_first_moment(group: dict[str, Any]) -> bool:
    """Whether the group's optimizer keeps a first moment (Adam family or momentum > 0)."""
    return "betas" in group or bool(_value(group.get("momentum", 0.0)))


class FirstMomentRule(PredictionRule):
    r"""SpecTrain's direction, the first moment, whatever the optimizer.

    * Adam family (groups with ``betas``: Adam, AdamW, NAdam, RAdam, Adamax...): the bias-corrected
      first moment :math:`D = m_t / (1 - \beta_1^t)`; decoupled decay as in
      :class:`~predictopt.rules.AdamRule`.
    * SGD / RMSprop with ``momentum > 0``: the momentum buffer :math:`D = b_t` (torch folds
      ``maximize`` into the buffer, so it is the applied direction as it is).
    * Otherwise: the ``fallback`` rule (the optimizer's own; the generic observed-update rule for
      the registered instance).

    For Adam this is the smoothed gradient, not Adam's normalised step, so the prediction is
    scaled differently from the real updates: it is SpecTrain's rule applied as published, kept
    as a baseline.

    Args:
        fallback: The rule for groups without a first moment.
    """

    name = "first-moment"

    def __init__(self, fallback: PredictionRule | None = None) -> None:
        if fallback is not None and not isinstance(fallback, PredictionRule):
            raise TypeError(f"fallback must be a PredictionRule, got {type(fallback)!r}")
        self.fallback = fallback if fallback is not None else ObservedUpdateRule()

    def observes(self, group: dict[str, Any]) -> bool:
        return not _has_first_moment(group) and self.fallback.observes(group)

    def record(self, group, params, states, before) -> None:
        """Delegate the observed-update bookkeeping to the fallback (groups without a moment)."""
        self.fallback.record(group, params, states, before)  # type: ignore[attr-defined]

    def decoupled_decay(self, group: dict[str, Any]) -> float:
        if "betas" in group:
            return AdamRule().decoupled_decay(group)
        if _has_first_moment(group):
            return 0.0
        return self.fallback.decoupled_decay(group)

    def directions(self, group, params, states):
        if not _has_first_moment(group):
            return self.fallback.directions(group, params, states)
        ps: list[Tensor] = []
        ds: list[Tensor] = []
        if "betas" in group:
            beta1 = _value(group["betas"][0])
            bc1 = []
            for p, st in zip(params, states):
                if "exp_avg" in st and _value(st.get("step", 0)) > 0:
                    ps.append(p)
                    ds.append(st["exp_avg"])
                    bc1.append(1.0 - beta1 ** _value(st["step"]))
            if ps:
                ds = torch._foreach_div(ds, bc1)
            return ps, ds
        return state_tensors(params, states, "momentum_buffer")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fallback={self.fallback!r})"


if "first-moment" not in available_rules():
    register_rule("first-moment", FirstMomentRule())


def _spectrain_rule(optimizer: Optimizer) -> PredictionRule:
    return FirstMomentRule(fallback=get_rule(None, optimizer))


_ADAM_FAMILY = tuple(
    cls for cls in (getattr(torch.optim, name, None) for name in ("Adam", "AdamW", "NAdam",
                                                                   "RAdam"))
    if cls is not None
)


def _xpipe_rule(optimizer: Optimizer) -> PredictionRule:
    return get_rule("adam") if isinstance(optimizer, _ADAM_FAMILY) else get_rule(None, optimizer)


def _sgd_rule(optimizer: Optimizer) -> PredictionRule:
    return get_rule("sgd")


# ---------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------

SEQUENTIAL = register_method(Method(
    "sequential", staleness_free=True,
    summary="no pipeline: every micro-batch through all stages, then one update per stage "
            "(the staleness-free reference)",
    source="-"))
GPIPE = register_method(Method(
    "gpipe", cadence=PER_STEP,
    summary="synchronous: one update per step from the mean micro-batch gradient",
    source="Huang et al., GPipe, NeurIPS 2019"))
PIPEDREAM = register_method(Method(
    "pipedream",
    summary="one update per micro-batch; forward and backward on the forward's weights "
            "(weight stashing)",
    source="Narayanan et al., PipeDream, SOSP 2019"))
PIPEDREAM_2BW = register_method(Method(
    "pipedream-2bw", forward="previous", cadence=Cadence("window", at_least_stages=True), max_lag=1,
    summary="double-buffered weights: every micro-batch runs on the version one update old",
    source="Narayanan et al., PipeDream-2BW, ICML 2021"))
SPECTRAIN = register_method(Method(
    "spectrain", forward="predicted", rule=_spectrain_rule,
    summary="forward on weights predicted along the first moment",
    source="Chen et al., SpecTrain, 2018 (arXiv 1809.02839)"))
XPIPE = register_method(Method(
    "xpipe", forward="predicted", rule=_xpipe_rule, cadence=WINDOW,
    summary="T micro-batches per update; Adam-style prediction",
    source="Guan et al., XPipe, 2019 (arXiv 1911.04610)"))
PIPEOPTIM = register_method(Method(
    "pipeoptim", forward="predicted",
    summary="forward on weights predicted with the optimizer's own rule; backward on the "
            "forward's",
    source="Guan et al., PipeOptim / XGrad (arXiv 2312.00839)"))
PIPEOPTIM_LEAN = register_method(Method(
    "pipeoptim-lean", forward="predicted", backward="current",
    summary="PipeOptim as published: predicted forward, backward on the current weights (no "
            "weight copy per micro-batch)",
    source="Guan et al., PipeOptim (arXiv 2312.00839)"))

# Pipelined Backpropagation (Kosson et al., MLSys 2021): every layer a stage, schedule "PB".
_PB = {"schedules": ("PB",), "source": "Kosson et al., Pipelined Backpropagation at Scale, "
                                        "MLSys 2021"}
for _name, _fwd, _bwd, _sc, _summary in (
        ("pb", "current", "forward", False, "PB with weight stashing"),
        ("pb-sc", "current", "forward", True, "PB + Spike Compensation"),
        ("pb-lwp", "predicted", "forward", False, "PB + Linear Weight Prediction"),
        ("pb-sc-lwp", "predicted", "forward", True, "PB + Spike Compensation + LWP"),
        ("pb-lean", "current", "current", False, "PB without weight stashing"),
        ("pb-sc-lean", "current", "current", True, "PB + SC without weight stashing"),
        ("pb-lwp-lean", "predicted", "current", False, "PB + LWP without weight stashing"),
        ("pb-sc-lwp-lean", "predicted", "current", True, "PB + SC + LWP without stashing")):
    register_method(Method(
        _name, forward=_fwd, backward=_bwd, rule=_sgd_rule,
        transforms=(SpikeCompensation(),) if _sc else (RequireMomentumSGD(),),
        summary=_summary, **_PB))

NESTEROV = register_method(Method(
    "nesterov", transforms=(NesterovMomentum(beta1=0.99),),
    summary="NAdam (beta1 0.99) / Nesterov SGD on weight stashing",
    source="Ajanthan et al., Nesterov Method for Asynchronous Pipeline Parallel Optimization, "
           "ICML 2025 (code: PluralisResearch/AsyncPP)"))
PIPEMARE = register_method(Method(
    "pipemare", backward="current",
    transforms=(DelayScaledLR(power=1.0, offset=0.0), DiscrepancyCorrection()),
    summary="no weight stashing; learning rate divided by the stage's delay; backward weights "
            "corrected back along an EMA of the updates",
    source="Yang et al., PipeMare, MLSys 2021"))
DC_ASGD = register_method(Method(
    "dc-asgd", transforms=(DelayCompensation(),),
    summary="weight stashing + delay-compensated gradients (DC-ASGD-a)",
    source="Zheng et al., Asynchronous SGD with Delay Compensation, ICML 2017"))

BASIS_ROTATION = register_method(Method(
    "basis-rotation", transforms=(BasisRotation(),),
    summary="weight stashing; Adam/AdamW run in the eigenbasis of the gradient's two-sided "
            "second moments (RotatedAdamW)",
    source="Jung, Shin & Lee, Mitigating Staleness in Asynchronous Pipeline Parallelism via "
           "Basis Rotation, ICML 2026 (arXiv 2602.03515; code: LOG-postech/basis-rotation)"))

# Candidates of this project (see the study): delay-scaled learning rate and momentum horizon,
# Nesterov-style or quasi-hyperbolic momentum, with and without prediction.
register_method(Method(
    "pipedream-dl", transforms=(DelayScaledLR(),),
    summary="weight stashing, learning rate / (1 + delay)", source="this project"))
register_method(Method(
    "nesterov-dl", transforms=(NesterovMomentum(), DelayScaledLR()),
    summary="NAdam/Nesterov SGD with the optimizer's betas, learning rate / (1 + delay), "
            "weight stashing", source="this project"))
register_method(Method(
    "pipeoptim-nesterov-dl", forward="predicted",
    transforms=(NesterovMomentum(), DelayScaledLR()),
    summary="nesterov-dl with predicted forward weights", source="this project"))
register_method(Method(
    "qh-dl", transforms=(QuasiHyperbolicMomentum(0.5, strict=False), DelayScaledLR()),
    summary="quasi-hyperbolic momentum (nu 0.5), learning rate / (1 + delay), weight stashing",
    source="this project"))
register_method(Method(
    "pipeoptim-qh-dl", forward="predicted",
    transforms=(QuasiHyperbolicMomentum(0.5, strict=False), DelayScaledLR()),
    summary="qh-dl with predicted forward weights", source="this project"))
register_method(Method(
    "basis-rotation-dl", transforms=(BasisRotation(), DelayScaledLR()),
    summary="basis-rotation with the learning rate / (1 + delay)", source="this project"))
register_method(Method(
    "pipeoptim-basis-rotation-dl", forward="predicted",
    transforms=(BasisRotation(), DelayScaledLR()),
    summary="basis-rotation-dl with predicted forward weights (RotatedAdamW's own rule)",
    source="this project"))
register_method(Method(
    "pipeoptim-sc", forward="predicted", transforms=(SpikeCompensation(),),
    summary="Spike Compensation + Linear Weight Prediction on torch's schedules (momentum SGD)",
    source="Kosson et al., MLSys 2021, applied to 1F1B-style pipelines"))
register_method(Method(
    "error-feedback", transforms=(ErrorFeedback(),),
    summary="weight stashing; the weights carry an estimate of the updates in flight (the "
            "delay times the optimizer's latest own update), fed back like an error",
    source="this project, after Stich & Karimireddy, The Error-Feedback Framework, 2020 (not "
           "Zmushko et al.'s algorithm, which was not available)"))

register_method(Method(
    "pipeoptim-dm", forward="predicted", transforms=(DelayScaledMomentum(strict=False),),
    summary="predicted forward weights; the momentum horizon times (1 + delay) at the same "
            "effective step", source="this project"))


def splits_update(optimizer: Optimizer) -> bool:
    """Whether the default method splits the whole update of a stage with ``optimizer``
    (:meth:`QuasiHyperbolicMomentum.split_kind` of every part: Adam, AdamW or momentum SGD,
    not Nesterov, not Muon or the Adam parts beside it). Those stages keep the momentum term
    at the full rate, so their prediction along it is calibrated (a gain fitted per horizon:
    the full-rate momentum overshoots what the stage really moves)."""
    from .transforms import _parts

    return all(QuasiHyperbolicMomentum.split_kind(p, optimizer) for p in _parts(optimizer))


#: Updates between two calibration samples of a horizon of the default method (at least the
#: horizon): the study's screens found it level with sampling as often as possible (k = 1) at
#: a fraction of the cost (docs/study.md, "Sampling less often").
DEFAULT_CALIBRATION_EVERY = 16

register_method(Method(
    "pipeoptim-qh-dm-dl", forward="predicted", calibrate=splits_update,
    calibration_every=DEFAULT_CALIBRATION_EVERY,
    transforms=(DelayScaledMomentum(strict=False),
                QuasiHyperbolicMomentum(0.5, strict=False, sgd_fresh_power=1.0,
                                        adam_fresh_power=1.0),
                DelayScaledLR(momentum_sgd=False, adam=False)),
    summary="pipeoptim-qh-dl with the momentum horizon times (1 + delay) at the same "
            "effective step; with Adam, AdamW and momentum SGD only the fresh-gradient term "
            "takes the rate / (1 + delay) and the prediction is calibrated (a sample per "
            "horizon at most every 16 updates; the default)",
    source="this project"))

# Staleness-free twins of the candidates (what their transforms do without any delay; the lr
# factors are those of 1F1B's delays), for the study's comparison.
register_method(Method(
    "sequential-nesterov-dl", staleness_free=True,
    transforms=(NesterovMomentum(), DelayScaledLR(delays="1f1b")),
    summary="staleness-free twin of nesterov-dl (same optimizer and per-stage learning rates, "
            "no pipeline)", source="this project"))
register_method(Method(
    "sequential-basis-rotation", staleness_free=True, transforms=(BasisRotation(),),
    summary="staleness-free twin of basis-rotation (RotatedAdamW, no pipeline)",
    source="this project"))
register_method(Method(
    "sequential-basis-rotation-dl", staleness_free=True,
    transforms=(BasisRotation(), DelayScaledLR(delays="1f1b")),
    summary="staleness-free twin of basis-rotation-dl (RotatedAdamW with the per-stage learning "
            "rates, no pipeline)", source="this project"))
register_method(Method(
    "sequential-qh-dl", staleness_free=True,
    transforms=(QuasiHyperbolicMomentum(0.5, strict=False), DelayScaledLR(delays="1f1b")),
    summary="staleness-free twin of qh-dl (same update rule and per-stage learning rates, no "
            "pipeline)", source="this project"))
register_method(Method(
    "sequential-qh-dm-dl", staleness_free=True,
    transforms=(DelayScaledMomentum(delays="1f1b", strict=False),
                QuasiHyperbolicMomentum(0.5, strict=False, sgd_fresh_power=1.0,
                                        adam_fresh_power=1.0, delays="1f1b"),
                DelayScaledLR(delays="1f1b", momentum_sgd=False, adam=False)),
    summary="staleness-free twin of pipeoptim-qh-dm-dl", source="this project"))
