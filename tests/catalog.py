"""Every optimizer configuration the shared suite runs (optax ``_common_test`` style).

The second field says whether the prediction is exact under a constant gradient (up to rounding,
``testing.check_constant_gradient_exact``): plain SGD, Adam and AdamW (also AMSGrad and
``maximize``), Adamax, Adafactor and Muon without momentum are; momentum SGD, NAdam, RAdam (exact
for one step only), RMSprop, Adagrad, Adadelta, Rprop, ASGD are not (their update still drifts),
nor is Muon with momentum (its Newton-Schulz iteration rounds a differently scaled input in
bfloat16: see ``tests/test_robustness_core.py`` for the bound that holds).
"""

from __future__ import annotations

import torch

O = torch.optim

# name -> (factory(params, lr), prediction exact under a constant gradient)
OPTIMIZERS = {
    "sgd": (lambda p, lr: O.SGD(p, lr=lr), True),
    "sgd-wd": (lambda p, lr: O.SGD(p, lr=lr, weight_decay=0.01), False),
    "sgd-momentum": (lambda p, lr: O.SGD(p, lr=lr, momentum=0.9), False),
    "sgd-dampening": (lambda p, lr: O.SGD(p, lr=lr, momentum=0.9, dampening=0.5), False),
    "sgd-nesterov": (lambda p, lr: O.SGD(p, lr=lr, momentum=0.9, nesterov=True), False),
    "sgd-maximize": (lambda p, lr: O.SGD(p, lr=lr, momentum=0.5, maximize=True), False),
    "adam": (lambda p, lr: O.Adam(p, lr=lr), True),
    "adam-l2": (lambda p, lr: O.Adam(p, lr=lr, weight_decay=0.01), False),
    "adam-amsgrad": (lambda p, lr: O.Adam(p, lr=lr, amsgrad=True, eps=1e-6), True),
    "adam-maximize": (lambda p, lr: O.Adam(p, lr=lr, maximize=True), True),
    "adamw": (lambda p, lr: O.AdamW(p, lr=lr, weight_decay=0.1), True),
    "adamw-amsgrad": (lambda p, lr: O.AdamW(p, lr=lr, weight_decay=0.05, amsgrad=True), True),
    "adamax": (lambda p, lr: O.Adamax(p, lr=lr), True),
    "nadam": (lambda p, lr: O.NAdam(p, lr=lr), False),
    "nadam-decoupled": (lambda p, lr: O.NAdam(p, lr=lr, weight_decay=0.01,
                                              decoupled_weight_decay=True), False),
    "radam": (lambda p, lr: O.RAdam(p, lr=lr), False),
    "radam-decoupled": (lambda p, lr: O.RAdam(p, lr=lr, weight_decay=0.01,
                                              decoupled_weight_decay=True), False),
    "rmsprop": (lambda p, lr: O.RMSprop(p, lr=lr), False),
    "rmsprop-centered": (lambda p, lr: O.RMSprop(p, lr=lr, centered=True), False),
    "rmsprop-momentum": (lambda p, lr: O.RMSprop(p, lr=lr, momentum=0.9, centered=True), False),
    "rmsprop-maximize": (lambda p, lr: O.RMSprop(p, lr=lr, momentum=0.5, maximize=True), False),
    "rmsprop-centered-maximize": (lambda p, lr: O.RMSprop(p, lr=lr, centered=True,
                                                          maximize=True), False),
    "adamax-maximize": (lambda p, lr: O.Adamax(p, lr=lr, maximize=True), True),
    "nadam-maximize": (lambda p, lr: O.NAdam(p, lr=lr, maximize=True), False),
    "sgd-plain-maximize": (lambda p, lr: O.SGD(p, lr=lr, maximize=True), True),
    "adagrad": (lambda p, lr: O.Adagrad(p, lr=lr), False),
    "adadelta": (lambda p, lr: O.Adadelta(p, lr=lr), False),
    "rprop": (lambda p, lr: O.Rprop(p, lr=lr), False),
    "asgd": (lambda p, lr: O.ASGD(p, lr=lr), False),
    "muon": (lambda p, lr: O.Muon(p, lr=lr), False),
    "muon-plain": (lambda p, lr: O.Muon(p, lr=lr, nesterov=False, weight_decay=0.0,
                                        adjust_lr_fn="match_rms_adamw"), False),
    "muon-sgd": (lambda p, lr: O.Muon(p, lr=lr, momentum=0.0), True),
    "adafactor": (lambda p, lr: O.Adafactor(p, lr=lr), True),
    "adafactor-wd": (lambda p, lr: O.Adafactor(p, lr=lr, weight_decay=0.1), True),
    "adafactor-maximize": (lambda p, lr: O.Adafactor(p, lr=lr, maximize=True, d=2.0), True),
    "adafactor-foreach": (lambda p, lr: O.Adafactor(p, lr=lr, foreach=True, eps=(1e-6, 1e-3)),
                          True),
}

#: Optimizers that accept matrices only (the suite draws 2-D shapes for them).
MATRIX_ONLY = {"muon", "muon-plain", "muon-sgd"}
