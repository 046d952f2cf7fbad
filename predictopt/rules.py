r"""Prediction rules: the update direction each optimizer would apply next.

Weight prediction (XGrad, PipeOptim, SpecTrain, XPipe) replaces the current weights by the
weights ``s`` updates ahead, assuming every one of those updates repeats the optimizer's current
update direction $D_t$:

$$
\hat w(s) = a\,w_t - C\,D_t, \qquad
a = \prod_{j=1}^{s} (1 - \eta_j \lambda), \qquad
C = \sum_{j=1}^{s} \eta_j \prod_{i=j+1}^{s} (1 - \eta_i \lambda),
$$

where $\eta_j$ is the learning rate of the ``j``-th future update (``s`` times the current
``lr`` unless a schedule is known) and $\lambda$ the *decoupled* weight decay (AdamW,
``decoupled_weight_decay=True``; zero otherwise). With a constant learning rate and no decoupled
decay this is the familiar $\hat w = w_t - s\,\eta\,D_t$.

This module holds the math of every rule, one class per optimizer family; the engine that applies
$a$ and $C$ lives in `predictopt.prediction`. A rule reads only the optimizer's own
state (never ``.grad``, which ``zero_grad()`` may have cleared). Rules for optimizers whose state
holds no smoothed update direction (SGD without momentum, plain RMSprop, Adagrad, Adadelta and any
optimizer without a rule) use `ObservedUpdateRule`: the wrapper records every real update
``delta = w_after - w_before`` at ``step()`` and the rule predicts along an exponential moving
average of ``-delta / lr``. Repeating only the last update is mostly noise for such optimizers
and predicts *worse* than the stale weights; the average does not.

Every direction returned is "per unit learning rate": the real update of the optimizer is
$-\eta D_t$ (plus decoupled decay).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "PredictionRule",
    "ObservedUpdateRule",
    "SGDRule",
    "AdamRule",
    "AdamaxRule",
    "NAdamRule",
    "RAdamRule",
    "RMSpropRule",
    "ScheduleFreeRule",
    "MuonRule",
    "AdafactorRule",
    "register_rule",
    "get_rule",
    "available_rules",
    "OBSERVED_KEY",
    "Quotient",
    "Scaled",
    "SqrtQuotient",
]

#: Key of the per-parameter optimizer state in which `ObservedUpdateRule` keeps its
#: moving average. It lives in the wrapped optimizer's own ``state`` so checkpoints stay standard
#: (a bare torch optimizer ignores the extra key).
OBSERVED_KEY = "predictopt_direction"

class Quotient(NamedTuple):
    r"""A direction kept unmaterialised: $D_i = n_i / (d_i\,q_i)$, applied with one fused
    ``_foreach_addcdiv_`` (value $-C/q_i$), as torch's own Adam applies its step."""

    numerators: list[Tensor]
    denominators: list[Tensor]
    divisors: list[float]


class SqrtQuotient(NamedTuple):
    r"""Adam's direction, kept unmaterialised:
    $D_i = n_i / ((\sqrt{v_i} / r_i + \epsilon)\, q_i)$, with $n_i$ the first moment, $v_i$
    the second, $r_i = \sqrt{1 - \beta_2^t}$ and $q_i = 1 - \beta_1^t$ (or another divisor).

    The engine forms each denominator in a reused scratch buffer, tensor by tensor, in torch's
    order (``sqrt``, then ``/ r``, then ``+ eps``: the bits of `Quotient` with materialised
    denominators), and applies it with one ``addcdiv``."""

    numerators: list[Tensor]
    second_moments: list[Tensor]
    roots: list[float]
    eps: float
    divisors: list[float]


class Scaled(NamedTuple):
    r"""A direction with a per-tensor factor: $D_i = k_i\,t_i$, applied as
    ``p.add_(t_i, alpha=-C k_i)`` (e.g. Muon's shape-dependent lr adjustment)."""

    tensors: list[Tensor]
    scales: list[float]


Directions = tuple[list[Tensor], "list[Tensor] | Quotient | SqrtQuotient | Scaled"]


def _value(x: Any) -> float:
    """A Python float from a number or a one-element tensor (``step``, ``lr`` may be tensors)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class PredictionRule:
    """Base class of a prediction rule.

    Subclasses implement `directions` (and `decoupled_decay` where the optimizer
    shrinks the weights multiplicatively). A rule is stateless: anything it needs must live in the
    optimizer's ``state`` so that checkpoints carry it.

    Attributes:
        name: The name the rule is registered under.
    """

    name: str = "base"
    #: Whether a tensor's direction depends only on that tensor and its own state, so that the
    #: engine may call `directions` on any subset of a group (it does, in chunks of bounded
    #: bytes, to bound the temporaries of a prediction). Set it to ``False`` in a rule that
    #: couples the tensors of a group (e.g. through a global norm).
    per_tensor: bool = True

    def directions(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict]
    ) -> Directions:
        r"""The update direction $D$ per unit learning rate of the parameters of one group.

        Args:
            group: The optimizer's parameter group (hyper-parameters).
            params: The group's parameters.
            states: ``optimizer.state[p]`` for each parameter (possibly empty dicts).

        Returns:
            ``(ps, ds)``: the parameters that have a direction and their directions, in the same
            order; parameters without state (nothing to predict from) are left out.
        """
        raise NotImplementedError

    def decoupled_decay(self, group: dict[str, Any]) -> float:
        r"""The decoupled weight-decay coefficient $\lambda$ of the group (0 if none)."""
        return 0.0

    def tensor_coefficients(
        self, group: dict[str, Any], params: list[Tensor], directions: Any,
        states: list[dict], lrs: Sequence[float],
    ) -> tuple[list[float], list[float]] | None:
        r"""Per-tensor coefficients $(a_i, C_i)$ of $\hat w_i = a_i w_i - C_i D_i$, or ``None``.

        ``None`` (the default) lets the engine use the group's $(a, C)$ from the future learning
        rates ``lrs`` and `decoupled_decay` (`predictopt.coefficients`). A rule whose step size
        is not proportional to the learning rate (Adafactor's relative step) overrides it.

        Args:
            group: The parameter group.
            params: The parameters `directions` returned (same order as ``directions``).
            directions: The directions `directions` returned for them.
            states: Their optimizer states.
            lrs: The learning rates of the ``s`` predicted updates.
        """
        return None

    def observes(self, group: dict[str, Any]) -> bool:
        """Whether this rule needs the wrapper to record the real updates of this group."""
        return False

    def records_gradients(self, group: dict[str, Any]) -> bool:
        """Whether an observing rule records this group's update from ``.grad`` alone, before
        ``step()`` (`record_gradients`), instead of from a weight snapshot (`record`)."""
        return False

    def needs_snapshot(self, group: dict[str, Any]) -> bool:
        """Whether `record` needs the weights from before the step (``before``); if not, the
        wrapper takes no snapshot and passes ``before=None``."""
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ObservedUpdateRule(PredictionRule):
    r"""Generic rule for any optimizer: an average of the updates the wrapper observed.

    At every ``step()`` the wrapper records, for each parameter that had a gradient,
    $d = (w_{before} - w_{after}) / \eta$ and folds it into

    $$
    \bar d \leftarrow \beta \bar d + (1-\beta) d
    $$

    ($\bar d = d$ at the first step),

    kept in ``optimizer.state[p]["predictopt_direction"]``. The prediction is
    $\hat w = w - s\,\eta\,\bar d$. With ``beta=0`` this is "repeat the last update" (the
    REFERENCE's generic rule). When the updates are constant the average equals them exactly, so
    the prediction is exact up to rounding for any such optimizer. Costs one stored copy of the
    weights (the average) and one transient copy during ``step()``.

    Args:
        beta: Smoothing factor in ``[0, 1)``.
    """

    name = "observed"

    def __init__(self, beta: float = 0.9) -> None:
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be a float in [0, 1), got {beta!r}")
        self.beta = float(beta)

    def observes(self, group: dict[str, Any]) -> bool:
        return True

    def directions(self, group, params, states) -> Directions:
        return state_tensors(params, states, OBSERVED_KEY)

    @torch.no_grad()
    def record(self, group: dict[str, Any], params: list[Tensor], states: list[dict],
               before: list[Tensor]) -> None:
        """Fold the update just applied (``before`` -> current ``params``) into the average.

        ``before`` is consumed (overwritten in place). Called by the wrapper after the wrapped
        optimizer's ``step()``; parameters without a gradient are skipped by the caller.
        """
        lr = _value(group["lr"])
        if lr == 0.0 or not params:
            return
        torch._foreach_sub_(before, params)
        torch._foreach_div_(before, lr)
        self._fold(states, before, owned=True)

    def record_gradients(self, group: dict[str, Any], params: list[Tensor],
                         states: list[dict]) -> None:  # pragma: no cover - interface
        """Fold the update about to be applied, computed from ``.grad`` (see subclasses)."""
        raise NotImplementedError

    @torch.no_grad()
    def _fold(self, states: list[dict], ds: list[Tensor], owned: bool) -> None:
        old, new = [], []
        for st, d in zip(states, ds):
            prev = st.get(OBSERVED_KEY)
            if prev is None:
                st[OBSERVED_KEY] = d if owned else d.clone()
            else:
                old.append(prev)
                new.append(d)
        if old:
            torch._foreach_lerp_(old, new, 1.0 - self.beta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta})"


class SGDRule(ObservedUpdateRule):
    r"""SGD: the momentum buffer $b_t$ (PipeOptim, SpecTrain, Linear Weight Prediction).

    torch's SGD updates $w \leftarrow w - \eta\,b_t$ with
    $b_t = \mu b_{t-1} + (1-\tau) g_t$ (L2 decay inside $g_t$; under ``maximize`` torch negates
    $g_t$ before it enters the buffer), so $D = b_t$ as stored. With ``nesterov=True`` the real
    update $g_t + \mu b_t$ needs the gradient, which the state does not hold; $b_t$ is its
    steady-state value under a constant gradient and is used instead. Without momentum the state
    holds nothing, and the rule falls back to `ObservedUpdateRule`.
    """

    name = "sgd"

    def observes(self, group):
        return not group.get("momentum", 0.0)

    def records_gradients(self, group):
        return self.observes(group)

    @torch.no_grad()
    def record_gradients(self, group, params, states):
        r"""Plain SGD applies $w \leftarrow w - \eta (g + \lambda w)$ ($-g$ under ``maximize``):
        the observed direction is that bracket, computed from ``.grad`` before the step at the
        cost of one fused average instead of a weight snapshot."""
        grads = [p.grad for p in params]
        wd = _value(group.get("weight_decay", 0.0))
        ds, owned = grads, False
        if wd:
            ds, owned = torch._foreach_add(grads, params, alpha=wd), True
        if group.get("maximize", False):
            ds, owned = torch._foreach_neg(ds), True
        self._fold(states, ds, owned)

    def directions(self, group, params, states):
        if self.observes(group):
            return super().directions(group, params, states)
        return state_tensors(params, states, "momentum_buffer")


def state_tensors(params: list[Tensor], states: list[dict], key: str) -> Directions:
    """The parameters whose state holds a tensor under ``key``, and those tensors."""
    ps, ts = [], []
    for p, st in zip(params, states):
        t = st.get(key)
        if t is not None:
            ps.append(p)
            ts.append(t)
    return ps, ts


def _adam_state(group, params, states, second: str, scalar: str | None = None
                ) -> tuple[list, list, list, list, list]:
    """Parameters with an Adam-style state: ``(ps, exp_avg, state[second], steps, scalars)``,
    where ``scalars`` holds ``state[scalar]`` as stored, tensor or float (empty when ``scalar``
    is None)."""
    ps, m, v, steps, scalars = [], [], [], [], []
    for p, st in zip(params, states):
        if "exp_avg" in st and _value(st["step"]) > 0:
            ps.append(p)
            m.append(st["exp_avg"])
            v.append(st[second])
            steps.append(_value(st["step"]))
            if scalar is not None:
                scalars.append(st[scalar])
    return ps, m, v, steps, scalars


def _adam_denominators(v: list[Tensor], bc2_sqrt: list[float], eps: float) -> list[Tensor]:
    """``sqrt(v) / sqrt(1 - beta2^t) + eps``, in the order torch's Adam computes it."""
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    return denom


class AdamRule(PredictionRule):
    r"""Adam and AdamW: $D = \hat m_t / (\sqrt{\hat v_t} + \epsilon)$.

    Bias corrections at the current step $t$ of each parameter,
    $\hat m_t = m_t/(1-\beta_1^t)$, $\hat v_t = v_t/(1-\beta_2^t)$; the group's own
    ``eps``; ``max_exp_avg_sq`` in place of $v_t$ under AMSGrad. L2 decay (Adam) is already
    inside the moments; decoupled decay (AdamW, or Adam with ``decoupled_weight_decay=True``)
    enters through `decoupled_decay` and is applied exactly,
    $w (1-\eta\lambda)^s - \eta D \sum_{j<s} (1-\eta\lambda)^j$. ``maximize`` is already
    folded into the moments by torch. Under a constant gradient $\hat m_t = g$,
    $\hat v_t = g^2$ exactly, so the prediction equals the real weights ``s`` steps later.
    """

    name = "adam"

    def decoupled_decay(self, group):
        decoupled = group.get("decoupled_weight_decay", False)
        return _value(group.get("weight_decay", 0.0)) if decoupled else 0.0

    def directions(self, group, params, states):
        second = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        ps, m, v, steps, _ = _adam_state(group, params, states, second)
        if not ps:
            return ps, []
        beta1, beta2 = (_value(b) for b in group["betas"])
        bc1 = [1 - beta1**t for t in steps]
        bc2_sqrt = [math.sqrt(1 - beta2**t) for t in steps]
        return ps, SqrtQuotient(m, v, bc2_sqrt, _value(group["eps"]), bc1)


class AdamaxRule(PredictionRule):
    r"""Adamax: $D = m_t / ((1-\beta_1^t)\,u_t)$ with the infinity norm $u_t$
    (``exp_inf``, which already contains ``eps``). Exact under a constant gradient."""

    name = "adamax"

    def directions(self, group, params, states):
        ps, m, u, steps, _ = _adam_state(group, params, states, "exp_inf")
        if not ps:
            return ps, []
        beta1 = _value(group["betas"][0])
        return ps, Quotient(m, u, [1 - beta1**t for t in steps])


class NAdamRule(AdamRule):
    r"""NAdam: the direction of torch's next NAdam update, $T = t+1$, with the gradient
    estimated by $\hat m_t = m_t/(1-\beta_1^t)$.

    torch's NAdam applies at step $T$
    $\eta\,[\frac{1-\mu_T}{1-\Pi_T} g_T + \frac{\mu_{T+1}}{1-\Pi_T\mu_{T+1}} m_T] /
    (\sqrt{\hat v_T}+\epsilon)$ with $\mu_T = \beta_1 (1 - \tfrac12 0.96^{T\psi})$ and
    $\Pi_T = \prod_{j\le T}\mu_j$ (``mu_product``, $\Pi_T = \Pi_t\mu_T$). The rule puts
    $g_T \approx \hat m_t$ (the last, noisy gradient is not in the state, and repeating it
    would predict worse than the stale weights), hence
    $m_T \approx \beta_1 m_t + (1-\beta_1)\hat m_t$ and $\hat v_T \approx \hat v_t$:

    $$
    D = \Big[\frac{1-\mu_T}{(1-\Pi_T)(1-\beta_1^t)}
        + \frac{\mu_{T+1}}{1-\Pi_T\mu_{T+1}}\Big(\beta_1 + \frac{1-\beta_1}{1-\beta_1^t}\Big)\Big]
        \frac{m_t}{\sqrt{\hat v_t}+\epsilon}.
    $$

    Under a constant gradient every estimate is exact, and so is the one-step prediction.
    Decoupled decay as in `AdamRule`.
    """

    name = "nadam"

    def directions(self, group, params, states):
        ps, m, v, steps, mu_prods = _adam_state(group, params, states, "exp_avg_sq",
                                                "mu_product")
        if not ps:
            return ps, []
        beta1, beta2 = (_value(b) for b in group["betas"])
        psi = _value(group.get("momentum_decay", 4e-3))
        coef = []
        products: dict[tuple, float] = {}
        for t, prod in zip(steps, mu_prods):
            mu = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))  # mu_T, T = t + 1
            mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 2) * psi))  # mu_{T+1}
            if isinstance(prod, Tensor):  # Pi_T = Pi_t * mu_T in the state's dtype, as torch
                key = (float(prod), prod.dtype, mu)
                if key not in products:
                    products[key] = float(prod.detach().cpu() * mu)
                prod = products[key]
            else:
                prod = prod * mu
            bc1 = 1 - beta1**t
            coef.append((1.0 - mu) / (1.0 - prod) / bc1
                        + mu_next / (1.0 - prod * mu_next) * (beta1 + (1 - beta1) / bc1))
        return ps, SqrtQuotient(m, v, [math.sqrt(1 - beta2**t) for t in steps],
                                _value(group["eps"]), [1.0 / c for c in coef])


class RAdamRule(AdamRule):
    r"""RAdam: the direction of torch's next RAdam update, $t+1$, with the moments estimated
    from the state at step $t$:
    $D = \hat m_t\, r_{t+1} \sqrt{b_{t+1}} / (\sqrt{v_t b_{t+1}/b_t} + \epsilon)$ with
    $b_t = 1-\beta_2^t$ (torch adds $\epsilon$ before the bias correction) once the variance is
    tractable ($\rho_{t+1} > 5$), else $D = \hat m_t$ (SGD with momentum), with
    $\rho_\infty = 2/(1-\beta_2) - 1$, $\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)$ and the
    rectification
    $r_t = \sqrt{(\rho_t-4)(\rho_t-2)\rho_\infty / ((\rho_\infty-4)(\rho_\infty-2)\rho_t)}$.

    The regime and $r$ are those of the update being predicted, not of the last one: RAdam
    switches from momentum SGD to the rectified adaptive step at $t = 6$ (for
    $\beta_2 = 0.999$) and $r_6 \approx 0.026$, so the last update's regime can point the
    prediction the wrong way. Under a constant gradient the one-step prediction is exact.
    Decoupled decay as in `AdamRule`."""

    name = "radam"

    def directions(self, group, params, states):
        ps, m, v, steps, _ = _adam_state(group, params, states, "exp_avg_sq")
        if not ps:
            return ps, []
        beta1, beta2 = (_value(b) for b in group["betas"])
        eps = _value(group["eps"])
        rho_inf = 2 / (1 - beta2) - 1
        d = torch._foreach_div(m, [1 - beta1**t for t in steps])
        adaptive_idx, scales, v_scales = [], [], []
        for i, t in enumerate(steps):
            bc2, bc2_next = 1 - beta2**t, 1 - beta2 ** (t + 1)
            rho_next = rho_inf - 2 * (t + 1) * beta2 ** (t + 1) / bc2_next
            if rho_next > 5.0:
                rect = ((rho_next - 4) * (rho_next - 2) * rho_inf
                        / ((rho_inf - 4) * (rho_inf - 2) * rho_next)) ** 0.5
                adaptive_idx.append(i)
                scales.append(rect * bc2_next**0.5)
                v_scales.append((bc2_next / bc2) ** 0.5)
        if adaptive_idx:
            sub_d = [d[i] for i in adaptive_idx]
            # sqrt(v_{t+1}) estimated as sqrt(v_t / bc2_t * bc2_{t+1}): torch adds eps to the raw
            # sqrt(v), so the bias correction of step t+1 must be applied before eps.
            denom = torch._foreach_sqrt([v[i] for i in adaptive_idx])
            torch._foreach_mul_(denom, v_scales)
            torch._foreach_add_(denom, eps)
            torch._foreach_div_(sub_d, denom)
            torch._foreach_mul_(sub_d, scales)
        return ps, d


class RMSpropRule(ObservedUpdateRule):
    r"""RMSprop: the momentum buffer when ``momentum > 0`` (torch applies $w \leftarrow
    w - \eta b_t$, $b_t = \mu b_{t-1} + g_t/(\sqrt{\cdot}+\epsilon)$); otherwise, when
    ``centered``, the smoothed gradient $D = \bar g_t / (\sqrt{v_t - \bar g_t^2} + \epsilon)$
    (``grad_avg`` is an EMA of the gradient); otherwise the state holds no smoothed gradient and
    the rule falls back to `ObservedUpdateRule` (the PipeOptim code's
    $g_t/(\sqrt{v_t}+\epsilon)$ needs the last, noisy gradient)."""

    name = "rmsprop"

    def observes(self, group):
        return not group.get("momentum", 0.0) and not group.get("centered", False)

    def directions(self, group, params, states):
        if self.observes(group):
            return super().directions(group, params, states)
        ps, ds, sq, ga = [], [], [], []
        momentum = bool(group.get("momentum", 0.0))
        for p, st in zip(params, states):
            if momentum and st.get("momentum_buffer") is not None:
                ps.append(p)
                ds.append(st["momentum_buffer"])
            elif not momentum and "grad_avg" in st:
                ps.append(p)
                sq.append(st["square_avg"])
                ga.append(st["grad_avg"])
        if ps and not momentum:
            denom = torch._foreach_addcmul(sq, ga, ga, value=-1)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, _value(group["eps"]))
            ds = Quotient(ga, denom, [1.0] * len(ga))
        # torch negates the gradient under ``maximize`` before it enters any buffer: no sign flip
        return ps, ds


_DOT_BLOCK = 1 << 20


def _dot64(x: Tensor, y: Tensor | None = None) -> Tensor:
    r"""$\langle x, y\rangle$ (or $\lVert x\rVert^2$) summed in float64, as a 0-dim tensor on
    ``x``'s device, in blocks (bounded temporaries).

    The products are rounded in the tensors' dtype (relative error $\epsilon$ each, of random
    sign), the sum is exact to float64: the error is at most about
    $\epsilon \max_i |y_i|\,\lVert x\rVert$, where float32 or float64 accumulation (``torch.dot``)
    would add $n\epsilon$ of cancellation. Used by calibration, whose gain error then moves a
    prediction by at most about one ulp of the weights."""
    xf = x.reshape(-1)
    yf = xf if y is None else y.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, xf.numel(), _DOT_BLOCK):
        total += (xf[i:i + _DOT_BLOCK] * yf[i:i + _DOT_BLOCK]).sum(dtype=torch.float64)
    return total


class MuonRule(PredictionRule):
    r"""Muon (``torch.optim.Muon``): the orthogonalised momentum, $D = r\,\mathrm{NS}(b_t)$.

    torch's Muon updates a matrix parameter of shape $A \times B$ as

    $$
    b \leftarrow \mu b + (1-\mu) g,\qquad
    X = \begin{cases}(1-\mu) g + \mu b & \text{nesterov}\\ b & \text{else}\end{cases},\qquad
    w \leftarrow (1-\eta\lambda)\,w - \eta\,r\,\mathrm{NS}_k(X),
    $$

    where $\mathrm{NS}_k$ is its Newton-Schulz orthogonalisation (``ns_steps`` quintic iterations
    with ``ns_coefficients`` and ``eps``, in bfloat16, on $X/\lVert X\rVert_F$) and $r$ the
    learning-rate adjustment of ``adjust_lr_fn`` ($\sqrt{\max(1, A/B)}$ for ``None`` and
    ``"original"``, $0.2\sqrt{\max(A, B)}$ for ``"match_rms_adamw"``). With the next gradient
    estimated by the momentum $b_t$ (an average of the gradients), the next buffer is
    $\mu b_t + (1-\mu) b_t = b_t$ and so is the next input $X$, with or without ``nesterov``;
    NS sees only the direction of its input, so the missing bias correction (Muon keeps no step
    count) does not matter. The rule calls torch's own NS and lr adjustment. The weight decay is
    decoupled (applied with the unadjusted lr) and enters through `decoupled_decay`, exactly.

    Not exact under a constant gradient $g$: the real input $X$ is $c\,g$ with a step-dependent
    $c > 0$ while $b_t = (1-\mu^t) g$, and NS rounds its scaled input to bfloat16, so prediction
    and real update agree to bfloat16 precision of the update, not to the parameter's ulps.
    With ``momentum=0`` the buffer is the last gradient, the very input of the next update, and
    the prediction is exact under a constant gradient.
    """

    name = "muon"

    def decoupled_decay(self, group):
        return _value(group.get("weight_decay", 0.0))

    def directions(self, group, params, states):
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        ps, bufs = state_tensors(params, states, "momentum_buffer")
        if not ps:
            return ps, []
        coeffs = tuple(group["ns_coefficients"])
        steps, eps, adjust = group["ns_steps"], _value(group["eps"]), group.get("adjust_lr_fn")
        # NS normalises its bfloat16 copy in place; a bfloat16 buffer would be that copy
        outs = [_zeropower_via_newtonschulz(b.clone() if b.dtype == torch.bfloat16 else b,
                                            coeffs, steps, eps) for b in bufs]
        return ps, Scaled(outs, [_adjust_lr(1.0, adjust, p.shape) for p in ps])


class AdafactorRule(ObservedUpdateRule):
    r"""Adafactor (``torch.optim.Adafactor``): the next update from its factored second moment,
    with the gradient estimated by an average of the gradients.

    torch's Adafactor applies at step $T$ (``step`` after the increment)

    $$
    w \leftarrow (1-\eta\lambda)\,w - \frac{\alpha_T}{\delta}\,U,\qquad
    U = \frac{g}{\sqrt{\max(\hat V, \epsilon_1^2)}},\qquad
    \alpha_T = \max\big(\epsilon_2, \mathrm{RMS}(w)\big)\,\min(\eta, T^{-1/2}),\qquad
    \delta = \max\big(1, \mathrm{RMS}(U)/d\big),
    $$

    with $\hat V = R C / \mathrm{mean}(R)$ from the row and column factors ``row_var``,
    ``col_var`` of a matrix (``variance`` for a vector), $\mathrm{RMS}(w)$ taken before the
    decay. Its state keeps no gradient (only its factored magnitude), so the rule records, like
    `ObservedUpdateRule`, an average $\bar g$ of the gradients seen at ``step()`` (negated under
    ``maximize``; key ``predictopt_direction``) and predicts with $g \approx \bar g$ and
    $\hat V \approx \hat V_t$. Then $U$ and $\delta$ are the same for every predicted update and
    the weights stay of the form $w_j = a_j w - C_j U$, so the relative step $\alpha$ of each
    predicted update is computed exactly from $\lVert w\rVert^2$, $\langle w, U\rangle$ and
    $\lVert U\rVert^2$ (`tensor_coefficients`): $a_j = (1-\eta_j\lambda) a_{j-1}$,
    $C_j = (1-\eta_j\lambda) C_{j-1} + \alpha_{t+j}/\delta$. Under a constant gradient
    $\bar g = g$ and $\hat V$ stay exactly constant, so the prediction equals the real weights
    ``s`` steps later up to rounding. Costs one stored gradient average per parameter (Adafactor
    itself keeps only the factors).
    """

    name = "adafactor"

    def observes(self, group):
        return True

    def needs_snapshot(self, group):
        return False

    def decoupled_decay(self, group):
        return _value(group.get("weight_decay", 0.0))

    @torch.no_grad()
    def record(self, group, params, states, before):
        """Fold the gradients just applied (negated under ``maximize``), read from ``.grad``
        after the step (Adafactor initialises a state only while it is empty, so nothing may be
        written there before its first step); ``before`` is not used."""
        grads = [p.grad for p in params]
        if group.get("maximize", False):
            self._fold(states, torch._foreach_neg(grads), owned=True)
        else:
            self._fold(states, grads, owned=False)

    def directions(self, group, params, states):
        eps1, _ = group["eps"]
        ps, us = [], []
        for p, st in zip(params, states):
            g = st.get(OBSERVED_KEY)
            if g is None or "step" not in st or p.numel() == 0:
                continue
            e1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
            if p.dim() > 1:  # the order of torch's own computation
                var = st["row_var"] @ st["col_var"]
                var.div_(st["row_var"].mean(dim=-2, keepdim=True).clamp_(min=e1))
            else:
                var = st["variance"].clone()
            u = var.clamp_(min=e1 * e1).rsqrt_()
            u.mul_(g)
            ps.append(p)
            us.append(u)
        return ps, us

    def tensor_coefficients(self, group, params, directions, states, lrs):
        wd = _value(group.get("weight_decay", 0.0))
        eps2, d = _value(group["eps"][1]), _value(group["d"])
        out_a, out_c = [], []
        for p, u, st in zip(params, directions, states):
            t, n = _value(st["step"]), p.numel()
            delta = max(1.0, u.norm(2).item() / ((n**0.5) * d))
            ww, wu, uu = (float(x) for x in (_dot64(p), _dot64(p, u), _dot64(u)))
            a, c = 1.0, 0.0
            for j, lr in enumerate(lrs, start=1):
                if j == 1:  # torch's own figure for the next update
                    rms = p.norm(2).item() / (n**0.5)
                else:  # RMS of the predicted w_{j-1} = a w - c u
                    rms = math.sqrt(max(a * a * ww - 2 * a * c * wu + c * c * uu, 0.0) / n)
                alpha = max(eps2, rms) * min(lr, 1 / ((t + j) ** 0.5))
                f = 1.0 - lr * wd
                a, c = a * f, c * f + alpha / delta
            out_a.append(a)
            out_c.append(c)
        return out_a, out_c


class ScheduleFreeRule(ObservedUpdateRule):
    r"""Schedule-Free optimizers (``schedulefree`` package): predict the training point $y$.

    In train mode the parameters hold $y = (1-\beta) z + \beta x$, where gradients are taken;
    each step moves it by $c_{t}(z_t - y_t) + \eta(\beta(1-c_t)-1)\,\tilde g_t$ with the
    normalised gradient $\tilde g_t$, which the state does not keep. The rule therefore predicts
    along the observed average of $y$'s updates (`ObservedUpdateRule`). In eval mode
    (``opt.eval()``: parameters hold the average $x$) it predicts nothing, so evaluation and
    checkpoints taken there use $x$ as Schedule-Free intends.
    """

    name = "schedulefree"

    def directions(self, group, params, states):
        if not group.get("train_mode", True):
            return [], []
        return super().directions(group, params, states)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_RULES: dict[str, PredictionRule] = {}
_BY_CLASS: dict[type, str] = {}
_WARNED: set[type] = set()


def register_rule(name: str, rule: PredictionRule, *,
                  optimizers: Iterable[type[Optimizer]] = (), overwrite: bool = False) -> None:
    """Register a prediction rule under ``name`` and, optionally, as the default of optimizers.

    Args:
        name: The name ``PredictiveOptimizer(rule=name)`` accepts.
        rule: A `PredictionRule` instance.
        optimizers: Optimizer classes (and, through the MRO, their subclasses) whose default rule
            this becomes.
        overwrite: Replace an existing registration of ``name`` or of one of ``optimizers``.

    Raises:
        TypeError: ``rule`` is not a ``PredictionRule`` or an entry of ``optimizers`` is not an
            ``Optimizer`` subclass.
        ValueError: ``name`` is taken (and ``overwrite`` is false).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not isinstance(rule, PredictionRule):
        raise TypeError(f"rule must be a predictopt.PredictionRule instance, got {type(rule)!r}")
    optimizers = list(optimizers)
    for cls in optimizers:
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
            raise TypeError(f"optimizers must hold torch.optim.Optimizer subclasses, got {cls!r}")
    if not overwrite:
        if name in _RULES:
            raise ValueError(f"a rule named {name!r} is registered already; pass overwrite=True")
        taken = [c.__name__ for c in optimizers if c in _BY_CLASS]
        if taken:
            raise ValueError(f"optimizers {taken} have a rule already; pass overwrite=True")
    _RULES[name] = rule
    for cls in optimizers:
        _BY_CLASS[cls] = name


def available_rules() -> list[str]:
    """The names of all registered rules."""
    return sorted(_RULES)


def get_rule(spec: str | PredictionRule | Optimizer | type[Optimizer] | None,
             optimizer: Optimizer | None = None) -> PredictionRule:
    """Resolve a rule: a rule object, a registered name, or the default of an optimizer's class.

    The default is found along the class's MRO, so subclasses inherit their parent's rule. An
    optimizer without one gets ``"observed"`` with a one-time warning per class.

    Raises:
        ValueError: an unknown rule name (the message lists the registered ones).
        TypeError: anything else.
    """
    if spec is None:
        spec = optimizer
    if isinstance(spec, PredictionRule):
        return spec
    if isinstance(spec, str):
        try:
            return _RULES[spec]
        except KeyError:
            raise ValueError(
                f"rule must be None, a PredictionRule or one of {available_rules()}, got {spec!r}"
            ) from None
    cls = spec if isinstance(spec, type) else type(spec)
    if isinstance(cls, type) and issubclass(cls, Optimizer):
        for klass in cls.__mro__:
            if klass in _BY_CLASS:
                return _RULES[_BY_CLASS[klass]]
        if cls not in _WARNED:
            _WARNED.add(cls)
            warnings.warn(
                f"predictopt has no prediction rule for {cls.__name__}; using the generic "
                "'observed' rule (an average of the updates seen at step()). Register a rule "
                "with predictopt.register_rule to silence this.",
                stacklevel=3,
            )
        return _RULES["observed"]
    raise TypeError(
        f"rule must be None, a rule name, a PredictionRule or an Optimizer, got {type(spec)!r}"
    )


def _register_builtins() -> None:
    from torch import optim

    # Adagrad and Adadelta keep no smoothed gradient: the observed average is their designed
    # rule. Rprop, ASGD, LBFGS, SparseAdam and third-party optimizers reach it through the
    # fallback of get_rule, with a one-time warning.
    register_rule("observed", ObservedUpdateRule(), optimizers=[optim.Adagrad, optim.Adadelta])
    register_rule("last-update", ObservedUpdateRule(beta=0.0))
    register_rule("sgd", SGDRule(), optimizers=[optim.SGD])
    register_rule("adam", AdamRule(), optimizers=[optim.Adam, optim.AdamW])
    register_rule("adamax", AdamaxRule(), optimizers=[optim.Adamax])
    register_rule("nadam", NAdamRule(), optimizers=[optim.NAdam])
    register_rule("radam", RAdamRule(), optimizers=[optim.RAdam])
    register_rule("rmsprop", RMSpropRule(), optimizers=[optim.RMSprop])
    register_rule("muon", MuonRule(), optimizers=[optim.Muon] if hasattr(optim, "Muon") else [])
    register_rule("adafactor", AdafactorRule(),
                  optimizers=[optim.Adafactor] if hasattr(optim, "Adafactor") else [])
    try:  # optional dependency
        import schedulefree
    except ImportError:  # pragma: no cover - depends on the environment
        sf_classes: list[type[Optimizer]] = []
    else:
        sf_classes = [c for c in vars(schedulefree).values()
                      if isinstance(c, type) and issubclass(c, Optimizer)]
    register_rule("schedulefree", ScheduleFreeRule(), optimizers=sf_classes)


_register_builtins()


def _check_steps(steps: Any, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{name} must be an int >= 0, got {type(steps).__name__} {steps!r}")
    if steps < 0:
        raise ValueError(f"{name} must be an int >= 0, got {steps}")
    return steps


def _check_lrs(lrs: Sequence[float] | None, steps: int) -> None:
    if lrs is not None and len(lrs) != steps:
        raise ValueError(f"lrs must hold one learning rate per predicted step ({steps}), "
                         f"got {len(lrs)}")
