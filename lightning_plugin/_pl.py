"""``PipeOptimStrategy`` for the standalone ``pytorch_lightning`` package.

The same strategy as :class:`lightning_plugin.PipeOptimStrategy`, built on
``pytorch_lightning.strategies.DDPStrategy``, and registered under the same names in
``pytorch_lightning.strategies.StrategyRegistry`` when this module is imported (which
``import lightning_plugin`` does whenever ``pytorch_lightning`` is installed).
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry

from ._compat import make_api
from .launch import PrecheckLauncherMixin
from .mixin import PipeOptimStrategyMixin
from .strategy import PipeOptimStrategy as _LightningStrategy

__all__ = ["PipeOptimStrategy"]

_API = make_api("pytorch_lightning")


class _SpawnLauncher(PrecheckLauncherMixin, _API.SpawnLauncher):
    def __init__(self, strategy: Any, start_method: str = "spawn") -> None:
        super().__init__(strategy, start_method=start_method)
        self._pipeoptim_strategy = strategy


class _ScriptLauncher(PrecheckLauncherMixin, _API.ScriptLauncher):
    def __init__(self, strategy: Any, cluster_environment: Any, num_processes: int,
                 num_nodes: int) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._pipeoptim_strategy = strategy


class PipeOptimStrategy(PipeOptimStrategyMixin, DDPStrategy):
    __doc__ = _LightningStrategy.__doc__

    _api = _API
    _spawn_launcher_cls = _SpawnLauncher
    _script_launcher_cls = _ScriptLauncher


PipeOptimStrategy.register_strategies(StrategyRegistry)
