"""The two exceptions :class:`~lightning_plugin.PipeOptimStrategy` raises for a user's mistake."""

from __future__ import annotations

__all__ = ["PipeOptimConfigError", "PipelineContractError"]


class PipelineContractError(TypeError):
    """The LightningModule does not follow the pipeline contract (see ``docs/lightning.md``)."""


class PipeOptimConfigError(ValueError):
    """A Trainer / strategy configuration :class:`PipeOptimStrategy` cannot run."""
