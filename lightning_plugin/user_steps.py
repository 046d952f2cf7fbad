"""Running the LightningModule's own steps on the pipeline's output.

On the rank holding the last stage, the user's ``training_step`` / ``validation_step`` /
``test_step`` / ``predict_step`` run as written, with ``self(...)`` redirected to the
pipeline's output for the batch (or micro-batch) at hand (:func:`redirect_forward`). What they
log is captured (:class:`LogCapture`), sent to every rank and logged there
(:func:`replay_logs`), so that ``callback_metrics``, loggers, checkpoint and early-stopping
callbacks see the same values everywhere.
"""

from __future__ import annotations

import inspect
import numbers
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .comm import broadcast_object, to_cpu
from .contract import pipeline_inputs_of, same_tensors, split_batch, tensor_leaves
from .errors import PipelineContractError
from .evaluation import forward_only, run_chain

__all__ = [
    "LogCapture",
    "LogEntry",
    "MetricRef",
    "call_hooks",
    "capture_logs",
    "check_training_step",
    "evaluation_step",
    "extract_loss",
    "merge_step_logs",
    "redirect_forward",
    "replay_logs",
]


# ---------------------------------------------------------------------------------------------
# self(...) returns the pipeline's output
# ---------------------------------------------------------------------------------------------


_MISSING = object()


@contextmanager
def _instance_attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name`` is ``value`` within the block (shadowing the class's method), then as
    before (blocks may nest)."""
    before = obj.__dict__.get(name, _MISSING)
    obj.__dict__[name] = value
    try:
        yield
    finally:
        if before is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = before


class _Redirect:
    """Stands in for ``module.forward``: returns ``output`` for the expected inputs."""

    def __init__(self, output: Any, inputs: tuple[Tensor, ...], where: str) -> None:
        self.output = output
        self.inputs = inputs
        self.where = where
        self.calls = 0
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        got = tensor_leaves(args) + tensor_leaves(kwargs)
        if not same_tensors(got, self.inputs):
            shapes = [tuple(t.shape) for t in got]
            want = [tuple(t.shape) for t in self.inputs]
            raise PipelineContractError(
                f"{self.where} called self(...) with inputs {shapes} that are not the "
                f"{'micro-' if 'training' in self.where else ''}batch's pipeline_inputs "
                f"{want}: under PipeOptimStrategy self(...) returns the pipeline's output for "
                "the batch at hand, so call it with exactly what pipeline_inputs(batch) returns "
                "(define pipeline_inputs(batch) if the default, batch[0], is not the input)")
        self.calls += 1
        self.args, self.kwargs = args, kwargs
        return self.output


@contextmanager
def redirect_forward(module: Any, output: Any, inputs: tuple[Tensor, ...], where: str
                     ) -> Iterator[_Redirect]:
    """Within the block, ``module(...)`` (``module.forward``) returns ``output``.

    The call's tensors must be ``inputs`` (the same objects or equal values): anything else
    raises :class:`PipelineContractError` instead of silently returning the wrong output.
    """
    redirect = _Redirect(output, inputs, where)
    with _instance_attribute(module, "forward", redirect):
        yield redirect


def extract_loss(result: Any, where: str) -> tuple[Tensor, dict[str, Any]]:
    """The loss a ``training_step`` returned (a Tensor, or a dict with ``"loss"``), checked.

    Returns:
        ``(loss, other entries of a returned dict)``.

    Raises:
        PipelineContractError: ``None``, no ``"loss"``, a loss that is not one number, or one
            that does not depend on the model's output.
    """
    extras: dict[str, Any] = {}
    if isinstance(result, Mapping):
        if "loss" not in result:
            raise PipelineContractError(f"{where} returned a dict without 'loss' (keys "
                                        f"{sorted(map(str, result))}); return the loss")
        extras = {k: v for k, v in result.items() if k != "loss"}
        loss = result["loss"]
    else:
        loss = result
    if loss is None:
        raise PipelineContractError(
            f"{where} returned None: on one device that skips the batch, but the pipeline has "
            "already run this micro-batch through every stage and needs its loss")
    if not isinstance(loss, Tensor):
        raise PipelineContractError(f"{where} must return the loss as a Tensor, got "
                                    f"{type(loss).__name__}")
    if loss.numel() != 1 or not loss.is_floating_point():
        raise PipelineContractError(
            f"{where} must return a scalar floating-point loss (one number, e.g. a mean over "
            f"the batch), got a {loss.dtype} tensor of shape {list(loss.shape)}")
    if not loss.requires_grad:
        raise PipelineContractError(
            f"{where} returned a loss that does not depend on the model's output (it does not "
            "require grad): compute it from self(...)")
    return loss, extras


def check_training_step(module: Any, stages: Sequence[nn.Module], batch: Any,
                        args: tuple[Any, ...], kwargs: dict[str, Any], *, n: int, size: int,
                        context: Callable[[], AbstractContextManager[Any]],
                        check_forward: bool) -> None:
    """Run ``training_step`` once on the first micro-batch, in this process, and check it.

    The strategy calls it on every rank before the first pipeline step, with the whole model
    in each process, so that a mistake raises the same error on every rank before any
    communication instead of one rank failing inside the pipeline while the others wait.
    RNG states and module buffers are restored afterwards; logs are dropped.

    Args:
        module: The LightningModule.
        stages: Its stage modules (run in sequence, each on its weights' device).
        batch: The first training batch.
        args: The arguments Lightning gave the step (``batch`` first).
        kwargs: Its keyword arguments.
        n: Micro-batches per batch.
        size: The batch size.
        context: The precision's training context (autocast).
        check_forward: Also check that the module's own ``forward`` gives the stages' output
            (when it is not :class:`~lightning_plugin.PipelineMixin`'s).

    Raises:
        PipelineContractError: ``self(...)`` not called or called with other inputs, a loss
            that is not a scalar depending on the output, or a ``forward`` that is not the
            stages in sequence.
    """
    mb = split_batch(batch, n, size)[0]
    xs = pipeline_inputs_of(module, mb)
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    cuda = sorted({t.device.index or 0 for t in tensor_leaves(batch) if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=cuda), capture_logs(module):
            with context():
                out = run_chain(stages, xs)
                with redirect_forward(module, out, xs, "training_step") as r:
                    result = module.training_step(mb, *args[1:], **kwargs)
            if r.calls == 0:
                raise PipelineContractError(
                    "training_step never called self(...): under PipeOptimStrategy the model's "
                    "output comes from the pipeline through self(...) (the LightningModule's "
                    "forward); call self(x) instead of a submodule")
            extract_loss(result, "training_step")
            if check_forward:
                _check_forward(module, stages, xs, r.args, r.kwargs, context)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


@torch.no_grad()
def _check_forward(module: Any, stages: Sequence[nn.Module], xs: tuple[Tensor, ...],
                   args: Any, kwargs: Any,
                   context: Callable[[], AbstractContextManager[Any]]) -> None:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with context():
            want = tensor_leaves(module(*args, **kwargs))
            got = tensor_leaves(run_chain(stages, xs))
    finally:
        for m, mode in modes:
            m.training = mode
    same = len(want) == len(got) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5)
        for a, b in zip(want, got))
    if not same:
        raise PipelineContractError(
            f"{type(module).__name__}.forward(...) and the stages of pipeline_stages() run in "
            f"sequence give different outputs (shapes {[tuple(t.shape) for t in want]} and "
            f"{[tuple(t.shape) for t in got]}, or other values): under PipeOptimStrategy "
            "self(...) returns the stages' output, so forward must be the stages in sequence")


def call_hooks(trainer: Any, module: Any, name: str, *args: Any) -> None:
    """``name`` of every callback, then of the LightningModule, as Lightning calls them."""
    for cb in trainer.callbacks:
        getattr(cb, name)(trainer, module, *args)
    getattr(module, name)(*args)


# ---------------------------------------------------------------------------------------------
# self.log(...) reaches every rank
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricRef:
    """A ``torchmetrics.Metric`` that was logged: the LightningModule's attribute holding it."""

    path: str


@dataclass
class LogEntry:
    """One ``self.log(name, value, **kwargs)`` call, with ``kwargs`` as passed."""

    name: str
    value: Any
    kwargs: dict[str, Any]


def _metric_path(module: Any, value: Any, given: str | None) -> str:
    if given:
        return given
    for path, m in module.named_modules():
        if m is value:
            return path
    raise PipelineContractError(
        f"could not find the LightningModule attribute holding the logged "
        f"{type(value).__name__}: assign the metric to an attribute of the module")


def _portable(module: Any, value: Any, metric_attribute: str | None) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, (numbers.Number, bool)):
        return value
    if isinstance(value, Mapping):
        return {k: _portable(module, v, None) for k, v in value.items()}
    if isinstance(value, torch.nn.Module):  # a torchmetrics.Metric
        return MetricRef(_metric_path(module, value, metric_attribute))
    return value


class LogCapture:
    """Stands in for ``module.log``: records every call instead of logging it."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.entries: list[LogEntry] = []
        self._signature = inspect.signature(type(module).log)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        bound = self._signature.bind(self.module, *args, **kwargs)
        kw = dict(bound.arguments)
        kw.pop(next(iter(self._signature.parameters)))  # self
        name, value = kw.pop("name"), kw.pop("value")
        value = _portable(self.module, value, kw.get("metric_attribute"))
        if isinstance(value, MetricRef):
            kw["metric_attribute"] = value.path
        self.entries.append(LogEntry(str(name), value, kw))


@contextmanager
def capture_logs(module: Any) -> Iterator[LogCapture]:
    """Within the block, ``module.log`` (and so ``log_dict``) records instead of logging."""
    capture = LogCapture(module)
    with _instance_attribute(module, "log", capture):
        yield capture


def _mean(values: list[Any]) -> Any:
    if len(values) == 1 or any(isinstance(v, (MetricRef, Mapping)) for v in values):
        return values[-1]
    ts = [v if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.get_default_dtype())
          for v in values]
    dtype = ts[0].dtype if ts[0].is_floating_point() else torch.get_default_dtype()
    return torch.stack([t.to(dtype).reshape(()) for t in ts]).mean()


def merge_step_logs(per_rank: list[list[LogEntry]], last_rank: int) -> list[LogEntry]:
    """One entry per name from every rank's entries of one training batch.

    A name logged several times on a rank (once per micro-batch by ``training_step``, once per
    update by the optimizer hooks) gets the mean of its values, and the sum of the batch sizes
    given; a name logged on several ranks takes the values of the last stage's rank, else of
    the lowest rank that logged it.
    """
    order = [last_rank] + [r for r in range(len(per_rank)) if r != last_rank]
    claimed: dict[str, int] = {}
    grouped: dict[str, list[LogEntry]] = {}
    for r in order:
        for e in per_rank[r]:
            if claimed.setdefault(e.name, r) == r:
                grouped.setdefault(e.name, []).append(e)
    merged = []
    for name, entries in grouped.items():
        if any(isinstance(e.value, MetricRef) for e in entries):
            raise PipelineContractError(
                f"{name!r} was logged as a torchmetrics Metric object during training, which "
                "PipeOptimStrategy does not support (the metric's state would live on one rank "
                "only): log its value instead, e.g. self.log(name, metric(preds, target))")
        kwargs = dict(entries[0].kwargs)
        sizes = [e.kwargs.get("batch_size") for e in entries]
        if all(s is not None for s in sizes):
            kwargs["batch_size"] = int(sum(sizes))
        merged.append(LogEntry(name, _mean([e.value for e in entries]), kwargs))
    return merged


def replay_logs(module: Any, entries: list[LogEntry]) -> None:
    """``module.log(...)`` every entry, on this rank."""
    for e in entries:
        value = e.value
        if isinstance(value, MetricRef):
            value = module.get_submodule(value.path)
        elif isinstance(value, Tensor):
            value = value.to(module.device)
        elif isinstance(value, Mapping):
            value = {k: v.to(module.device) if isinstance(v, Tensor) else v
                     for k, v in value.items()}
        module.log(e.name, value, **e.kwargs)


# ---------------------------------------------------------------------------------------------
# Validation, test and predict steps
# ---------------------------------------------------------------------------------------------


def _portable_error(e: BaseException) -> BaseException:
    """``e`` if it pickles (to be raised on every rank), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


def evaluation_step(module: Any, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                    stages: Sequence[nn.Module], plan: Any, rank: int, root: Any, comm: Any
                    ) -> Any:
    """One ``validation_step`` / ``test_step`` / ``predict_step`` batch, on every rank.

    The batch goes through the stages (:func:`~lightning_plugin.evaluation.forward_only`); on
    the last stage's rank the module's step runs on the whole batch with ``self(...)``
    returning the output. Its logs, its return value, or the exception it raised, are
    broadcast: every rank logs the same values, returns the same result, or raises.

    Args:
        module: The LightningModule.
        hook: The step's name.
        args: The step's arguments (``batch`` first).
        kwargs: Its keyword arguments.
        stages: All stage modules.
        plan: The :class:`~lightning_plugin.PipelinePlan`.
        rank: This process's rank.
        root: Its device.
        comm: The device collectives use.
    """
    xs = pipeline_inputs_of(module, args[0])
    out = forward_only(stages, plan.placement, rank, xs if rank == plan.first_rank else None,
                       root=root, comm=comm)
    last = rank == plan.last_rank
    payload: dict[str, Any] = {}
    result: Any = None
    if last:
        try:
            with capture_logs(module) as captured, redirect_forward(module, out, xs, hook) as r:
                result = getattr(module, hook)(*args, **kwargs)
            if r.calls == 0:
                raise PipelineContractError(
                    f"{hook} never called self(...): under PipeOptimStrategy the model's output "
                    "comes from the pipeline through self(...); call self(x) instead of a "
                    "submodule")
            payload = {"logs": captured.entries, "result": to_cpu(result)}
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            if plan.num_ranks == 1:
                raise
            payload = {"error": _portable_error(e)}
    if plan.num_ranks > 1:
        payload = broadcast_object(payload if last else None, plan.last_rank)
    if "error" in payload:
        raise payload["error"]
    replay_logs(module, payload["logs"])
    if last:
        return result
    from lightning_utilities.core.apply_func import apply_to_collection

    return apply_to_collection(payload["result"], Tensor, lambda t: t.to(root))
