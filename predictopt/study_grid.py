"""The grid of the convergence study (docs/study.md): ``python -m predictopt.study_grid``.

Runs every (setting, method, seed) missing from ``docs/results/lm_study.jsonl`` (two processes
at a time by default), so it resumes where it stopped; ``tools/gen_docs.py`` then rewrites the
tables and plots. ``--only STAGES:OPTIMIZER`` (``STAGES:OPTIMIZER@LR`` for a setting at another
rate than the default) restricts it to some settings.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .study import RunCache, run_grid, study_setting

#: Every method, in the settings at 8 stages.
ALL_METHODS: tuple[str, ...] = (
    "sequential", "pipedream", "pipeoptim", "nesterov-dl", "sequential-nesterov-dl",
    "qh-dl", "sequential-qh-dl", "pipeoptim-qh-dl",
    "pipeoptim-lean", "nesterov", "pipemare", "dc-asgd", "pipedream-dl",
    "pipeoptim-nesterov-dl", "spectrain", "pipeoptim-sc", "basis-rotation",
    "sequential-basis-rotation", "basis-rotation-dl", "sequential-basis-rotation-dl",
    "pipeoptim-basis-rotation-dl", "error-feedback", "pipeoptim-qh-dm-dl", "sequential-qh-dm-dl")
#: The methods at 4 and 16 stages (the reference, the paper baselines, the literature's
#: strongest and this project's candidate).
CORE_METHODS: tuple[str, ...] = ("sequential", "pipedream", "pipeoptim", "nesterov-dl",
                                 "nesterov", "pipemare", "dc-asgd")
#: The methods with Muon (those that convert the optimizer do not apply to it).
MUON_METHODS: tuple[str, ...] = ("sequential", "pipedream", "pipeoptim", "qh-dl",
                                 "sequential-qh-dl", "pipeoptim-qh-dl", "pipedream-dl",
                                 "pipemare", "dc-asgd", "error-feedback", "pipeoptim-qh-dm-dl",
                                 "sequential-qh-dm-dl")
#: The methods that decide the default (the references, the paper baselines, the candidates).
DECIDING_METHODS: tuple[str, ...] = ("sequential", "pipedream", "pipeoptim", "qh-dl",
                                     "sequential-qh-dl", "pipeoptim-qh-dl", "nesterov-dl",
                                     "pipeoptim-qh-dm-dl", "sequential-qh-dm-dl")
#: The methods at 4 and 16 stages first: the reference, the baseline, the candidates.
SCALE_METHODS: tuple[str, ...] = ("sequential", "pipedream", "pipeoptim", "qh-dl",
                                  "pipeoptim-qh-dl", "pipeoptim-qh-dm-dl")
#: Basis rotation with prediction and its twin, at 4 and 16 stages (AdamW only).
ROTATION_METHODS: tuple[str, ...] = ("sequential", "pipeoptim-basis-rotation-dl",
                                     "sequential-basis-rotation-dl")
#: The default's staleness-free twin at 4 and 16 stages (what its per-stage rates cost there).
TWIN_METHODS: tuple[str, ...] = ("sequential-qh-dl", "sequential-qh-dm-dl")
#: (stages, optimizer, methods), in the order they run (what decides the default first, so a
#: partial run is useful); methods a setting cannot run are skipped
#: (:func:`predictopt.study.applicable`); what is cached already is not run again.
PLAN: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (8, "adamw", DECIDING_METHODS), (8, "sgd", DECIDING_METHODS),
    (8, "muon", DECIDING_METHODS),
    (4, "adamw", SCALE_METHODS), (16, "adamw", SCALE_METHODS),
    (4, "sgd", SCALE_METHODS), (16, "sgd", SCALE_METHODS),
    (4, "muon", SCALE_METHODS), (16, "muon", SCALE_METHODS),
    (4, "adamw", ROTATION_METHODS), (16, "adamw", ROTATION_METHODS),
    (4, "sgd", TWIN_METHODS), (4, "muon", TWIN_METHODS), (4, "adamw", TWIN_METHODS),
    (16, "sgd", TWIN_METHODS), (16, "muon", TWIN_METHODS), (16, "adamw", TWIN_METHODS),
    (8, "adamw", ALL_METHODS), (8, "sgd", ALL_METHODS), (8, "muon", MUON_METHODS),
    (4, "adamw", CORE_METHODS), (4, "sgd", CORE_METHODS),
    (16, "adamw", CORE_METHODS), (16, "sgd", CORE_METHODS))
#: Issue 10's other measurements (AdamW at a lower rate, NAdam with beta1 = 0.99): the
#: reference, the baseline, pipeoptim and the default, run after the grid.
ANCHOR_METHODS: tuple[str, ...] = ("sequential", "pipedream", "pipeoptim", "pipeoptim-qh-dm-dl")
ANCHORS: tuple[tuple[int, str, float | None], ...] = ((4, "adamw", 1e-3), (8, "nadam", None))
SEEDS: tuple[int, ...] = (0, 1, 2)
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "lm_study.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="runs at a time (default: 2)")
    ap.add_argument("--only", action="append", default=None, metavar="STAGES:OPTIMIZER",
                    help="restrict to these settings (repeatable), e.g. 8:adamw or 4:adamw@0.001")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the run cache (JSON lines)")
    args = ap.parse_args(argv)
    cache = RunCache(args.results)
    plan = [(stages, opt, None, methods) for stages, opt, methods in PLAN]
    plan += [(stages, opt, lr, ANCHOR_METHODS) for stages, opt, lr in ANCHORS]
    for stages, opt, lr, methods in plan:
        label = f"{stages}:{opt}" + (f"@{lr:g}" if lr is not None else "")
        if args.only and label not in args.only:
            continue
        run_grid([replace(study_setting(stages, opt), lr=lr)], methods, SEEDS, cache,
                 processes=args.processes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
