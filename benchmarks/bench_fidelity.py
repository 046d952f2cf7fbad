"""Fidelity ratio of every ``torch.optim`` configuration's prediction rule, over seeds.

For each configuration, `predictopt.fidelity.fidelity_ratios` trains the small digits MLP
with minibatch noise and measures, at horizon ``s``,
``rho(s) = mean_t ||w_hat_t(s) - w_{t+s}|| / mean_t ||w_t - w_{t+s}||``
(below 1: the prediction lands closer to the future weights than the stale weights do).
Each configuration runs with its default rule; the optimizers whose state holds no smoothed
direction also run with ``rule="last-update"`` (repeat the last update, the research code's
generic rule) to show why the default rule smooths. Every row is measured plain and with
``calibrate=True`` (calibrated prediction).

Run: ``python benchmarks/bench_fidelity.py [--seeds 3] [--updates 300]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.optim import Optimizer

from predictopt.fidelity import fidelity_ratios
from predictopt.rules import get_rule

try:  # python -m benchmarks.bench_fidelity / benchmarks.run_all
    from benchmarks.bench_predict import machine_info, machine_line, write_report
except ImportError:  # python benchmarks/bench_fidelity.py
    from bench_predict import machine_info, machine_line, write_report  # type: ignore[no-redef]

RESULTS = Path(__file__).resolve().parent / "results"
O = torch.optim
Factory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]

# name -> (label with the hyper-parameters, factory)
CONFIGS: dict[str, tuple[str, Factory]] = {
    "sgd": ("SGD lr=0.05", lambda p: O.SGD(p, lr=0.05)),
    "sgd-momentum": ("SGD lr=0.01 momentum=0.9", lambda p: O.SGD(p, lr=0.01, momentum=0.9)),
    "sgd-nesterov": ("SGD lr=0.01 momentum=0.9 nesterov",
                     lambda p: O.SGD(p, lr=0.01, momentum=0.9, nesterov=True)),
    "adam": ("Adam lr=1e-3", lambda p: O.Adam(p, lr=1e-3)),
    "adam-amsgrad": ("Adam lr=1e-3 amsgrad", lambda p: O.Adam(p, lr=1e-3, amsgrad=True)),
    "adamw": ("AdamW lr=1e-3 wd=0.01", lambda p: O.AdamW(p, lr=1e-3, weight_decay=0.01)),
    "adamax": ("Adamax lr=2e-3", lambda p: O.Adamax(p, lr=2e-3)),
    "nadam": ("NAdam lr=2e-3", lambda p: O.NAdam(p, lr=2e-3)),
    "radam": ("RAdam lr=1e-3", lambda p: O.RAdam(p, lr=1e-3)),
    "rmsprop": ("RMSprop lr=1e-3", lambda p: O.RMSprop(p, lr=1e-3)),
    "rmsprop-centered": ("RMSprop lr=1e-3 centered",
                         lambda p: O.RMSprop(p, lr=1e-3, centered=True)),
    "rmsprop-momentum": ("RMSprop lr=1e-3 momentum=0.9",
                         lambda p: O.RMSprop(p, lr=1e-3, momentum=0.9)),
    "adagrad": ("Adagrad lr=0.01", lambda p: O.Adagrad(p, lr=0.01)),
    "adadelta": ("Adadelta lr=1.0", lambda p: O.Adadelta(p, lr=1.0)),
    "rprop": ("Rprop lr=0.01", lambda p: O.Rprop(p, lr=0.01)),
    "asgd": ("ASGD lr=0.01", lambda p: O.ASGD(p, lr=0.01)),
}
#: Optimizers whose state has no smoothed direction: also measured with "last-update".
NOISY = ("sgd", "rmsprop", "nadam", "adagrad", "adadelta")


def default_rule_name(factory: Factory) -> str:
    """The name of the rule ``PredictiveOptimizer`` picks by default for this configuration."""
    opt = factory([torch.nn.Parameter(torch.zeros(1))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rule = get_rule(None, opt)
    name = rule.name
    if name in ("sgd", "rmsprop") and rule.observes(opt.param_groups[0]):
        name += " (observed)"
    return name


def run_config(factory: Factory, rule: str | None, seeds: Iterable[int],
               steps: tuple[int, ...], updates: int, calibrate: bool = False
               ) -> dict[int, list[float]]:
    """``{s: [rho(s) for each seed]}``."""
    per_s: dict[int, list[float]] = {s: [] for s in steps}
    for seed in seeds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no rule for Rprop/ASGD": expected, reported
            ratios = fidelity_ratios(factory, steps=steps, updates=updates, seed=seed, rule=rule,
                                     calibrate=calibrate)
        for s in steps:
            per_s[s].append(ratios[s])
    return per_s


def summarize(per_s: dict[int, list[float]]) -> dict[str, dict[str, object]]:
    return {str(s): {"mean": statistics.fmean(v), "max": max(v), "per_seed": v}
            for s, v in per_s.items()}


def run_row(name: str, rule: str | None, calibrate: bool, seeds: list[int],
            steps: tuple[int, ...], updates: int) -> dict:
    label, factory = CONFIGS[name]
    t0 = time.perf_counter()
    per_s = run_config(factory, rule, seeds, steps, updates, calibrate)
    rule_name = rule or default_rule_name(factory)
    return {
        "config": name,
        "label": label,
        "rule": rule_name + (" + calibrate" if calibrate else ""),
        "calibrate": calibrate,
        "ratios": summarize(per_s),
        "any_ge_1": any(x >= 1.0 for v in per_s.values() for x in v),
        "seconds": time.perf_counter() - t0,
    }


def run_all(seeds: list[int], steps: tuple[int, ...], updates: int) -> list[dict]:
    """Every configuration with its default rule, plain and calibrated (``calibrate=True``,
    next to each other); then ``last-update`` for the noisy ones, plain and calibrated."""
    rows = []
    for name in CONFIGS:
        rows += [run_row(name, None, cal, seeds, steps, updates) for cal in (False, True)]
    for name in NOISY:
        rows += [run_row(name, "last-update", cal, seeds, steps, updates) for cal in (False, True)]
    return rows


def markdown_table(rows: list[dict], steps: tuple[int, ...]) -> str:
    cols = " | ".join(f"s={s} mean (max)" for s in steps)
    lines = [f"| optimizer | rule | {cols} | any seed >= 1 |",
             "|" + "---|" * (len(steps) + 3)]
    for r in rows:
        cells = " | ".join(
            f"{r['ratios'][str(s)]['mean']:.3f} ({r['ratios'][str(s)]['max']:.3f})"
            for s in steps
        )
        flag = "**YES**" if r["any_ge_1"] else "no"
        lines.append(f"| {r['label']} | {r['rule']} | {cells} | {flag} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0..n-1)")
    ap.add_argument("--updates", type=int, default=300, help="optimizer updates per run")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="horizons s")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (the model is tiny: more threads only add contention)")
    ap.add_argument("--out", type=Path, default=RESULTS / "fidelity.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    steps = tuple(args.steps)
    seeds = list(range(args.seeds))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        info = machine_info(torch.device("cpu"))
        t0 = time.perf_counter()
        rows = run_all(seeds, steps, args.updates)
        info["seconds"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    print(f"# Fidelity ratio rho(s) over seeds {seeds}, {args.updates} updates, digits MLP "
          f"(mean over seeds, max in parentheses; < 1 means the prediction helps)")
    print(f"{machine_line(info)}; {info['seconds']:.0f} s")
    print()
    print(markdown_table(rows, steps))
    bad = [f"{r['label']} [{r['rule']}]" for r in rows if r["any_ge_1"]]
    print("\nratio >= 1 for some seed: " + (", ".join(bad) if bad else "none"))
    report = {"machine": info, "config": {"seeds": seeds, "steps": list(steps),
                                          "updates": args.updates}, "results": rows}
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
