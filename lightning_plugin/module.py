"""The pipeline contract of a LightningModule, and a base class that implements its defaults.

A LightningModule trained with :class:`~lightning_plugin.PipeOptimStrategy` provides

* ``pipeline_stages() -> Sequence[nn.Module]``: its model as consecutive stage modules
  (stage ``k``'s output, a Tensor or a tuple of Tensors, is stage ``k+1``'s input; stage 0
  gets ``x``, or ``*x`` when ``x`` is a tuple). They must be registered submodules (e.g. an
  ``nn.ModuleList`` attribute), disjoint, without tied weights, and the same objects at every
  call;
* ``pipeline_loss(output, target) -> Tensor``: the loss of one micro-batch (a mean over its
  samples), computed on the last stage;
* optionally ``pipeline_metrics(output, target) -> Mapping[str, Tensor]``: more scalars logged
  by validation and test as ``val_<name>`` / ``test_<name>``;
* ``configure_optimizers`` as usual (one optimizer over the stages' parameters, optional LR
  schedulers), and batches ``(x, y)``.

:class:`PipelineMixin` adds ``forward`` (the stages in sequence) and the ``training_step`` /
``validation_step`` / ``test_step`` Lightning requires: they are *not* called under
``PipeOptimStrategy`` (the pipeline runs the stages), but let the same module train on one
device with any other strategy, which is handy as a reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

__all__ = ["PipelineMixin", "PipelineModule"]


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class PipelineMixin:
    """Defaults of the pipeline contract; mix into a ``LightningModule`` (either package).

    Subclasses implement :meth:`pipeline_stages` and :meth:`pipeline_loss`; ``training_step``,
    ``validation_step`` and ``test_step`` log ``train_loss`` / ``val_loss`` / ``test_loss``
    like the strategy does.
    """

    def pipeline_stages(self) -> Sequence[nn.Module]:
        """The model's stage modules, first stage first (registered submodules)."""
        raise NotImplementedError

    def pipeline_loss(self, output: Any, target: Tensor) -> Tensor:
        """The loss of one micro-batch (a mean over its samples)."""
        raise NotImplementedError

    def forward(self, *inputs: Any) -> Any:
        """Run the stages in sequence (one device)."""
        out: tuple[Any, ...] = inputs
        for stage in self.pipeline_stages():
            out = _as_tuple(stage(*out))
        return out[0] if len(out) == 1 else out

    def _step(self, batch: Any, prefix: str) -> Tensor:
        x, y = batch
        loss = self.pipeline_loss(self(*_as_tuple(x)), y)
        self.log(f"{prefix}_loss", loss, prog_bar=True)  # type: ignore[attr-defined]
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One-device training step (not called under ``PipeOptimStrategy``)."""
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One-device validation step (under the strategy, the pipeline logs ``val_loss``)."""
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One-device test step (under the strategy, the pipeline logs ``test_loss``)."""
        return self._step(batch, "test")


class PipelineModule(PipelineMixin, pl.LightningModule):
    """A ``lightning.pytorch.LightningModule`` with the :class:`PipelineMixin` defaults.

    Example::

        class Net(PipelineModule):
            def __init__(self):
                super().__init__()
                self.stages = nn.ModuleList(predictopt.data.mlp_stages(64, 64, 10, 4))

            def pipeline_stages(self):
                return self.stages

            def pipeline_loss(self, output, target):
                return F.cross_entropy(output, target)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)
    """
