"""One-seed screening runs of the study (docs/study.md), kept in docs/results/lm_screens.jsonl.

A screen is a variant of a method that is not worth a registry entry: it is defined here, run on
one (setting, seed) of the study's grid, and its record is stored with the variant's
description and its group (the docs generate one table per group: ``tools/gen_docs.py``).

    python tools/screens.py momentum-horizon     # runs what is missing of that group
    python tools/screens.py --list               # the groups and their variants
    python tools/screens.py --verify sgd-default # rerun recorded runs: reproduced bit for bit?

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
    optimizer, seed), ...]} (``optimizer``: a name of ``predictopt.study.LM_OPTIMIZERS``, with
    ``@LR`` for a rate other than the study's default)."""
    from predictopt.pipeline import get_method
    from predictopt.pipeline.methods import Method
    from predictopt.pipeline.transforms import (
        DelayCompensation,
        DelayScaledLR,
        DelayScaledMomentum,
        ErrorFeedback,
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

    # the fresh-gradient term alone at the rate / (1 + D) with Adam, the prediction uncalibrated
    # (the default's split before its calibration; (1 + D) ** -1.0 == 1 / (1 + D) bit for bit)
    adam_split = QuasiHyperbolicMomentum(0.5, strict=False, adam_fresh_power=1.0)

    class SplitUpTo(QuasiHyperbolicMomentum):
        """The fresh-gradient term alone / (1 + D) where D <= 3, nothing here where D > 3."""

        def _fresh_factor(self, ctx, kind="sgd"):  # type: ignore[no-untyped-def]
            return 1.0 / (1.0 + ctx.delay) if ctx.delay <= 3 else 1.0

    class WholeAbove(DelayScaledLR):
        """The whole update / (1 + D) where D > 3."""

        def lr_scale(self, ctx, updates):  # type: ignore[no-untyped-def]
            return 1.0 / (1.0 + ctx.delay) if ctx.delay > 3 else 1.0

    qh = QuasiHyperbolicMomentum(0.5, strict=False)
    qh_sgd_fresh = QuasiHyperbolicMomentum(0.5, strict=False, sgd_fresh_power=1.0)
    dm = DelayScaledMomentum(strict=False)
    dm_all = DelayScaledMomentum(strict=False, muon=True)
    group = "momentum-horizon"

    def default_with(name: str, group: str, variant: str, runs: list[Any],
                     **changes: Any) -> dict[str, Any]:
        """A screen of the default method with some of its fields changed."""
        return {"method": get_method("pipeoptim-qh-dm-dl").with_(name=name, **changes),
                "group": group, "variant": variant, "runs": runs}

    def qh_dl(name: str, nu: float, variant: str, **dl: Any) -> dict[str, Any]:
        """A variant of ``pipeoptim-qh-dl`` on the 8-stage SGD setting (group "sgd-default")."""
        return {"method": Method(name, forward="predicted",
                                 transforms=(QuasiHyperbolicMomentum(nu, strict=False),
                                             DelayScaledLR(**dl))),
                "group": "sgd-default", "variant": variant, "runs": [(8, "sgd", 2)]}

    class BestStableNu(QuasiHyperbolicMomentum):
        """nu per stage: the value in steps of 0.05 that maximises the delayed linear model's
        stable range at the stage's delay (momentum 0.9, predicted forward); 1 at D = 0."""

        def _nu(self, group, ctx):  # type: ignore[no-untyped-def]
            from predictopt.analysis import max_stable_curvature

            if ctx.delay == 0:
                return 1.0
            grid = [k / 20 for k in range(21)]
            return max(grid, key=lambda nu: max_stable_curvature(0.9, ctx.delay, nu=nu,
                                                                 gain=1.0))

    earlier = {
        "p-qhopt-dl": {
            "method": Method("p-qhopt-dl", forward="predicted",
                             transforms=(BestStableNu(0.5, strict=False), DelayScaledLR())),
            "group": "sgd-default",
            "variant": "`pipeoptim-qh-dl` with nu per stage maximising the delayed linear "
                       "model's stable range (`predictopt.analysis.max_stable_curvature`, nu in "
                       "steps of 0.05; 1 at D = 0)",
            "runs": [(8, "sgd", 2)]},
        "p-qh25-dl": qh_dl("p-qh25-dl", 0.25,
                           "`pipeoptim-qh-dl` with nu = 0.25 (more of the fresh gradient)"),
        "p-qh0-dl": qh_dl("p-qh0-dl", 0.0, "`pipeoptim-qh-dl` with nu = 0 (no momentum, the "
                                           "momentum's rate 1/(1 - mu))"),
        "p-qh75-dl": qh_dl("p-qh75-dl", 0.75, "`pipeoptim-qh-dl` with nu = 0.75"),
        "p-qh-dl-anneal": qh_dl(
            "p-qh-dl-anneal", 0.5, "`pipeoptim-qh-dl` with the 1/(1 + D) factor annealed to 1 "
            "over the run (PipeMare's warm-up, T = 1200 updates)", anneal_updates=1200),
        "ef-b9": {
            "method": Method("ef-b9", transforms=(ErrorFeedback(beta=0.9),)),
            "group": "error-feedback",
            "variant": "error feedback with the estimate smoothed, beta = 0.9 (an EMA of the "
                       "updates)",
            "runs": [(8, "sgd", 2), (8, "adamw", 0)]},
        "qh-dl-ef": {
            "method": Method("qh-dl-ef", transforms=(qh, DelayScaledLR(), ErrorFeedback(0.9))),
            "group": "error-feedback",
            "variant": "`pipeoptim-qh-dl`'s transforms (QH momentum, lr / (1 + D)) plus error "
                       "feedback with beta = 0.9, forwards on the carried weights instead of "
                       "predicted ones",
            "runs": [(8, "sgd", 2), (8, "adamw", 0)]},
        "qh-dl-ef0": {
            "method": Method("qh-dl-ef0", transforms=(qh, DelayScaledLR(), ErrorFeedback())),
            "group": "error-feedback",
            "variant": "`pipeoptim-qh-dl`'s transforms (QH momentum, lr / (1 + D)) plus error "
                       "feedback (beta = 0), forwards on the carried weights instead of "
                       "predicted ones",
            "runs": [(8, "sgd", 2)]},
        "p-qh-dl-dc": {
            "method": Method("p-qh-dl-dc", forward="predicted",
                             transforms=(qh, DelayScaledLR(), DelayCompensation())),
            "group": "corrections",
            "variant": "`pipeoptim-qh-dl` plus DC-ASGD's delay compensation "
                       "(`DelayCompensation()`) of the gradient for the residual between the "
                       "predicted and the current weights",
            "runs": [(8, "sgd", 2), (8, "adamw", 0)]},
    }
    return earlier | {
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
        "pipeoptim-qh-dm-dl-sgd-whole": {
            "method": Method("pipeoptim-qh-dm-dl-sgd-whole", forward="predicted",
                             transforms=(dm, qh, DelayScaledLR())),
            "group": "sgd-split",
            "variant": "the default until 2026-12-07: momentum SGD's whole update at the rate / "
                       "(1 + D)",
            "runs": [(s, "sgd", e) for s in (4, 8, 16) for e in (0, 1, 2)]},
        "sequential-qh-dm-dl-sgd-whole": {
            "method": Method("sequential-qh-dm-dl-sgd-whole", staleness_free=True,
                             transforms=(DelayScaledMomentum(delays="1f1b", strict=False), qh,
                                         DelayScaledLR(delays="1f1b"))),
            "group": "sgd-split",
            "variant": "its staleness-free twin",
            "runs": [(s, "sgd", e) for s in (4, 8, 16) for e in (0, 1, 2)]},
        "pipeoptim-qh-dm-dl-adam-split": {
            "method": Method("pipeoptim-qh-dm-dl-adam-split", forward="predicted",
                             transforms=(dm, adam_split)),
            "group": "adam-split",
            "variant": "the former default with Adam's update split as momentum SGD's (the "
                       "prediction uncalibrated): the momentum term at the full rate, the "
                       "fresh-gradient term / (1 + D)",
            "runs": [(8, "adamw", 1), (4, "adamw@0.001", 1), (4, "adamw", 1)]},
        "pipeoptim-qh-dm-dl-split3": {
            "method": Method("pipeoptim-qh-dm-dl-split3", forward="predicted",
                             transforms=(dm, SplitUpTo(0.5, strict=False), WholeAbove())),
            "group": "adam-depth",
            "variant": "the former default with Adam's update split as momentum SGD's "
                       "where D <= 3 (the prediction uncalibrated), the whole update / (1 + D) "
                       "where D > 3",
            "runs": [(8, "adamw", 1)]},
        "pipeoptim-qh-dm-dl-adam-whole": {
            "method": Method("pipeoptim-qh-dm-dl-adam-whole", forward="predicted",
                             transforms=(dm, qh_sgd_fresh, DelayScaledLR(momentum_sgd=False))),
            "group": "adam-whole",
            "variant": "the former default with Adam: the whole update at the rate / "
                       "(1 + D), the prediction uncalibrated",
            "runs": [(s, "adamw", e) for s in (4, 8, 16) for e in (0, 1, 2)]
            + [(4, "adamw@0.001", e) for e in (0, 1, 2)]},
        "sequential-qh-dm-dl-adam-whole": {
            "method": Method("sequential-qh-dm-dl-adam-whole", staleness_free=True,
                             transforms=(DelayScaledMomentum(delays="1f1b", strict=False),
                                         QuasiHyperbolicMomentum(0.5, strict=False,
                                                                 sgd_fresh_power=1.0,
                                                                 delays="1f1b"),
                                         DelayScaledLR(delays="1f1b", momentum_sgd=False))),
            "group": "adam-whole",
            "variant": "its staleness-free twin",
            "runs": [(s, "adamw", e) for s in (4, 8, 16) for e in (0, 1, 2)]},
        "pipeoptim-qh-dm-dl-uncalibrated": default_with(
            "pipeoptim-qh-dm-dl-uncalibrated", "calibration",
            "the default with its prediction uncalibrated (with momentum SGD: the former "
            "default)", [(s, "sgd", e) for s in (4, 8, 16) for e in (0, 1, 2)], calibrate=False),
        # the default samples each horizon at most every 16 updates since 2026-12-08 (its study
        # runs then were this group's k = 16 screens, renamed); k = 1 is the default before
        "pipeoptim-qh-dm-dl-every1": default_with(
            "pipeoptim-qh-dm-dl-every1", "calibration-every",
            "the default until 2026-12-08: a calibration sample of each horizon s every s "
            "updates (k = 1)",
            [(d, o, e) for d in (4, 8, 16) for o in ("adamw", "sgd") for e in (0, 1, 2)]
            + [(4, "adamw@0.001", e) for e in (0, 1, 2)], calibration_every=1),
        "pipeoptim-qh-dm-dl-every8": default_with(
            "pipeoptim-qh-dm-dl-every8", "calibration-every",
            "the default with a calibration sample of each horizon s at most once every "
            "max(s, 8) updates", [(8, o, e) for o in ("adamw", "sgd") for e in (0, 1, 2)],
            calibration_every=8),
        "pipeoptim-qh-dm-dl-muon-cal": default_with(
            "pipeoptim-qh-dm-dl-muon-cal", "muon-calibration",
            "the default with its prediction calibrated on Muon stages too",
            [(16, "muon", 0)] + [(8, "muon", e) for e in (0, 1, 2)], calibrate=True),
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


def _label(config: dict[str, Any]) -> str:
    """A run's optimizer as ``runs`` name it: ``"adamw"``, or ``"adamw@0.001"`` at a rate other
    than the study's default."""
    lr = config.get("lr")
    return config["optimizer"] + ("" if lr is None else f"@{lr:g}")


def _key(r: dict[str, Any]) -> tuple[str, int, str, int]:
    return r["method"], r["config"]["stages"], _label(r["config"]), r["seed"]


def _work(job: tuple[str, int, str, int]) -> dict[str, Any]:
    from dataclasses import replace

    import torch

    from predictopt.study import run_lm, study_setting

    torch.set_num_threads(1)
    name, stages, label, seed = job
    opt, _, lr = label.partition("@")
    v = variants()[name]
    cfg = replace(study_setting(stages, opt), lr=float(lr) if lr else None)
    r = run_lm(v["method"], cfg, seed)
    r.update(method=name, variant=v["variant"], group=v["group"])
    return r


def _verify(vs: dict[str, dict[str, Any]], groups: list[str], processes: int) -> int:
    """Rerun the recorded runs of ``groups`` (all: every record) and compare their curves."""
    records = {}
    for line in SCREENS.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if not groups or r.get("group", "sgd-default") in groups:
                records[_key(r)] = r
    jobs = [k for k in records if k[0] in vs and tuple(k[1:]) in map(tuple, vs[k[0]]["runs"])]
    for k in records.keys() - set(jobs):
        print(f"{k}: no definition in tools/screens.py", flush=True)
    bad = len(records) - len(jobs)
    with mp.get_context("spawn").Pool(max(1, processes)) as pool:
        for k, r in zip(jobs, pool.imap(_work, jobs)):
            old = records[k]
            same = r["curve"] == old["curve"]
            bad += not same
            diff = max((abs(a[1] - b[1]) for a, b in zip(r["curve"], old["curve"])), default=0.0)
            print(f"{k}: {'reproduced' if same else 'DIFFERS'} (final {r['final_loss']!r} vs "
                  f"{old['final_loss']!r}; curve points {len(r['curve'])} vs "
                  f"{len(old['curve'])}, largest difference {diff:.3g}; recorded on "
                  f"{old.get('machine') or 'a machine not named'})", flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("groups", nargs="*", help="groups to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the groups and variants")
    ap.add_argument("--processes", type=int, default=2, help="runs at a time (default: 2)")
    ap.add_argument("--verify", action="store_true",
                    help="rerun the recorded runs of the groups instead and say whether each "
                         "reproduces its record bit for bit (writes nothing)")
    args = ap.parse_args(argv)
    vs = variants()
    if args.verify:
        return _verify(vs, args.groups, args.processes)
    if args.list:
        for name, v in vs.items():
            print(f"{v['group']}: {name}: {v['variant']} {v['runs']}")
        return 0
    done = set()
    if SCREENS.exists():
        for line in SCREENS.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add(_key(r))
    jobs = [(n, s, o, e) for n, v in vs.items() if not args.groups or v["group"] in args.groups
            for s, o, e in v["runs"] if (n, s, o, e) not in done]
    print(f"{len(jobs)} runs to do", flush=True)
    with mp.get_context("spawn").Pool(max(1, args.processes)) as pool:
        for r in pool.imap_unordered(_work, jobs):
            with SCREENS.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{r['method']} {r['config']['stages']} stages {_label(r['config'])} "
                  f"seed {r['seed']}: {r['final_loss']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
