"""predictopt: weight prediction that makes asynchronous pipeline training converge like
synchronous training.

Public API:

- :class:`PredictiveOptimizer` wraps any ``torch.optim`` optimizer and predicts the weights
  ``steps`` updates ahead from the optimizer's own state, with bit-exact restore.
- :func:`predict` returns the predicted value of every parameter without changing anything.
- :func:`register_rule`, :func:`get_rule`, :func:`available_rules` and the rule classes in
  :mod:`predictopt.rules` let users add rules for their own optimizers.
"""

from .optimizer import PredictiveOptimizer
from .prediction import coefficients, predict
from .rules import (
    AdafactorRule,
    AdamaxRule,
    AdamRule,
    MuonRule,
    NAdamRule,
    ObservedUpdateRule,
    PredictionRule,
    RAdamRule,
    RMSpropRule,
    SGDRule,
    available_rules,
    get_rule,
    register_rule,
)

__version__ = "0.1.0"

__all__ = [
    "PredictiveOptimizer",
    "predict",
    "coefficients",
    "PredictionRule",
    "ObservedUpdateRule",
    "SGDRule",
    "AdamRule",
    "AdamaxRule",
    "NAdamRule",
    "RAdamRule",
    "RMSpropRule",
    "MuonRule",
    "AdafactorRule",
    "register_rule",
    "get_rule",
    "available_rules",
]
