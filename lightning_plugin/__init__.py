"""Lightning integration of predictopt's asynchronous pipeline training.

``import lightning_plugin`` registers :class:`PipeOptimStrategy` with Lightning under
``"pipeoptim"`` and the variants of :attr:`PipeOptimStrategy.REGISTERED`
(``"pipeoptim_spawn"``, ``"pipeoptim_popen"``, ``"pipeoptim_notebook"``,
``"pipeoptim_gpipe"``, ``"pipeoptim_1f1b"``, ``"pipeoptim_interleaved1f1b"``,
``"pipeoptim_loopedbfs"``, ``"pipeoptim_interleavedzb"``, ``"pipeoptim_zbv"``,
``"pipeoptim_dualpipev"``, ``"pipeoptim_bitpipe"``), for ``lightning.pytorch`` and, when it
is installed, for ``pytorch_lightning`` (whose class is :class:`PLPipeOptimStrategy`)::

    import lightning as L
    import lightning_plugin

    trainer = L.Trainer(strategy="pipeoptim", accelerator="cpu", devices=4, max_epochs=3)
    trainer.fit(MyPipelinedModule(), datamodule)

See ``docs/lightning.md``.
"""

from __future__ import annotations

import importlib.util

from .checkpoint import CHECKPOINT_KEY
from .errors import PipelineContractError, PipeOptimConfigError
from .module import PipelineMixin, PipelineModule
from .plan import PipelinePlan
from .strategy import PipeOptimStrategy

__all__ = [
    "CHECKPOINT_KEY",
    "PLPipeOptimStrategy",
    "PipeOptimConfigError",
    "PipeOptimStrategy",
    "PipelineContractError",
    "PipelineMixin",
    "PipelineModule",
    "PipelinePlan",
    "registered_names",
]

PLPipeOptimStrategy: type | None = None
if importlib.util.find_spec("pytorch_lightning") is not None:
    from ._pl import PipeOptimStrategy as PLPipeOptimStrategy  # noqa: F811


def registered_names() -> list[str]:
    """The strategy names ``import lightning_plugin`` registers."""
    return [name for name, _, _ in PipeOptimStrategy.REGISTERED]
