"""How well a method's forward weights predict where a stage really is when its gradient lands.

For every micro-batch of a stage, with $w_f$ the stage's weights at its forward (before any
prediction), $\\hat w$ the weights the forward ran on and $w_b$ the weights when the gradient
is applied ($s$ updates later), the probe compares the predicted displacement $P = \\hat w - w_f$
with the real one $A = w_b - w_f$ over the stage's parameters: the error ratio
$\\lVert A - P\\rVert^2 / \\lVert A\\rVert^2$ (1: no better than the stale weights), the
least-squares gain $\\langle P, A\\rangle / \\lVert P\\rVert^2$ and the cosine of the two. Each is
averaged per stage over the micro-batches of the second half of the run. The probe only reads
(a transform appended to the method that keeps copies of the weights), so the run is the
method's own, bit for bit.

    python tools/probe_prediction.py     # runs what is missing, two at a time

Results: ``docs/results/prediction_probe.jsonl`` (one line per run; ``tools/gen_docs.py``
renders the table in docs/study.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "prediction_probe.jsonl"

#: (method as tools/screens.py or the registry names it, stages, optimizer, seed)
RUNS: tuple[tuple[str, int, str, int], ...] = (
    ("pipeoptim-qh-dm-dl-adam-whole", 8, "adamw", 1),
    ("pipeoptim-qh-dm-dl-adam-split", 8, "adamw", 1),
    ("pipeoptim-qh-dm-dl-every1", 8, "adamw", 1),
    ("pipeoptim-qh-dm-dl", 8, "adamw", 1),
    ("pipeoptim", 8, "muon", 0),
    ("pipeoptim-qh-dm-dl", 8, "muon", 0),
    ("pipeoptim-qh-dm-dl-muon-cal", 8, "muon", 0),
)


def _method(name: str) -> Any:
    sys.path.insert(0, str(ROOT / "tools"))
    import screens

    from predictopt.pipeline import get_method

    vs = screens.variants()
    return vs[name]["method"] if name in vs else get_method(name)


def probe(job: tuple[str, int, str, int]) -> dict[str, Any]:
    """Run one job with the probe; return its record."""
    import torch

    from predictopt.pipeline.methods import StageTransform
    from predictopt.study import run_lm, study_setting

    torch.set_num_threads(1)
    name, stages, optimizer, seed = job
    samples: dict[int, list[tuple[int, int, float, float, float]]] = {}

    class Probe(StageTransform):
        needs_forward_weights = True

        def __init__(self) -> None:
            self.versions: dict[int, dict[int, list[torch.Tensor]]] = {}

        def _keep(self, stage: int, version: int, params: list[torch.Tensor]) -> None:
            d = self.versions.setdefault(stage, {})
            d[version] = [p.detach().clone() for p in params]
            for k in [k for k in d if k < version - 64]:
                del d[k]

        def after_step(self, ctx, update):  # type: ignore[no-untyped-def]
            self._keep(ctx.stage, update.updates + 1, update.params)

        def correct_gradients(self, ctx, update, mb, grads, fw):  # type: ignore[no-untyped-def]
            d = self.versions.setdefault(ctx.stage, {})
            if update.updates == 0 and 0 not in d:
                self._keep(ctx.stage, 0, update.params)
            s = ctx.staleness[mb % ctx.n_microbatches]
            then = d.get(update.updates - s)
            if then is None or fw is None or s == 0:
                return
            now = [p.detach() for p in update.params]
            a = sum(float((x - t).double().square().sum()) for x, t in zip(now, then))
            p = sum(float((f - t).double().square().sum()) for f, t in zip(fw, then))
            e = sum(float((x - f).double().square().sum()) for x, f in zip(now, fw))
            samples.setdefault(ctx.stage, []).append((update.updates, s, a, p, e))

    method = _method(name)
    method = method.with_(name=method.name, transforms=(*method.transforms, Probe()))
    record = run_lm(method, study_setting(stages, optimizer), seed)
    out = []
    for stage, rows in sorted(samples.items()):
        last = max(u for u, *_ in rows)
        rows = [r for r in rows if r[0] >= last // 2 and r[2] > 0 and r[3] > 0]
        n = len(rows)
        pa = [(a + p - e) / 2 for _, _, a, p, e in rows]  # <P, A>
        out.append({"stage": stage, "delay": max(s for _, s, *_ in rows), "samples": n,
                    "error_ratio": sum(r[4] / r[2] for r in rows) / n,
                    "gain": sum(x / r[3] for x, r in zip(pa, rows)) / n,
                    "cosine": sum(x / (r[2] * r[3]) ** 0.5 for x, r in zip(pa, rows)) / n})
    return {"method": name, "stages": stages, "optimizer": optimizer, "seed": seed,
            "final_loss": record["final_loss"], "machine": record["machine"], "per_stage": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="runs at a time (default: 2)")
    args = ap.parse_args(argv)
    done = set()
    if OUT.exists():
        for line in OUT.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["method"], r["stages"], r["optimizer"], r["seed"]))
    jobs = [j for j in RUNS if j not in done]
    print(f"{len(jobs)} runs to do", flush=True)
    with mp.get_context("spawn").Pool(max(1, args.processes)) as pool:
        for r in pool.imap_unordered(probe, jobs):
            with OUT.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{r['method']}: {r['final_loss']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
