r"""Fidelity of a prediction rule on a real training run.

The fidelity ratio at horizon ``s`` is

$$
\rho(s) = \frac{\operatorname{mean}_t \lVert \hat w_t(s) - w_{t+s} \rVert}
{\operatorname{mean}_t \lVert w_t - w_{t+s} \rVert},
$$

how far the prediction made at update ``t`` lands from the weights the run actually reached ``s``
updates later, relative to how far the stale weights $w_t$ are from them. ``rho < 1``
means prediction helps; ``rho >= 1`` means it hurts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from .optimizer import PredictiveOptimizer
from .prediction import predict

__all__ = ["fidelity_ratios", "digits_mlp_problem"]


def digits_mlp_problem(seed: int = 0, hidden: int = 32
                       ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP and scikit-learn's bundled digits data (standardised), seeded."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y, dtype=torch.long)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    return model, x, y


def fidelity_ratios(make_optimizer: Callable[[Iterable[nn.Parameter]], Optimizer], *,
                    steps: Sequence[int] = (1, 2, 4), updates: int = 300, warmup: int = 20,
                    batch_size: int = 32, seed: int = 0, rule: str | None = None,
                    calibrate: bool | None = False,
                    problem: Callable[[int], tuple[nn.Module, torch.Tensor, torch.Tensor]]
                    = digits_mlp_problem) -> dict[int, float]:
    """Train a small model with minibatch noise and measure $\\rho(s)$ for each horizon.

    Args:
        make_optimizer: Builds the bare optimizer from the model's parameters.
        steps: The horizons ``s`` to measure.
        updates: Number of optimizer updates in the run.
        warmup: Updates before the first prediction is scored.
        batch_size: Minibatch size (small batches make the gradient noisy).
        seed: Seed of the model and of the batch order.
        rule: A rule name to force; default: the optimizer's own rule.
        calibrate: ``True``: calibrated prediction fitted for every horizon in ``steps``
            (``calibration_horizons=steps``); ``None``: `PredictiveOptimizer`'s defaults
            (calibrated, fitted for ``max(steps)``); ``False`` (the default here): the rule's
            formulas alone.
        problem: ``seed -> (model, x, y)``.

    Returns:
        ``{s: rho(s)}``.
    """
    model, x, y = problem(seed)
    params = list(model.parameters())
    options = ({} if calibrate is None else
               {"calibrate": calibrate, "calibration_horizons": tuple(steps)})
    opt = PredictiveOptimizer(make_optimizer(params), steps=max(steps), rule=rule, **options)
    gen = torch.Generator().manual_seed(seed)
    flat = lambda ts: torch.cat([t.detach().reshape(-1).double() for t in ts])  # noqa: E731
    history: list[torch.Tensor] = []
    preds: dict[int, list[torch.Tensor]] = {s: [] for s in steps}
    loss_fn = nn.CrossEntropyLoss()
    for t in range(updates):
        history.append(flat(params))
        if t >= warmup:
            for s in steps:
                p = predict(opt, s)
                preds[s].append(flat([p[q] for q in params]))
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    history.append(flat(params))
    out = {}
    for s in steps:
        err, stale = [], []
        for j, pred in enumerate(preds[s]):
            t = warmup + j
            if t + s >= len(history):
                break
            target = history[t + s]
            err.append((pred - target).norm().item())
            stale.append((history[t] - target).norm().item())
        out[s] = sum(err) / sum(stale)
    return out
