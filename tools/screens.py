"""One-seed screening runs of the study (docs/study.md), kept in docs/results/lm_screens.jsonl.

A screen is a variant of a method that is not worth a registry entry: it is defined here, run on
one (setting, seed) of the study's grid, and its record is stored with the variant's
description and its group (the docs generate one table per group: ``tools/gen_docs.py``).

    python tools/screens.py momentum-horizon     # runs what is missing of that group
    python tools/screens.py --list               # the groups and their variants

Runs are deterministic (the same numbers wherever the CPU model, its vector instruction set and
the torch build agree: each record names them, ``predictopt.study.machine``) and
independent, two at a time by default.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCREENS = ROOT / "docs" / "results" / "lm_screens.jsonl"


def variants() -> dict[str, dict[str, Any]]:
    """name -> {"method": Method, "variant": description, "group": group, "runs": [(stages,
    optimizer, seed), ...]}."""
    from predictopt.pipeline import get_method
    from predictopt.pipeline.methods import Method
    from predictopt.pipeline.transforms import (
        DelayScaledLR,
        DelayScaledMomentum,
        QuasiHyperbolicMomentum,
    )

    class AdamPartsHorizon(DelayScaledMomentum):
        """The horizon on the Adam parts of a Muon stage too (the default's horizon until
        2026-12-07; now a stage with Muon keeps every part's momentum)."""

        def group_values(self, ctx, optimizer):  # type: ignore[no-untyped-def]
            from predictopt.pipeline.transforms import _parts

            out: list[dict[str, Any]] = []
            for part in _parts(optimizer):
                v = None if self._kind(part) == "muon" else super().group_values(ctx, part)
                out += v or [{} for _ in part.param_groups]
            return out

    qh = QuasiHyperbolicMomentum(0.5, strict=False)
    dm = DelayScaledMomentum(strict=False)
    dm_all = DelayScaledMomentum(strict=False, muon=True)
    group = "momentum-horizon"
    return {
        "pipeoptim-dm": {
            "method": get_method("pipeoptim-dm"), "group": group,
            "variant": "predicted forwards with the momentum horizon times (1 + D) "
                       "(`pipeoptim-dm`)",
            "runs": [(8, "sgd", 2), (8, "adamw", 1)]},
        "pipeoptim-dm+muon": {
            "method": Method("pipeoptim-dm+muon", forward="predicted", transforms=(dm_all,)),
            "group": group,
            "variant": "`pipeoptim-dm` with Muon's own momentum scaled too (`muon=True`)",
            "runs": [(8, "muon", 1)]},
        "pipeoptim-dm-dl": {
            "method": Method("pipeoptim-dm-dl", forward="predicted",
                             transforms=(dm, DelayScaledLR())),
            "group": group,
            "variant": "`pipeoptim-dm` with the learning rate / (1 + D)",
            "runs": [(8, "sgd", 2)]},
        "pipeoptim-qh-dm": {
            "method": Method("pipeoptim-qh-dm", forward="predicted", transforms=(dm, qh)),
            "group": group,
            "variant": "`pipeoptim-qh-dm-dl` without the learning rate / (1 + D)",
            "runs": [(8, "sgd", 2), (8, "adamw", 1)]},
        "pipeoptim-qh-dm-dl+muon": {
            "method": Method("pipeoptim-qh-dm-dl+muon", forward="predicted",
                             transforms=(dm_all, qh, DelayScaledLR())),
            "group": group,
            "variant": "`pipeoptim-qh-dm-dl` with Muon's own momentum scaled too "
                       "(`muon=True`)",
            "runs": [(8, "muon", 1)]},
        "sequential-dm": {
            "method": Method("sequential-dm", staleness_free=True,
                             transforms=(DelayScaledMomentum(delays="1f1b", strict=False),)),
            "group": group,
            "variant": "staleness-free twin of `pipeoptim-dm` (the per-stage momentum of 1F1B's "
                       "delays, no pipeline)",
            "runs": [(8, "sgd", 2)]},
        "sequential-dl": {
            "method": Method("sequential-dl", staleness_free=True,
                             transforms=(DelayScaledLR(delays="1f1b"),)),
            "group": "sgd-twin",
            "variant": "the learning rate / (1 + D) of 1F1B's delays alone, without a pipeline",
            "runs": [(8, "sgd", 0), (8, "sgd", 1), (8, "sgd", 2)]},
        "pipeoptim-qh-dm-dl-adam-parts": {
            "method": Method("pipeoptim-qh-dm-dl-adam-parts", forward="predicted",
                             transforms=(AdamPartsHorizon(strict=False), qh, DelayScaledLR())),
            "group": "muon-horizon",
            "variant": "`pipeoptim-qh-dm-dl` with the horizon on the Adam parts of Muon stages",
            "runs": [(s, "muon", e) for s in (4, 8, 16) for e in (0, 1, 2)]},
        "sequential-qh-dm-dl-adam-parts": {
            "method": Method("sequential-qh-dm-dl-adam-parts", staleness_free=True,
                             transforms=(AdamPartsHorizon(delays="1f1b", strict=False), qh,
                                         DelayScaledLR(delays="1f1b"))),
            "group": "muon-horizon",
            "variant": "its staleness-free twin",
            "runs": [(s, "muon", e) for s in (4, 8, 16) for e in (0, 1, 2)]},
        "pipeoptim-qh-dm2-dl": {
            "method": Method("pipeoptim-qh-dm2-dl", forward="predicted",
                             transforms=(DelayScaledMomentum(power=2.0, strict=False), qh,
                                         DelayScaledLR())),
            "group": "momentum-horizon",
            "variant": "`pipeoptim-qh-dm-dl` with the horizon times (1 + D)^2",
            "runs": [(8, "sgd", 2), (8, "adamw", 1)]},
        "pipeoptim-qh-dm-dl0.5": {
            "method": Method("pipeoptim-qh-dm-dl0.5", forward="predicted",
                             transforms=(dm, qh, DelayScaledLR(power=0.5))),
            "group": "sgd-rate",
            "variant": "`pipeoptim-qh-dm-dl` with the learning rate / (1 + D)^0.5",
            "runs": [(8, "sgd", 2), (8, "adamw", 1)]},
        "sequential-qh-dm-dl0.5": {
            "method": Method("sequential-qh-dm-dl0.5", staleness_free=True,
                             transforms=(DelayScaledMomentum(delays="1f1b", strict=False), qh,
                                         DelayScaledLR(power=0.5, delays="1f1b"))),
            "group": "sgd-rate",
            "variant": "staleness-free twin of `pipeoptim-qh-dm-dl` with the learning rate / "
                       "(1 + D)^0.5",
            "runs": [(8, "sgd", 2)]},
    }


def _work(job: tuple[str, int, str, int]) -> dict[str, Any]:
    import torch

    from predictopt.study import run_lm, study_setting

    torch.set_num_threads(1)
    name, stages, opt, seed = job
    v = variants()[name]
    r = run_lm(v["method"], study_setting(stages, opt), seed)
    r.update(method=name, variant=v["variant"], group=v["group"])
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("groups", nargs="*", help="groups to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the groups and variants")
    ap.add_argument("--processes", type=int, default=2, help="runs at a time (default: 2)")
    args = ap.parse_args(argv)
    vs = variants()
    if args.list:
        for name, v in vs.items():
            print(f"{v['group']}: {name}: {v['variant']} {v['runs']}")
        return 0
    done = set()
    if SCREENS.exists():
        for line in SCREENS.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["method"], r["config"]["stages"], r["config"]["optimizer"],
                          r["seed"]))
    jobs = [(n, s, o, e) for n, v in vs.items() if not args.groups or v["group"] in args.groups
            for s, o, e in v["runs"] if (n, s, o, e) not in done]
    print(f"{len(jobs)} runs to do", flush=True)
    with mp.get_context("spawn").Pool(max(1, args.processes)) as pool:
        for r in pool.imap_unordered(_work, jobs):
            with SCREENS.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{r['method']} {r['config']['stages']} stages {r['config']['optimizer']} "
                  f"seed {r['seed']}: {r['final_loss']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
