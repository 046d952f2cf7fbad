"""Trainer and DataLoader settings the strategy cannot run, rejected with what to do."""

from __future__ import annotations

from typing import Any

from .errors import PipelineContractError, PipeOptimConfigError

__all__ = ["PRECISIONS", "check_train_loader", "check_trainer"]

#: The ``Trainer(precision=...)`` values the strategy runs.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


def check_trainer(api: Any, trainer: Any, model: Any, plugin: Any, *,
                  sync_batchnorm: bool) -> None:
    """Reject what the pipeline cannot run (in the launching process, and in every worker).

    Raises:
        PipeOptimConfigError: manual optimization, an overridden ``optimizer_step``,
            ``sync_batchnorm``, or a precision other than :data:`PRECISIONS`.
        PipelineContractError: no ``training_step``.
    """
    if trainer.state.fn == api.TrainerFn.FITTING:
        if not model.automatic_optimization:
            raise PipeOptimConfigError(
                "manual optimization (automatic_optimization = False) is not supported: "
                "the pipeline stages step their optimizers themselves inside every batch; "
                "keep automatic optimization (the default)")
        if not api.is_overridden("training_step", model):
            raise PipelineContractError(f"{type(model).__name__} must define training_step")
        if api.is_overridden("optimizer_step", model):
            raise PipeOptimConfigError(
                f"{type(model).__name__} overrides optimizer_step, which is not supported: "
                "every stage steps its own optimizer inside the pipeline; use an LR "
                "scheduler (e.g. LambdaLR with interval='step') for a warm-up")
    if sync_batchnorm:
        raise PipeOptimConfigError(
            "sync_batchnorm=True is not supported: a pipeline has no data-parallel replicas "
            "to synchronise batch statistics with; remove sync_batchnorm")
    precision = str(getattr(plugin, "precision", None))
    if precision not in PRECISIONS or type(plugin) not in (api.Precision, api.MixedPrecision):
        raise PipeOptimConfigError(
            f"precision={precision!r} ({type(plugin).__name__}) is not supported by "
            f"PipeOptimStrategy: use precision= one of {', '.join(PRECISIONS)}")


def check_train_loader(trainer: Any, n_microbatches: int) -> None:
    """Every training batch must have the same size, a multiple of ``n_microbatches``.

    Raises:
        PipeOptimConfigError: another batch size, or an incomplete last batch.
    """
    dl = trainer.train_dataloader
    bs = getattr(dl, "batch_size", None)
    if not isinstance(bs, int):
        return
    if bs % n_microbatches:
        raise PipeOptimConfigError(
            f"the training DataLoader's batch_size ({bs}) must be a multiple of "
            f"n_microbatches ({n_microbatches})")
    try:
        samples, batches = len(dl.sampler), len(dl)
    except TypeError:
        return
    if not dl.drop_last and samples % bs and trainer.num_training_batches >= batches:
        raise PipeOptimConfigError(
            f"the training DataLoader's last batch is incomplete ({samples % bs} of {bs} "
            "samples) but the pipeline needs equal batches: set drop_last=True")
