r"""Fine-grained Pipelined Backpropagation (Kosson et al., 2021): the order and the methods.

Pipelined Backpropagation (PB) makes every layer a stage, feeds one sample per tick and never
flushes: at tick ``t`` stage ``k`` of ``K`` runs the forward of sample ``t - k`` and then the
backward of sample ``t - (2K - 2 - k)``, and it steps its optimizer after every backward (batch
size 1 per update). Forward and backward of *different* samples thus share a stage in the same
tick, and the pipeline is always full (apart from the ramp-up and the final drain).

Delays
------
``F(k, i)`` runs at tick $i + k$ and ``B(k, i)`` at tick $i + 2K - 2 - k$. The backwards of stage
``k`` at ticks $i + k, \dots, i + 2K - 3 - k$ (the one at tick $i + k$ runs after ``F(k, i)``)
are those of samples $i - D_k, \dots, i - 1$ with

$$
D_k = 2 (K - 1 - k),
$$

each followed by an update, so exactly $D_k$ updates of stage ``k`` happen between ``F(k, i)``
and ``B(k, i)`` in steady state, and $\min(i, D_k)$ at the start of the stream, where only the
samples $0, \dots, i - 1$ exist. The last stage has $D_{K-1} = 0$: its forward and backward of a
sample are back to back. :func:`pb_staleness` counts the updates in the local orders
(:func:`pb_local_orders`) and so derives this table rather than assuming it; the tests check it
against $\min(i, D_k)$. The drain at the end of a stream does not change it (only earlier
samples' backwards lie between a forward and its backward).

Streams and epochs
------------------
A *stream* of ``n`` samples is what :class:`~predictopt.pipeline.PipelineSimulator` calls a step
for ``schedule="PB"``: ``n = n_microbatches`` micro-batches (one sample each in the paper's
setting), run with the order above and drained at the end. :func:`~predictopt.pipeline.train`
cuts an epoch into steps of ``n`` micro-batches, so the simplest faithful mapping, and the one
``predictopt compare`` uses, is one stream per epoch (``n`` = the samples per epoch, one
micro-batch of one sample each): the pipeline never flushes within an epoch and drains once at
its end, which costs $2K - 2$ ticks per epoch and restarts the ramp-up (the first $D_k$ samples
of the next epoch see smaller delays). Everything is deterministic: the order is fixed and the
samples come in the epoch's shuffled order.

Methods
-------
The methods that run on this schedule are the registry's entries with ``schedules = ("PB",)``
(:mod:`predictopt.pipeline.catalog`): ``pb`` (weight stashing), ``pb-sc`` (Spike
Compensation: the stage's SGD becomes a :class:`~predictopt.spike.SpikeCompensatedSGD` with
``delay`` $= D_k$), ``pb-lwp`` (Linear Weight Prediction: forward on
$\hat w = w - \eta\,s\,v$ with the momentum buffer $v$ and the horizon $s = \min(i, D_k)$),
``pb-sc-lwp`` (both), and their ``-lean`` twins without weight stashing (the backward of a sample
reads the stage's weights at backward time, as the paper's PB, which keeps one weight copy per
stage). All run momentum SGD per stage (the paper's setting). The generic methods with one update
per micro-batch (``sequential``, ``pipedream``, ``spectrain``, ``pipeoptim``, ...) run on it too.
"""

from __future__ import annotations

from typing import Any

from .methods import available_methods, get_method
from .schedules import Action

__all__ = [
    "PB_METHODS",
    "PB_PREDICTING",
    "PB_SCHEDULE",
    "pb_delays",
    "pb_global_order",
    "pb_local_orders",
    "pb_staleness",
    "pb_ticks",
]

#: The schedule name of Pipelined Backpropagation in the simulator.
PB_SCHEDULE = "PB"
#: The built-in methods that run on the PB schedule only.
PB_METHODS: tuple[str, ...] = tuple(m for m in available_methods()
                                    if get_method(m).schedules == (PB_SCHEDULE,))
#: The PB methods whose forwards run on predicted weights (Linear Weight Prediction).
PB_PREDICTING: tuple[str, ...] = tuple(m for m in PB_METHODS if get_method(m).predicts)


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def pb_delays(num_stages: int) -> list[int]:
    r"""The steady-state delay of every stage, $D_k = 2 (K - 1 - k)$.

    Args:
        num_stages: ``K >= 1``.

    Returns:
        ``[D_0, ..., D_{K-1}]`` (``D_{K-1} = 0``).
    """
    k = _check_int(num_stages, "num_stages")
    return [2 * (k - 1 - s) for s in range(k)]


def pb_ticks(num_stages: int, n_samples: int) -> list[list[Action]]:
    r"""The actions of every tick of a stream of ``n`` samples, in execution order.

    At tick ``t`` each stage ``k`` (first to last) runs ``F(k, t - k)`` and then
    ``B(k, t - (2K - 2 - k))``, each if that sample exists. Ticks run from 0 to
    $n + 2K - 3$ (the last backward, of stage 0 and sample $n - 1$). Within a tick every action
    depends only on actions of earlier ticks, except the last stage's ``B`` on its ``F`` just
    before it.

    Args:
        num_stages: ``K >= 1``.
        n_samples: Samples (micro-batches) of the stream ``n >= 1``.

    Returns:
        One list of :class:`~predictopt.pipeline.Action` per tick.
    """
    k_ = _check_int(num_stages, "num_stages")
    n = _check_int(n_samples, "n_samples")
    ticks: list[list[Action]] = []
    for t in range(n + 2 * k_ - 2):
        acts: list[Action] = []
        for k in range(k_):
            f, b = t - k, t - (2 * k_ - 2 - k)
            if 0 <= f < n:
                acts.append(Action("F", k, f))
            if 0 <= b < n:
                acts.append(Action("B", k, b))
        ticks.append(acts)
    return ticks


def pb_global_order(num_stages: int, n_samples: int) -> list[Action]:
    """All actions of a stream in an order a single process can execute: tick by tick.

    Arguments as :func:`pb_ticks`.
    """
    return [a for tick in pb_ticks(num_stages, n_samples) for a in tick]


def pb_local_orders(num_stages: int, n_samples: int) -> dict[int, list[Action]]:
    """Every stage's own actions in its order (each stage is its own rank).

    Arguments as :func:`pb_ticks`.

    Returns:
        ``{stage: [actions]}``.
    """
    out: dict[int, list[Action]] = {k: [] for k in range(_check_int(num_stages, "num_stages"))}
    for a in pb_global_order(num_stages, n_samples):
        out[a.stage].append(a)
    return out


def pb_staleness(num_stages: int, n_samples: int) -> dict[int, list[int]]:
    r"""The number of the stage's updates between ``F(k, i)`` and ``B(k, i)``, counted.

    Every ``B`` is followed by an update (batch size 1), so this is the staleness table the
    :class:`~predictopt.pipeline.semantics.StageWorker` checks, $s(k, i) = \min(i, D_k)$ (see
    the module docstring; derived here from :func:`pb_local_orders`, not assumed).

    Arguments as :func:`pb_ticks`.

    Returns:
        ``{stage: [s(stage, 0), ..., s(stage, n - 1)]}``.
    """
    result: dict[int, list[int]] = {}
    for k, acts in pb_local_orders(num_stages, n_samples).items():
        updates, at_forward, s = 0, {}, {}
        for a in acts:
            if a.kind == "F":
                at_forward[a.microbatch] = updates
            else:
                s[a.microbatch] = updates - at_forward[a.microbatch]
                updates += 1
        result[k] = [s[i] for i in range(n_samples)]
    return result
