"""How the worker processes start, and the checks run before they do."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["START_METHODS", "PrecheckLauncherMixin", "resolve_start_method"]

#: Accepted values of ``PipeOptimStrategy(start_method=...)``.
START_METHODS = ("auto", "spawn", "popen", "fork", "forkserver")


def _is_interactive() -> bool:
    main = sys.modules.get("__main__")
    return bool(hasattr(sys, "ps1") or sys.flags.interactive or main is None
                or not getattr(main, "__file__", None) or "ipykernel" in sys.modules)


def _under_pytest() -> bool:
    if "pytest" not in sys.modules:
        return False
    argv0 = sys.argv[0] if sys.argv else ""
    main_file = getattr(sys.modules.get("__main__"), "__file__", "") or ""
    return any("pytest" in s or "py.test" in s for s in (argv0, main_file))


def resolve_start_method(method: str) -> str:
    """``"auto"``: spawn under pytest, fork in notebooks and REPLs, otherwise ``"popen"``."""
    if method != "auto":
        return method
    if _under_pytest():
        return "spawn"
    if _is_interactive():
        return "fork" if sys.platform != "win32" else "spawn"
    return "popen"


class PrecheckLauncherMixin:
    """Runs the strategy's checks in the launching process before starting any worker."""

    _pipeoptim_strategy: Any

    def launch(self, function: Callable[..., Any], *args: Any, trainer: Any = None,
               **kwargs: Any) -> Any:
        if trainer is not None:
            model = args[0] if args else None
            if model is not None:
                self._pipeoptim_strategy._precheck(trainer, model)
        return super().launch(function, *args, trainer=trainer, **kwargs)  # type: ignore[misc]
