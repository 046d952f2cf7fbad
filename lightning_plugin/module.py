"""Ready-made steps for a LightningModule that is just a chain of stages.

Any LightningModule written for one device trains under
:class:`~lightning_plugin.PipeOptimStrategy` once it defines ``pipeline_stages()``; its own
steps run, with ``self(...)`` returning the pipeline's output. :class:`PipelineMixin` (and
:class:`PipelineModule`, a ``lightning.pytorch.LightningModule`` with it) is a shortcut for
the common case: define ``pipeline_stages()`` and ``pipeline_loss(output, target)`` (and,
optionally, ``pipeline_metrics``), and get ``forward`` (the stages in sequence) and the
``training_step`` / ``validation_step`` / ``test_step`` / ``predict_step`` of batches
``(x, y)``, on one device and under the strategy alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from .contract import default_pipeline_inputs

__all__ = ["PipelineMixin", "PipelineModule"]


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class PipelineMixin:
    """Defaults for a chain of stages; mix into a ``LightningModule`` (either package).

    Subclasses implement :meth:`pipeline_stages` and :meth:`pipeline_loss`. The steps log
    ``train_loss``, ``val_loss`` / ``val_<name>`` and ``test_loss`` / ``test_<name>`` (names
    from :meth:`pipeline_metrics`).
    """

    def pipeline_stages(self) -> Sequence[nn.Module]:
        """The model's stage modules, first stage first (registered submodules)."""
        raise NotImplementedError

    def pipeline_loss(self, output: Any, target: Tensor) -> Tensor:
        """The loss of a batch (a mean over its samples)."""
        raise NotImplementedError

    def pipeline_metrics(self, output: Any, target: Tensor) -> Mapping[str, Tensor]:
        """More values to log in validation and test (default none)."""
        return {}

    def pipeline_inputs(self, batch: Any) -> Any:
        """Stage 0's input: ``x`` of a batch ``(x, y)`` (or the batch, when it is a Tensor)."""
        return default_pipeline_inputs(batch)

    def forward(self, *inputs: Any) -> Any:
        """Run the stages in sequence (under the strategy: the pipeline's output)."""
        out: tuple[Any, ...] = inputs
        for stage in self.pipeline_stages():
            out = _as_tuple(stage(*out))
        return out[0] if len(out) == 1 else out

    def _step(self, batch: Any, prefix: str) -> Tensor:
        x, y = batch
        out = self(*_as_tuple(x))
        loss = self.pipeline_loss(out, y)
        self.log(f"{prefix}_loss", loss, prog_bar=True)  # type: ignore[attr-defined]
        if prefix != "train":
            for name, value in dict(self.pipeline_metrics(out, y)).items():
                self.log(f"{prefix}_{name}", value)  # type: ignore[attr-defined]
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """``pipeline_loss`` of the batch, logged as ``train_loss``."""
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logs ``val_loss`` and ``val_<name>`` of :meth:`pipeline_metrics`."""
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logs ``test_loss`` and ``test_<name>`` of :meth:`pipeline_metrics`."""
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """The model's output for the batch's input."""
        return self(*_as_tuple(self.pipeline_inputs(batch)))


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
