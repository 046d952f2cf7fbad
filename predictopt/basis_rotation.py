r"""Adam in a rotated basis: :class:`RotatedAdamW` (basis rotation, Jung, Shin & Lee, ICML 2026).

Adam adapts its step size per *coordinate*. When the Hessian's eigenbasis is not aligned with
the coordinates, that adaptivity is lost, Adam's updates oscillate, and delayed updates made of
oscillating directions can point away from (even against) the undelayed ones; Jung et al.
(arXiv 2602.03515) trace the depth-dependent slow-down of asynchronous pipelines to it, and
run Adam in an estimate of the eigenbasis instead (SOAP-style, bilateral, from the gradient's
second moments). For a matrix parameter $W \in \mathbb{R}^{r \times c}$ with gradient $G_t$:

$$
L_t = \beta_s L_{t-1} + (1 - \beta_s)\,G_t G_t^\top, \qquad
R_t = \beta_s R_{t-1} + (1 - \beta_s)\,G_t^\top G_t,
$$

the bases $Q_L, Q_R$ are the eigenvectors of $L_t, R_t$ (a full eigendecomposition the first
time, then every ``precondition_frequency`` updates one power-iteration step
$Q \leftarrow \mathrm{QR}(L_t Q)$ after sorting $Q$'s columns by the estimated eigenvalues
$\mathrm{diag}(Q^\top L_t Q)$, the second moment's coordinates permuted alike), and

$$
m_t = \beta_1 m_{t-1} + (1 - \beta_1) G_t, \qquad
v_t = \beta_2 v_{t-1} + (1 - \beta_2) (Q_L^\top G_t Q_R)^{\odot 2},
$$

$$
W \leftarrow W (1 - \eta\lambda) - \frac{\eta}{1 - \beta_1^t}\,
Q_L \left[\frac{Q_L^\top m_t Q_R}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}\right] Q_R^\top .
$$

The first moment lives in the parameter's coordinates, the second in the rotated ones (as in
the authors' code). Parameters that are not matrices (biases, norms) and sides longer than
``max_dim`` are not rotated; a parameter with no rotated side is updated exactly as
``torch.optim.AdamW(foreach=False)`` updates it (tested bit for bit). The rotated math of a
16-bit parameter (covariances, bases, both moments) runs in float32: the first moment must be
as exact as the second, or the rounding of a bfloat16 moment in a direction with no curvature
yet is divided by a second moment that is nearly zero.

Weight prediction (:class:`RotatedAdamRule`, the default rule of ``RotatedAdamW``) repeats the
optimizer's own step: $D = Q_L [\hat m' / (\sqrt{\hat v} + \epsilon)] Q_R^\top$ with
$\hat m' = Q_L^\top m_t Q_R / (1 - \beta_1^t)$, decoupled decay as for AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .rules import AdamRule, _value, available_rules, register_rule

__all__ = ["RotatedAdamRule", "RotatedAdamW"]


class RotatedAdamW(Optimizer):
    r"""AdamW in the eigenbasis of the gradient's two-sided second moments (see the module).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate $\eta$.
        betas: $(\beta_1, \beta_2)$.
        eps: $\epsilon$.
        weight_decay: $\lambda$.
        decoupled_weight_decay: ``True``: AdamW's decay $W (1 - \eta\lambda)$; ``False``:
            Adam's L2 term $\lambda W$ added to the gradient.
        precondition_frequency: Updates between two refreshes of the bases ($\ge 1$).
        shampoo_beta: $\beta_s$, the moving average of $G G^\top$ and $G^\top G$ (``None``:
            $\beta_2$, as the authors' code).
        max_dim: Sides longer than this are not rotated (their covariance would cost
            ``side**2`` memory and an eigendecomposition).

    Raises:
        ValueError: a hyper-parameter out of range (the message names it).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, decoupled_weight_decay: bool = True,
                 precondition_frequency: int = 10, shampoo_beta: float | None = None,
                 max_dim: int = 4096) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "decoupled_weight_decay": decoupled_weight_decay,
                    "precondition_frequency": precondition_frequency,
                    "shampoo_beta": shampoo_beta, "max_dim": max_dim}
        _check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (checked like the constructor's arguments)."""
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One update of every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    # ------------------------------------------------------------------ one parameter
    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("RotatedAdamW does not support sparse gradients")
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        decoupled = group["decoupled_weight_decay"]
        state = self.state[p]
        if not state:
            sides = _sides(p, group["max_dim"])
            # the rotated math runs in at least float32 (eigh and qr have no 16-bit kernels)
            work = torch.promote_types(p.dtype, torch.float32) if sides else p.dtype
            state["step"] = torch.tensor(0.0)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=work, memory_format=torch.preserve_format)
            for side, n in sides:
                state[f"GG_{side}"] = torch.zeros(n, n, dtype=work, device=p.device)
        state["step"] += 1
        step = float(state["step"].item())
        grad = p.grad
        if wd != 0 and not decoupled:
            grad = grad.add(p, alpha=wd)
        rotated = "GG_L" in state or "GG_R" in state
        if rotated:
            self._refresh_bases(state, grad, group, step)
        if wd != 0 and decoupled:
            p.mul_(1 - lr * wd)
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - beta1)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        exp_avg_sq = state["exp_avg_sq"]  # after the refresh (which may permute it)
        if not rotated:  # torch's single-tensor AdamW, operation for operation
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
            return
        work = exp_avg_sq.dtype
        g = _project(grad.to(work), state)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        update = _project_back(_project(exp_avg, state) / denom, state)
        p.add_(update.to(p.dtype), alpha=-step_size)

    @staticmethod
    def _refresh_bases(state: dict[str, Any], grad: Tensor, group: dict[str, Any],
                       step: float) -> None:
        beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
        grad = grad.to(state["exp_avg_sq"].dtype)
        if "GG_L" in state:
            state["GG_L"].lerp_(grad @ grad.T, 1 - beta)
        if "GG_R" in state:
            state["GG_R"].lerp_(grad.T @ grad, 1 - beta)
        cold = state.get("Q_L", state.get("Q_R")) is None
        if not cold and step % group["precondition_frequency"]:
            return
        for side, dim in (("L", 0), ("R", 1)):
            gg = state.get(f"GG_{side}")
            if gg is None:
                continue
            if cold:
                try:
                    _, q = torch.linalg.eigh(gg)
                except torch.linalg.LinAlgError:  # ill-conditioned in float32: use float64
                    q = torch.linalg.eigh(gg.double())[1].to(gg.dtype)
                state[f"Q_{side}"] = q.flip(1)  # largest eigenvalue first
                continue
            q = state[f"Q_{side}"]
            order = torch.argsort(torch.diagonal(q.T @ gg @ q), descending=True)
            state["exp_avg_sq"] = state["exp_avg_sq"].index_select(dim, order)
            state[f"Q_{side}"] = torch.linalg.qr(gg @ q[:, order])[0]


class RotatedAdamRule(AdamRule):
    r"""The prediction rule of :class:`RotatedAdamW`: its step direction, in the parameter's
    coordinates, $D = Q_L [\hat m' / (\sqrt{\hat v} + \epsilon)] Q_R^\top$ for rotated
    parameters and Adam's $\hat m / (\sqrt{\hat v} + \epsilon)$ for the others (bias
    corrections at each parameter's step); decoupled decay as
    :class:`~predictopt.rules.AdamRule`. Under a constant gradient the bases and both moments
    stop changing, so the prediction is the weights ``s`` steps later (up to rounding)."""

    name = "rotated-adam"

    def directions(self, group, params, states):
        beta1, beta2 = (_value(b) for b in group["betas"])
        eps = _value(group["eps"])
        ps: list[Tensor] = []
        ds: list[Tensor] = []
        for p, st in zip(params, states):
            if "exp_avg" not in st or _value(st.get("step", 0)) <= 0:
                continue
            t = _value(st["step"])
            v = st["exp_avg_sq"]
            m = st["exp_avg"].to(v.dtype) / (1 - beta1**t)
            denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
            ps.append(p)
            ds.append(_project_back(_project(m, st) / denom, st).to(p.dtype))
        return ps, ds


if "rotated-adam" not in available_rules():
    register_rule("rotated-adam", RotatedAdamRule(), optimizers=[RotatedAdamW])


def _sides(p: Tensor, max_dim: int) -> list[tuple[str, int]]:
    """The sides of ``p`` that are rotated: ``("L", rows)``, ``("R", cols)``."""
    if p.ndim != 2:
        return []
    return [(s, n) for s, n in (("L", p.shape[0]), ("R", p.shape[1])) if n <= max_dim]


def _project(t: Tensor, state: dict[str, Any]) -> Tensor:
    """$Q_L^\\top t\\, Q_R$ (sides without a basis left as they are)."""
    if state.get("Q_L") is not None:
        t = state["Q_L"].T @ t
    if state.get("Q_R") is not None:
        t = t @ state["Q_R"]
    return t


def _project_back(t: Tensor, state: dict[str, Any]) -> Tensor:
    """$Q_L\\, t\\, Q_R^\\top$."""
    if state.get("Q_R") is not None:
        t = t @ state["Q_R"].T
    if state.get("Q_L") is not None:
        t = state["Q_L"] @ t
    return t


def _check_group(group: dict[str, Any]) -> None:
    def bad(name: str, accepted: str) -> ValueError:
        return ValueError(f"{name} must be {accepted}, got {group[name]!r}")

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not number(group["lr"]) or group["lr"] < 0:
        raise bad("lr", "a number >= 0")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(number(b) and 0 <= b < 1 for b in betas)):
        raise bad("betas", "two numbers in [0, 1)")
    if not number(group["eps"]) or group["eps"] < 0:
        raise bad("eps", "a number >= 0")
    if not number(group["weight_decay"]) or group["weight_decay"] < 0:
        raise bad("weight_decay", "a number >= 0")
    if not isinstance(group["decoupled_weight_decay"], bool):
        raise bad("decoupled_weight_decay", "a bool")
    f = group["precondition_frequency"]
    if isinstance(f, bool) or not isinstance(f, int) or f < 1:
        raise bad("precondition_frequency", "an int >= 1")
    sb = group["shampoo_beta"]
    if sb is not None and not (number(sb) and 0 <= sb < 1):
        raise bad("shampoo_beta", "None or a number in [0, 1)")
    md = group["max_dim"]
    if isinstance(md, bool) or not isinstance(md, int) or md < 1:
        raise bad("max_dim", "an int >= 1")
    for key in ("amsgrad", "maximize"):
        if group.get(key):
            raise ValueError(f"RotatedAdamW does not support {key}=True")
