r"""Per-stage transforms of the update: the math of every staleness mitigation in one place.

Each class is a :class:`~predictopt.pipeline.methods.StageTransform`; a
:class:`~predictopt.pipeline.methods.Method` lists the ones it applies. ``D`` below is the
stage's delay, the largest staleness of a step at that stage (``K - 1 - k`` for stage ``k`` of
``K`` under 1F1B with one update per micro-batch; :attr:`StageContext.delay`).

* :class:`RequireMomentumSGD`: checks the stage runs ``torch.optim.SGD`` with momentum.
* :class:`SpikeCompensation` (Kosson et al., 2021): momentum SGD becomes
  :class:`~predictopt.spike.SpikeCompensatedSGD` with the stage's delay,
  $w \leftarrow w - \eta (m^D v + \tfrac{1 - m^D}{1 - m} g)$.
* :class:`DelayScaledLR` (PipeMare, Yang et al., 2021; the ``lr_correction`` of Ajanthan et
  al., 2025): the stage's learning rate times $(c + D)^{-p\,r(t)}$, $r(t) = 1 - \min(t/T, 1)$
  when annealed over $T$ updates, else 1.
* :class:`NesterovMomentum` (Ajanthan et al., 2025, whose code trains NAdam on weight
  stashing): Adam/AdamW become ``torch.optim.NAdam`` (decoupled decay for AdamW), momentum SGD
  becomes Nesterov SGD.

The conversions (Spike Compensation, Nesterov) build the new optimizer over the *same* parameter
group dicts as the one they replace, so an LR scheduler created for the user's optimizer keeps
setting the learning rate the converted one uses.
* :class:`AdaptiveMomentum` (Ajanthan et al., 2025, ``--adaptive_momentum``): the first-moment
  coefficient $\beta_1 + D(\beta^\star - \beta_1)/K$.
* :class:`DelayScaledMomentum` (this project): the momentum horizon $1/(1 - \mu)$ times
  $(1 + D)$ at the same effective step (Adam's $\beta_1$; momentum SGD's $\mu$ with the
  dampening that keeps $b$'s steady state; Muon's only on request).
* :class:`QuasiHyperbolicMomentum` (Ma & Yarats, 2019, applied per stage): the update mixes the
  fresh gradient into the momentum direction, $\nu\,\hat m + (1 - \nu)\,g$ (Adam family,
  normalised by $\sqrt{\hat v} + \epsilon$) or $\nu\,b + (1 - \nu)\,g / (1 - \mu)$ (momentum
  SGD, whose fresh term may take its own factor $(1 + D)^{-q}$), applied as a correction after
  the optimizer's own step.
* :class:`DiscrepancyCorrection` (PipeMare, Yang et al., 2021): without weight stashing, the
  backward reads $w - \ell\,\delta$ instead of the current $w$, $\ell$ the updates since the
  forward and $\delta$ an EMA of the stage's recent updates, an estimate of the forward's
  weights that costs no copy per micro-batch.
* :class:`BasisRotation` (Jung, Shin & Lee, ICML 2026): Adam/AdamW become
  :class:`~predictopt.basis_rotation.RotatedAdamW`, Adam in the eigenbasis of the gradient's
  two-sided second moments, where delayed updates stay aligned with the undelayed ones.
* :class:`DelayCompensation` (DC-ASGD, Zheng et al., 2017): each delayed gradient is corrected
  to first order with the diagonal outer-product approximation of the Hessian,
  $g + \lambda\,g \odot g \odot (w_{now} - w_{fwd})$, with the adaptive
  $\lambda = \lambda_0 / \sqrt{\overline{g^2}}$ of DC-ASGD-a.
* :class:`ErrorFeedback` (this project's, after Stich & Karimireddy's error-feedback view of
  delayed SGD, 2020): the weights carry an estimate of the updates in flight,
  $w = x + \gamma D\,\bar u$, $\bar u$ an EMA of the optimizer's own updates, so that delayed
  gradients are taken near the virtual (undelayed) iterate.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..basis_rotation import RotatedAdamW
from ..spike import SpikeCompensatedSGD
from .methods import StageContext, StageTransform, UpdateContext

__all__ = [
    "AdaptiveMomentum",
    "BasisRotation",
    "DelayCompensation",
    "DelayScaledLR",
    "DelayScaledMomentum",
    "DiscrepancyCorrection",
    "ErrorFeedback",
    "NesterovMomentum",
    "QuasiHyperbolicMomentum",
    "RequireMomentumSGD",
    "SpikeCompensation",
]


def _parts(optimizer: Optimizer) -> tuple[Optimizer, ...]:
    """The optimizer, or the parts of a :class:`~predictopt.combined.CombinedOptimizer`."""
    from ..combined import CombinedOptimizer

    return optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else (optimizer,)


def _number(value: Any, name: str, *, low: float = 0.0, high: float = math.inf,
            low_open: bool = False, high_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return float(value)


def _fresh(optimizer: Optimizer, what: str) -> None:
    if len(optimizer.state):
        raise ValueError(f"{what} converts the stage optimizer, which must be fresh (no state "
                         "yet)")


_ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW)


def _rebuild(cls: type, groups: list[dict[str, Any]], **kwargs: Any) -> Optimizer:
    """A ``cls`` optimizer over the *same* group dicts as the optimizer it replaces, so that
    whatever holds the old one (an LR scheduler sets ``group["lr"]`` in these dicts) still
    reaches the new one."""
    new = cls([{"params": []}], **kwargs)  # defaults only; the real groups follow
    new.param_groups.clear()
    for g in groups:
        new.add_param_group(g)  # validates, fills the defaults in, keeps the dict itself
    if any(a is not b for a, b in zip(new.param_groups, groups)):  # pragma: no cover
        raise RuntimeError(f"{cls.__name__}.add_param_group copied the group dicts")
    return new


# ---------------------------------------------------------------------------------------------
# Optimizer requirements and conversions
# ---------------------------------------------------------------------------------------------


class RequireMomentumSGD(StageTransform):
    """Check the stage optimizer is ``torch.optim.SGD`` (or a subclass) with momentum > 0 in
    every group (the setting of Pipelined Backpropagation)."""

    def prepare(self, optimizer: Optimizer, ctx: StageContext) -> Optimizer:
        if not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(f"this method runs momentum SGD: make_optimizer must return a "
                             f"torch.optim.SGD with momentum > 0, got {type(optimizer).__name__}")
        if any(not g.get("momentum", 0) for g in optimizer.param_groups):
            raise ValueError("this method runs momentum SGD: every parameter group needs "
                             "momentum > 0")
        return optimizer


class SpikeCompensation(StageTransform):
    r"""Momentum SGD becomes :class:`~predictopt.spike.SpikeCompensatedSGD` with ``delay`` =
    the stage's delay $D$ (idempotent: a ``SpikeCompensatedSGD`` is kept, its groups' delay
    set to $D$ if it has no state yet)."""

    def prepare(self, optimizer: Optimizer, ctx: StageContext) -> Optimizer:
        delay = ctx.delay
        if isinstance(optimizer, SpikeCompensatedSGD):
            if not len(optimizer.state):
                for g in optimizer.param_groups:
                    g["delay"] = delay
            return optimizer
        RequireMomentumSGD().prepare(optimizer, ctx)
        _fresh(optimizer, "Spike Compensation")
        groups = optimizer.param_groups
        for g in groups:
            g["delay"] = delay
        return _rebuild(SpikeCompensatedSGD, groups, lr=groups[0]["lr"])


class NesterovMomentum(StageTransform):
    r"""Nesterov momentum for the stage: ``Adam``/``AdamW`` become ``torch.optim.NAdam`` with the
    same learning rate, betas (first one replaced by ``beta1`` if given), eps and weight decay
    (decoupled for AdamW), and ``momentum_decay``; ``SGD`` with momentum becomes
    ``SGD(nesterov=True)``. NAdam's update is
    $\eta\,[\mu_{t+1} \hat m_t + (1 - \mu_t) g_t / (1 - \prod_{i \le t} \mu_i)] / (\sqrt{\hat v_t}
    + \epsilon)$ with $\mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi})$: a weight on the fresh
    gradient that a delayed stage feels at once. Idempotent on ``NAdam`` and Nesterov SGD.

    Args:
        beta1: First-moment coefficient of the NAdam stages (``None``: keep the optimizer's).
            Ajanthan et al. train with 0.99.
        momentum_decay: NAdam's $\psi$.
    """

    def __init__(self, beta1: float | None = None, momentum_decay: float = 4e-3) -> None:
        self.beta1 = None if beta1 is None else _number(beta1, "beta1", high=1.0,
                                                         high_open=True)
        self.momentum_decay = _number(momentum_decay, "momentum_decay")

    def prepare(self, optimizer: Optimizer, ctx: StageContext) -> Optimizer:
        if isinstance(optimizer, torch.optim.NAdam):
            return optimizer
        if isinstance(optimizer, torch.optim.SGD):
            if all(g.get("nesterov") for g in optimizer.param_groups):
                return optimizer
            if any(not g.get("momentum", 0) or g.get("dampening", 0)
                   for g in optimizer.param_groups):
                raise ValueError("Nesterov momentum needs SGD with momentum > 0 and "
                                 "dampening = 0 in every group")
            _fresh(optimizer, "Nesterov momentum")
            for g in optimizer.param_groups:
                g["nesterov"] = True
            return _rebuild(torch.optim.SGD, optimizer.param_groups,
                            lr=optimizer.param_groups[0]["lr"])
        if not isinstance(optimizer, _ADAM_LIKE) or any(
                g.get("amsgrad") for g in optimizer.param_groups):
            raise ValueError(f"Nesterov momentum converts Adam, AdamW (without amsgrad) or "
                             f"momentum SGD; got {type(optimizer).__name__}")
        _fresh(optimizer, "Nesterov momentum")
        decoupled = isinstance(optimizer, torch.optim.AdamW) or any(
            g.get("decoupled_weight_decay") for g in optimizer.param_groups)
        groups = optimizer.param_groups
        for g in groups:
            if self.beta1 is not None:
                g["betas"] = (self.beta1, g["betas"][1])
            g["momentum_decay"] = self.momentum_decay
            g["decoupled_weight_decay"] = decoupled
            g["fused"] = None  # torch has no fused NAdam
        return _rebuild(torch.optim.NAdam, groups, lr=groups[0]["lr"])


class BasisRotation(StageTransform):
    r"""Basis rotation for the stage (Jung, Shin & Lee, ICML 2026; code:
    LOG-postech/basis-rotation): ``Adam``/``AdamW`` become
    :class:`~predictopt.basis_rotation.RotatedAdamW` with the same learning rate, betas, eps and
    weight decay (decoupled for AdamW, L2 for Adam), over the same parameter group dicts.
    Idempotent on ``RotatedAdamW``.

    Args:
        precondition_frequency: Updates between two refreshes of the bases (the authors
            train with 10).
        shampoo_beta: Moving-average coefficient of the covariances (``None``: the
            optimizer's second beta, as the authors' code).
        max_dim: Sides longer than this are not rotated.
    """

    def __init__(self, precondition_frequency: int = 10, shampoo_beta: float | None = None,
                 max_dim: int = 4096) -> None:
        RotatedAdamW([torch.zeros(1)], precondition_frequency=precondition_frequency,
                     shampoo_beta=shampoo_beta, max_dim=max_dim)  # checks the values
        self.precondition_frequency = precondition_frequency
        self.shampoo_beta = shampoo_beta
        self.max_dim = max_dim

    def prepare(self, optimizer: Optimizer, ctx: StageContext) -> Optimizer:
        if isinstance(optimizer, RotatedAdamW):
            return optimizer
        if not isinstance(optimizer, _ADAM_LIKE) or any(
                g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups):
            raise ValueError(f"basis rotation converts Adam or AdamW (without amsgrad or "
                             f"maximize); got {type(optimizer).__name__}")
        _fresh(optimizer, "basis rotation")
        decoupled = isinstance(optimizer, torch.optim.AdamW) or any(
            g.get("decoupled_weight_decay") for g in optimizer.param_groups)
        groups = optimizer.param_groups
        for g in groups:
            g.update(decoupled_weight_decay=decoupled,
                     precondition_frequency=self.precondition_frequency,
                     shampoo_beta=self.shampoo_beta, max_dim=self.max_dim)
            if isinstance(g["lr"], Tensor):
                g["lr"] = float(g["lr"])
        return _rebuild(RotatedAdamW, groups, lr=groups[0]["lr"])


class AdaptiveMomentum(StageTransform):
    r"""More momentum for staler stages (Ajanthan et al.'s ``--adaptive_momentum``): the first
    beta of Adam-family groups becomes $\beta_1 + D (\beta^\star - \beta_1) / K$ ($K$ stages)
    for the duration of every update and prediction (:meth:`StageTransform.group_values`; the
    groups, what schedulers set and checkpoints store, keep the user's $\beta_1$).

    Args:
        target: $\beta^\star$ (0.99 in the authors' code).
    """

    def __init__(self, target: float = 0.99) -> None:
        self.target = _number(target, "target", high=1.0, high_open=True)

    def prepare(self, optimizer: Optimizer, ctx: StageContext) -> Optimizer:
        if ctx.num_stages is None:
            raise ValueError("AdaptiveMomentum needs the number of stages (StageWorker("
                             "num_stages=...))")
        for g in optimizer.param_groups:
            if "betas" not in g:
                raise ValueError(f"AdaptiveMomentum changes the first beta of Adam-family "
                                 f"optimizers; got {type(optimizer).__name__}")
        return optimizer

    def group_values(self, ctx: StageContext, optimizer: Optimizer
                     ) -> list[dict[str, Any]] | None:
        if not ctx.delay:
            return None
        out: list[dict[str, Any]] = []
        for part in _parts(optimizer):
            if not all("betas" in g for g in part.param_groups):
                out += [{} for _ in part.param_groups]
                continue
            for g in part.param_groups:
                b1 = float(g["betas"][0])
                out.append({"betas": (b1 + ctx.delay * (self.target - b1) / ctx.num_stages,
                                      g["betas"][1])})
        return out


class DelayScaledMomentum(StageTransform):
    r"""A momentum horizon that grows with the stage's delay, at the same effective step.

    The momentum coefficient $\mu$ of every group becomes $\mu_D$ with
    $1 - \mu_D = (1 - \mu) / (c + D)^{p}$ (the horizon $1/(1 - \mu)$ multiplied by
    $(c + D)^p$) for the duration of every update and every prediction, as
    :class:`DelayScaledLR` scales the learning rate
    (:meth:`~predictopt.pipeline.methods.StageTransform.group_values`): the groups, what
    schedulers set and checkpoints store, keep the user's values, and a scheduler that sets
    the momentum (``OneCycleLR`` with ``cycle_momentum``) gets its value scaled in the same
    way.

    * Adam family (``betas``): $\beta_1 \to \mu_D$; the update $\hat m/(\sqrt{\hat v}+\epsilon)$
      is an average, so its size does not change.
    * Momentum SGD (torch's $b \leftarrow \mu b + (1 - \tau) g$, $w \leftarrow w - \eta b$):
      $\mu \to \mu_D$ and the dampening $\tau \to 1 - (1 - \tau)(1 - \mu_D)/(1 - \mu)$, so the
      steady-state buffer $(1 - \tau) g / (1 - \mu)$, the effective step, and the learning rate
      are those of the user's optimizer.
    * Muon (``torch.optim.Muon``, $b \leftarrow \mu b + (1 - \mu) g$, orthogonalised): only
      with ``muon=True`` (see below), $\mu \to \mu_D$.

    Why: a gradient $D$ updates old drives a feedback loop that a slowly turning momentum
    tolerates, provided the forward runs on weights predicted along that momentum (which then
    barely changes over the $D$ updates the prediction spans). In the delayed linear model of
    :mod:`predictopt.analysis` with prediction, the stable range at delay $D$ widens by a
    factor that grows with $D$; without prediction more momentum buys nothing (the stability
    table of the study page). Ajanthan et al. (2025) train with more momentum for
    the same reason; this transform ties the horizon to the delay instead of to a fixed target.

    Args:
        power: $p \ge 0$ (0: the optimizer as it is).
        offset: $c \ge 1$ (1: an undelayed stage keeps its momentum).
        delays: ``"observed"`` or ``"1f1b"``, as in :class:`DelayScaledLR` (the latter for a
            staleness-free twin).
        strict: Raise when a part of the optimizer is none of those above (RMSprop, Adagrad,
            Nesterov SGD...); with ``strict=False`` such a part is left as it is (a warning
            names it). SGD without momentum is always left as it is, silently.
        muon: On a stage whose optimizer has a ``torch.optim.Muon`` part, scale the momentum
            of every part, Muon's included. Default ``False``: such a stage keeps the momentum
            of all its parts. In the study's Muon settings a longer horizon on Muon's own parts
            cost far more than the delay it should mitigate (a screen at 8 stages), and one on
            the Adam parts beside them (embeddings, norms, biases) alone ended behind leaving
            the stage as it is at 4, 8 and 16 stages (3 seeds each): the stage's prediction
            follows its matrices, whose momentum keeps its horizon.
    """

    def __init__(self, power: float = 1.0, offset: float = 1.0, delays: str = "observed", *,
                 strict: bool = True, muon: bool = False) -> None:
        if not isinstance(muon, bool):
            raise TypeError(f"muon must be a bool, got {muon!r}")
        self.muon = muon
        self.power = _number(power, "power")
        self.offset = _number(offset, "offset", low=1.0)
        self.delays = _delays(delays)
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {strict!r}")
        self.strict = strict

    def factor(self, ctx: StageContext) -> float:
        """$(c + D)^{-p}$: the factor on $1 - \\mu$ at this stage."""
        return (self.offset + _delay_of(ctx, self.delays)) ** (-self.power)

    @staticmethod
    def _kind(part: Optimizer) -> str | None:
        muon = getattr(torch.optim, "Muon", None)
        if muon is not None and isinstance(part, muon):
            return "muon"
        groups = part.param_groups
        if all("betas" in g for g in groups):
            return "adam"
        if isinstance(part, torch.optim.SGD):
            if all(not g.get("momentum", 0) for g in groups):
                return "keep"  # no momentum: nothing to scale, silently (as QH)
            if all(g.get("momentum", 0) and not g.get("nesterov") for g in groups):
                return "sgd"
        return None

    def prepare(self, optimizer: Optimizer, ctx: StageContext) -> Optimizer:
        _delay_of(ctx, self.delays)  # checks what the delays need
        parts = _parts(optimizer)
        kinds = [self._kind(p) for p in parts]
        if None in kinds:
            msg = (f"DelayScaledMomentum scales the momentum of Adam-family optimizers, "
                   f"momentum SGD (without nesterov) and Muon, also as parts of a "
                   f"CombinedOptimizer; got {type(optimizer).__name__}")
            if self.strict:
                raise ValueError(msg)
            warnings.warn(f"{msg} on stage {ctx.stage}: that part keeps its momentum",
                          stacklevel=2)
        return optimizer

    def group_values(self, ctx: StageContext, optimizer: Optimizer
                     ) -> list[dict[str, Any]] | None:
        parts = _parts(optimizer)
        kinds = [self._kind(p) for p in parts]
        f = self.factor(ctx)
        if f == 1.0 or ("muon" in kinds and not self.muon):
            return None  # a stage with Muon keeps every part's momentum (see muon above)
        out: list[dict[str, Any]] = []
        for part, kind in zip(parts, kinds):
            for g in part.param_groups:
                if kind == "adam":
                    out.append({"betas": (1.0 - (1.0 - float(g["betas"][0])) * f,
                                          g["betas"][1])})
                elif kind == "muon":
                    out.append({"momentum": 1.0 - (1.0 - float(g["momentum"])) * f})
                elif kind == "sgd":
                    tau = float(g.get("dampening", 0.0) or 0.0)
                    out.append({"momentum": 1.0 - (1.0 - float(g["momentum"])) * f,
                                "dampening": 1.0 - (1.0 - tau) * f})
                else:
                    out.append({})
        return out


def _delays(delays: Any) -> str:
    """Check a transform's ``delays`` argument."""
    if delays not in ("observed", "1f1b"):
        raise ValueError(f"delays must be 'observed' or '1f1b', got {delays!r}")
    return delays


def _delay_of(ctx: StageContext, delays: str) -> int:
    """The stage's delay: observed, or that of 1F1B (``K - 1 - k``) for a staleness-free twin.

    Raises:
        ValueError: ``"1f1b"`` without the stage index or the number of stages.
    """
    if delays == "observed":
        return ctx.delay
    if ctx.stage is None or ctx.num_stages is None:
        raise ValueError("delays='1f1b' needs the stage index and the number of stages "
                         "(StageWorker(stage=..., num_stages=...))")
    return ctx.num_stages - 1 - ctx.stage


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------


class DelayScaledLR(StageTransform):
    r"""The stage's learning rate times $\max(c + D, 1)^{-p\,r(t)}$.

    $r(t) = 1 - \min(t / T, 1)$ after $t$ updates when ``anneal_updates`` $= T$ is given
    (PipeMare's warm-up of the stale stages back to the full rate; Ajanthan et al.'s
    ``lr_correction`` with $c = 0$), else $r = 1$ (a constant factor: the $\eta \le 1/(L\tau)$
    of delayed-SGD analyses). The factor applies for the duration of each update and to the
    predicted weights; the optimizer's ``lr`` (what schedulers set and checkpoints store) is
    unchanged.

    Args:
        power: $p \ge 0$.
        offset: $c \ge 0$ (1: the factor is $1/(1 + D)$, 1 for an undelayed stage).
        anneal_updates: $T \ge 1$, or ``None``.
        delays: ``"observed"``: $D$ is the stage's delay in the run (:attr:`StageContext.delay`);
            ``"1f1b"``: $D = K - 1 - k$, the delay stage $k$ of $K$ has under 1F1B, also in a
            run without a pipeline (the staleness-free twin of a method, for comparisons).
        muon: Scale ``torch.optim.Muon`` (parts of a
            :class:`~predictopt.combined.CombinedOptimizer`) too. Default ``False``: Muon keeps
            its rate: its orthogonalised update has the same norm whatever the gradient's, and
            in trial runs of the study's Muon setting the scaled rate cost more than the delay
            it compensates (with and without a pipeline).
        momentum_sgd: Scale momentum SGD (``torch.optim.SGD`` with momentum, without
            Nesterov, in every group) too. ``False`` leaves its rate, and so its momentum term
            and its prediction, at the full rate: the default method then scales only the
            fresh-gradient term of its quasi-hyperbolic update
            (:class:`QuasiHyperbolicMomentum` with ``sgd_fresh_power=1``).
        adam: Scale Adam and AdamW (not NAdam) too. ``False`` leaves the rate of a stage
            optimizer that is one of them, as ``momentum_sgd=False`` does momentum SGD's: the
            default method scales only their fresh-gradient term
            (:class:`QuasiHyperbolicMomentum` with ``adam_fresh_power=1``). Adam parts of a
            :class:`~predictopt.combined.CombinedOptimizer` (beside Muon) keep the scaled rate,
            as ``adam_fresh_power`` leaves them.
    """

    def __init__(self, power: float = 1.0, offset: float = 1.0,
                 anneal_updates: int | None = None, delays: str = "observed", *,
                 muon: bool = False, momentum_sgd: bool = True, adam: bool = True) -> None:
        for flag, value in (("muon", muon), ("momentum_sgd", momentum_sgd), ("adam", adam)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {value!r}")
        self.muon = muon
        self.momentum_sgd = momentum_sgd
        self.adam = adam
        self.power = _number(power, "power")
        self.offset = _number(offset, "offset")
        self.delays = _delays(delays)
        if anneal_updates is not None and (isinstance(anneal_updates, bool) or not isinstance(
                anneal_updates, int) or anneal_updates < 1):
            raise ValueError(f"anneal_updates must be None or an int >= 1, got "
                             f"{anneal_updates!r}")
        self.anneal_updates = anneal_updates

    def prepare(self, optimizer: Optimizer, ctx: StageContext) -> Optimizer:
        _delay_of(ctx, self.delays)  # checks what the delays need
        return optimizer

    def scales_lr_of(self, optimizer: Optimizer, stage_optimizer: Optimizer | None = None
                     ) -> bool:
        kind = QuasiHyperbolicMomentum.split_kind(optimizer, stage_optimizer)
        if (kind == "sgd" and not self.momentum_sgd) or (kind == "adam" and not self.adam):
            return False
        muon = getattr(torch.optim, "Muon", None)
        return self.muon or muon is None or not isinstance(optimizer, muon)

    def lr_scale(self, ctx: StageContext, updates: int) -> float:
        base = max(self.offset + _delay_of(ctx, self.delays), 1.0)
        r = 1.0 if self.anneal_updates is None else 1.0 - min(updates / self.anneal_updates, 1.0)
        return base ** (-self.power * r)


# ---------------------------------------------------------------------------------------------
# Corrections of the update
# ---------------------------------------------------------------------------------------------


class QuasiHyperbolicMomentum(StageTransform):
    r"""Mix the fresh gradient into the momentum direction: the update of a stage becomes
    $\eta\,[\nu\,\hat m + (1 - \nu)\,\tilde g] / (\sqrt{\hat v} + \epsilon)$ for Adam and AdamW
    ($\tilde g$: the gradient, plus the L2 term for Adam, sign-flipped under ``maximize``) and
    $\eta\,[\nu\,b + (1 - \nu)\,c\,\tilde g]$ for momentum SGD (torch's buffer
    $b \leftarrow \mu b + (1 - \tau)\tilde g$, $c = (1 - \tau)/(1 - \mu)$ its steady-state
    ratio to the gradient), with $\nu = 1$ the optimizer as it is. Applied after the
    optimizer's own step as $w \leftarrow w - \eta (1 - \nu) (\tilde g - \hat m) /
    (\sqrt{\hat v} + \epsilon)$, resp. $w - \eta (1 - \nu)(c\,\tilde g - b)$: one
    more pass over the weights, with ``_foreach`` kernels over runs of at most 32 MiB of
    parameters (the temporaries stay bounded). The L2 term of Adam and SGD is taken at the
    weights after the step (the step's own is at the weights before it, which are gone).

    With ``sgd_fresh_power`` $= q > 0$, momentum SGD's fresh-gradient term is divided by
    $(1 + D)^q$ on top of the update's rate: $\eta\,[\nu\,b + (1 - \nu)\,c\,\tilde g /
    (1 + D)^q]$; ``adam_fresh_power`` does the same for Adam and AdamW,
    $\eta\,[\nu\,\hat m + (1 - \nu)\,\tilde g / (1 + D)^q] / (\sqrt{\hat v} + \epsilon)$.
    The default method pairs $q = 1$ for both with
    ``DelayScaledLR(momentum_sgd=False, adam=False)``: the momentum term (slow, and predicted
    over the delay) keeps the full rate, and only the fresh gradient's immediate kick, the fast
    part of the delayed feedback loop, takes the delayed rate (see docs/study.md).

    Args:
        nu: $\nu \in [0, 1]$; ``"delay"`` for $\nu = \beta_1^{D}$ (Spike Compensation's split:
            an undelayed stage keeps its optimizer).
        strict: Raise at construction of the stage when the optimizer (or a part of a
            `~predictopt.combined.CombinedOptimizer`) is not one of those above; with
            ``strict=False`` such an optimizer is left as it is, with a warning. SGD without
            momentum is always left as it is, silently: it has no momentum to mix the gradient
            into, and the formula gives its own update for every $\nu$.
        sgd_fresh_power: $q \ge 0$ for momentum SGD (0: the fresh term at the update's rate).
        adam_fresh_power: $q \ge 0$ for a stage optimizer that is Adam or AdamW (not for the
            Adam parts of a :class:`~predictopt.combined.CombinedOptimizer` beside Muon).
        delays: ``"observed"`` or ``"1f1b"``, the $D$ of the fresh powers, as in
            :class:`DelayScaledLR`.
    """

    def __init__(self, nu: float | str = 0.5, *, strict: bool = True,
                 sgd_fresh_power: float = 0.0, adam_fresh_power: float = 0.0,
                 delays: str = "observed") -> None:
        if nu != "delay":
            nu = _number(nu, "nu", high=1.0)
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {strict!r}")
        self.nu = nu
        self.strict = strict
        self.sgd_fresh_power = _number(sgd_fresh_power, "sgd_fresh_power")
        self.adam_fresh_power = _number(adam_fresh_power, "adam_fresh_power")
        self.delays = _delays(delays)

    @staticmethod
    def _kind(part: Optimizer) -> str | None:
        if isinstance(part, _ADAM_LIKE) and not isinstance(part, torch.optim.NAdam):
            return "adam"
        if isinstance(part, torch.optim.SGD):
            if all(not g.get("momentum", 0) for g in part.param_groups):
                return "keep"  # no momentum: the formula is SGD's own update
            if all(g.get("momentum", 0) and not g.get("nesterov") for g in part.param_groups):
                return "sgd"
        muon = getattr(torch.optim, "Muon", None)
        if muon is not None and isinstance(part, muon):
            return "keep"  # Muon: Nesterov momentum already, orthogonalised; left as it is
        return None

    @classmethod
    def split_kind(cls, part: Optimizer, stage_optimizer: Optimizer | None = None) -> str | None:
        """The kind whose update the fresh powers split (and ``DelayScaledLR``'s
        ``momentum_sgd=False`` / ``adam=False`` leave at the full rate): ``"sgd"`` for momentum
        SGD, ``"adam"`` for Adam or AdamW when ``part`` is the stage optimizer itself
        (``stage_optimizer`` ``None`` or ``part``; the Adam parts of a
        :class:`~predictopt.combined.CombinedOptimizer` beside Muon keep the whole update
        scaled), else ``None``."""
        kind = cls._kind(part)
        if kind == "sgd" or (kind == "adam" and stage_optimizer in (None, part)):
            return kind
        return None

    def prepare(self, optimizer: Optimizer, ctx: StageContext) -> Optimizer:
        if self.sgd_fresh_power or self.adam_fresh_power:
            _delay_of(ctx, self.delays)  # checks what the delays need
        kinds = [self._kind(p) for p in _parts(optimizer)]
        if None in kinds:
            msg = (f"quasi-hyperbolic momentum applies to Adam, AdamW and momentum SGD (without "
                   f"nesterov), also as parts of a CombinedOptimizer beside Muon; "
                   f"got {type(optimizer).__name__}")
            if self.strict:
                raise ValueError(f"{msg}: {optimizer!r}")
            warnings.warn(f"{msg} on stage {ctx.stage}: that optimizer updates as it is "
                          f"(pass strict=True to make this an error)", stacklevel=2)
        return optimizer

    def _nu(self, group: dict[str, Any], ctx: StageContext) -> float:
        if self.nu == "delay":
            beta = float(group["betas"][0]) if "betas" in group else float(group["momentum"])
            return beta ** ctx.delay
        return float(self.nu)

    def _fresh_factor(self, ctx: StageContext, kind: str = "sgd") -> float:
        """The factor on the fresh-gradient term of an optimizer of ``kind`` (``"adam"`` or
        ``"sgd"``): $(1 + D)^{-q}$ with that kind's power (1 when it is 0: the bits of the plain
        transform)."""
        q = self.sgd_fresh_power if kind == "sgd" else self.adam_fresh_power
        if not q:
            return 1.0
        return (1.0 + _delay_of(ctx, self.delays)) ** -q

    @torch.no_grad()
    def after_step(self, ctx: StageContext, update: UpdateContext) -> None:
        for opt in _parts(update.optimizer):
            kind = self._kind(opt)
            if kind not in ("adam", "sgd"):
                continue
            split = self.split_kind(opt, update.optimizer) is not None
            for group in opt.param_groups:
                nu = self._nu(group, ctx)
                if nu == 1.0:
                    continue
                alpha = -float(group["lr"]) * (1.0 - nu)
                sign = -1.0 if group.get("maximize") else 1.0
                wd = float(group.get("weight_decay", 0.0) or 0.0)
                # 1 (the bits of the plain transform) where the update is not split
                fresh = self._fresh_factor(ctx, kind) if split else 1.0
                if kind == "adam":  # the fresh term is g~ = sign g + l2 w
                    l2 = wd if not isinstance(opt, torch.optim.AdamW) else 0.0
                    self._adam(opt, group, alpha, sign * fresh, l2 * fresh, update.workspace)
                else:
                    self._sgd(opt, group, alpha, sign, wd, fresh)

    @staticmethod
    def _adam(opt: Optimizer, group: dict[str, Any], alpha: float, sign: float,
              l2: float, workspace: Any = None) -> None:
        b1, b2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        buckets: dict[tuple[Any, ...], list[tuple[Tensor, ...]]] = {}
        for p in group["params"]:
            st = opt.state.get(p)
            if p.grad is None or p.grad.is_sparse or not st or "exp_avg" not in st:
                continue
            k = (p.device, p.dtype, float(st["step"]))
            buckets.setdefault(k, []).append((p, p.grad, st["exp_avg"], st[key]))
        for (_, _, step), items in buckets.items():
            bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
            big = [it for it in items if it[0].numel() >= _PER_TENSOR_NUMEL
                   and all(t.is_contiguous() for t in it)]
            if big:  # one reused denominator buffer, in-place passes: no weight-sized temporary
                rb2 = math.sqrt(bc2)
                for p, g, m, v in big:
                    den = (workspace.scratch(v.numel(), v.dtype, v.device).view(v.shape)
                           if workspace is not None else torch.empty_like(v))
                    torch.sqrt(v, out=den)
                    den.div_(rb2).add_(eps)
                    if l2:
                        p.addcdiv_(p, den, value=alpha * l2)  # the L2 term at the new weights
                    p.addcdiv_(g, den, value=alpha * sign)
                    p.addcdiv_(m, den, value=-alpha / bc1)
                chosen = {id(it[0]) for it in big}
                items = [it for it in items if id(it[0]) not in chosen]
            for chunk in _chunks(items):
                ps, gs, ms, vs = (list(x) for x in zip(*chunk))
                denom = torch._foreach_div(vs, bc2)
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
                diff = torch._foreach_mul(gs, sign)
                if l2:
                    torch._foreach_add_(diff, ps, alpha=l2)  # the L2 term at the new weights
                torch._foreach_add_(diff, ms, alpha=-1.0 / bc1)
                torch._foreach_addcdiv_(ps, diff, denom, value=alpha)

    @staticmethod
    def _sgd(opt: Optimizer, group: dict[str, Any], alpha: float, sign: float,
             wd: float, fresh: float = 1.0) -> None:
        mu = float(group["momentum"])
        keep = 1.0 - float(group.get("dampening", 0.0) or 0.0)  # b's steady state: g keep/(1-mu)
        keep = keep * fresh  # the fresh term's factor (exact when 1)
        items = [(p, p.grad, opt.state[p]["momentum_buffer"]) for p in group["params"]
                 if p.grad is not None and not p.grad.is_sparse
                 and opt.state.get(p, {}).get("momentum_buffer") is not None]
        by: dict[tuple[Any, ...], list[tuple[Tensor, ...]]] = {}
        for it in items:
            by.setdefault((it[0].device, it[0].dtype), []).append(it)
        for bucket in by.values():  # in place: p (1 + a wd c) + a g c - a b, c = keep/(1-mu)
            ps, gs, bs = (list(x) for x in zip(*bucket))
            if wd:
                torch._foreach_mul_(ps, 1.0 + alpha * wd * keep / (1.0 - mu))
            torch._foreach_add_(ps, gs, alpha=alpha * sign * keep / (1.0 - mu))
            torch._foreach_add_(ps, bs, alpha=-alpha)


#: Adam tensors of at least this many elements get quasi-hyperbolic momentum's correction one by
#: one, in place, with their denominator in a reused scratch buffer (no weight-sized temporaries,
#: which on CPU page-fault when fresh); smaller ones with ``_foreach`` kernels over chunks.
_PER_TENSOR_NUMEL = 1 << 15


def _chunks(items: list[tuple[Tensor, ...]], budget: int = 1 << 25
            ) -> list[list[tuple[Tensor, ...]]]:
    """Split ``items`` (led by a parameter) into runs of at most ``budget`` parameter bytes,
    so that the temporaries of one run stay bounded."""
    out: list[list[tuple[Tensor, ...]]] = [[]]
    size = 0
    for it in items:
        n = it[0].numel() * it[0].element_size()
        if out[-1] and size + n > budget:
            out.append([])
            size = 0
        out[-1].append(it)
        size += n
    return [c for c in out if c]


class DelayCompensation(StageTransform):
    r"""DC-ASGD's delay-compensated gradient (Zheng et al., 2017):
    $g \leftarrow g + \lambda\,g \odot g \odot (w_{now} - w_{fwd})$, where $w_{fwd}$ are the
    weights the micro-batch's forward ran on and $w_{now}$ the stage's weights when its
    gradient is applied. With ``adaptive`` (DC-ASGD-a), $\lambda = \lambda_0 /
    \sqrt{\overline{g^2} + \epsilon}$ elementwise, $\overline{g^2}$ an EMA (factor ``beta``) of
    the squared gradients kept in the worker's transform state (:attr:`UpdateContext.state`,
    part of a stage checkpoint).

    Args:
        lam: $\lambda$ (or $\lambda_0$ when adaptive).
        adaptive: Use DC-ASGD-a's adaptive $\lambda$.
        beta: EMA factor of $\overline{g^2}$.
        eps: $\epsilon$.
    """

    needs_forward_weights = True
    STATE_KEY = "dc_mean_square"

    def __init__(self, lam: float = 2.0, adaptive: bool = True, beta: float = 0.95,
                 eps: float = 1e-7) -> None:
        self.lam = _number(lam, "lam")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be a bool, got {adaptive!r}")
        self.adaptive = adaptive
        self.beta = _number(beta, "beta", high=1.0, high_open=True)
        self.eps = _number(eps, "eps", low_open=True)

    @torch.no_grad()
    def correct_gradients(self, ctx: StageContext, update: UpdateContext, mb: int,
                          grads: list[Tensor | None], forward_weights: list[Tensor] | None
                          ) -> None:
        if forward_weights is None:
            return
        for p, g, w in zip(update.params, grads, forward_weights):
            if g is None or g.is_sparse:
                continue
            lam: Tensor | float = self.lam
            if self.adaptive:
                st = update.state.setdefault(p, {})
                ms = st.get(self.STATE_KEY)
                if ms is None:
                    ms = st[self.STATE_KEY] = g * g
                else:
                    ms.mul_(self.beta).addcmul_(g, g, value=1.0 - self.beta)
                lam = ms.add(self.eps).rsqrt_().mul_(self.lam)
            if w.data_ptr() == p.data_ptr():
                continue  # forward ran on the current weights: no delay to compensate
            g.add_(g * g * (p.detach() - w) * lam)


class DiscrepancyCorrection(StageTransform):
    r"""PipeMare's discrepancy correction: the backward of a method without weight stashing
    reads $w_t - \ell\,\delta_t$, where $\ell$ is the number of updates since the micro-batch's
    forward and $\delta_{t+1} = \gamma\,\delta_t + (1-\gamma)(w_{t+1} - w_t)$ an EMA of the
    stage's updates: the forward's weights $w_{t-\ell}$, extrapolated back. Keeps two copies of
    the stage's weights (the EMA and the weights before the step, in the worker's transform
    state), against one per micro-batch in flight for weight stashing.

    Args:
        gamma: $\gamma \in [0, 1)$.
    """

    corrects_backward_weights = True

    def __init__(self, gamma: float = 0.9) -> None:
        self.gamma = _number(gamma, "gamma", high=1.0, high_open=True)

    @torch.no_grad()
    def before_step(self, ctx: StageContext, update: UpdateContext) -> None:
        for p in update.params:
            st = update.state.setdefault(p, {})
            prev = st.get("before")
            if prev is None:
                st["before"] = p.detach().clone()
            else:
                prev.copy_(p.detach())

    @torch.no_grad()
    def after_step(self, ctx: StageContext, update: UpdateContext) -> None:
        for p in update.params:
            st = update.state[p]
            step = p.detach() - st["before"]
            d = st.get("delta")
            if d is None:
                st["delta"] = step.mul_(1.0 - self.gamma)
            else:
                d.mul_(self.gamma).add_(step, alpha=1.0 - self.gamma)

    @torch.no_grad()
    def backward_weight(self, ctx: StageContext, state: dict[Tensor, dict[str, Any]],
                        param: Tensor, lag: int) -> Tensor:
        r"""$w - \ell\,\delta$ laid out like ``param`` (``param`` itself while no EMA exists)."""
        d = state.get(param, {}).get("delta")
        if d is None or lag == 0:
            return param.detach()
        out = torch.empty_strided(param.size(), param.stride(), dtype=param.dtype,
                                  device=param.device)
        torch.add(param.detach(), d, alpha=-float(lag), out=out)
        return out


class ErrorFeedback(StageTransform):
    r"""Error feedback for delayed updates: the stage's weights track the virtual iterate.

    Delayed SGD, $x_{t+1} = x_t - \eta\,g(x_{t-D})$, is the error-feedback recursion whose
    error is the updates still in flight (Stich & Karimireddy, 2020): the *virtual* iterate
    $\tilde x_t$, $x_t$ plus those updates, follows undelayed SGD, and the delay's damage is that
    gradients are taken at $x_{t-D}$ instead of near $\tilde x_t$. This transform estimates the
    error as $\gamma D$ (smoothed) updates and feeds it back into the weights, so that the
    weights the forwards read are the base iterate plus the estimate: with $u_t$ the optimizer's
    own update of step $t$ (whatever the optimizer: measured as the change of the weights across
    its step),

    $$\bar u_t = \beta\,\bar u_{t-1} + (1 - \beta)\,u_t, \qquad
      w_{t+1} = w_t + u_t + k\,(\bar u_t - \bar u_{t-1}), \quad k = \gamma D,$$

    so $w_t = x_t + k\,\bar u_t$ at all times ($x_t$ the iterate without the correction). Per
    step the correction is $k(1 - \beta)(u_t - \bar u_{t-1})$, a mix of the newest update and
    the recent ones, in the spirit of Zmushko et al.'s error-feedback correction for a one-step
    delay (ICML 2026), whose exact algorithm this project could not read (only its abstract is
    available offline): this is not their method. $\beta = 0$, $\gamma = 1$, $D = 1$ gives
    $2u_t - u_{t-1}$, the optimistic update. An undelayed stage ($D = 0$) is left as it is, and
    so is an update the optimizer skipped (the worker calls no after-step hook then).

    Costs two copies of the stage's weights (the weights before the step and $\bar u$, in the
    worker's transform state, saved in stage checkpoints) and six elementwise passes over them
    per update; no copy per micro-batch.

    The default $\beta = 0$ estimates the error from the newest update alone
    ($w = x + \gamma D\,u_t$); in one-seed trials of the study's 8-stage AdamW and SGD settings
    it did better than $\beta = 0.9$ (docs: Convergence study).

    Args:
        beta: $\beta \in [0, 1)$, the smoothing of the update estimate.
        gain: $\gamma \ge 0$: the error is estimated as $\gamma D$ smoothed updates.
    """

    BEFORE = "ef_before"
    AVERAGE = "ef_avg"

    def __init__(self, beta: float = 0.0, gain: float = 1.0) -> None:
        self.beta = _number(beta, "beta", high=1.0, high_open=True)
        self.gain = _number(gain, "gain")

    def _k(self, ctx: StageContext) -> float:
        return self.gain * ctx.delay

    @torch.no_grad()
    def before_step(self, ctx: StageContext, update: UpdateContext) -> None:
        if not self._k(ctx) or not update.params:
            return
        for p in update.params:  # first update: the buffers, once
            st = update.state.setdefault(p, {})
            if self.BEFORE not in st:
                st[self.BEFORE] = torch.empty_like(p.detach())
                st[self.AVERAGE] = torch.zeros_like(p.detach())
        torch._foreach_copy_([update.state[p][self.BEFORE] for p in update.params],
                             [p.detach() for p in update.params])

    @torch.no_grad()
    def after_step(self, ctx: StageContext, update: UpdateContext) -> None:
        k = self._k(ctx)
        if not k or not update.params:
            return
        c = 1.0 - self.beta
        ws = [p.detach() for p in update.params]
        diff = [update.state[p][self.BEFORE] for p in update.params]
        avg = [update.state[p][self.AVERAGE] for p in update.params]
        torch._foreach_sub_(diff, ws)
        torch._foreach_neg_(diff)  # u_t, in the buffers of the old weights
        torch._foreach_sub_(diff, avg)  # u_t - avg_{t-1}
        torch._foreach_add_(ws, diff, alpha=k * c)
        torch._foreach_add_(avg, diff, alpha=c)
