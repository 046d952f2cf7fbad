r"""Cost of :class:`~predictopt.pipeline.runtime.PredictiveStage` and pipeline throughput on CPU.

Two measurements, each on gloo/CPU processes spawned by this script (one torch thread each):

* **overhead** (2 ranks, ``Schedule1F1B``, the same MLP stages and micro-batches): time per
  micro-batch of a plain torch ``PipelineStage`` (``optimizer.step()`` once per
  ``schedule.step()``, the torch way) against ``PredictiveStage`` with ``gpipe`` (one update
  per step through the stage's worker), ``pipedream`` (an update after every micro-batch,
  weight stashing), ``pipeoptim`` (an update after every micro-batch and a predicted
  forward) and ``pipeoptim-lean`` (the same, backward on the current weights). Reported as
  wall time and as CPU time (``time.process_time`` of both ranks,
  which other processes on the machine barely affect). Ratios are against the plain stage
  measured in the same run.
* **throughput** (``p`` = 2 and 4 ranks vs 1 process): the same model of ``L`` blocks cut into
  ``p`` stages, trained under ``Schedule1F1B`` with ``pipeoptim`` (an update after every
  micro-batch) and with the plain stage (one update per step), each against one process
  running the whole model on the same micro-batches with the same updates. The measured bubble
  fraction of a rank is ``1 - busy / step time``, ``busy`` being the time spent inside its
  stage's forward and backward calls (the updates of ``PredictiveStage`` included), averaged
  over the ranks; the theoretical one of 1F1B/GPipe is $(p-1)/(m+p-1)$ for $m$ micro-batches.

With fewer cores than ranks (e.g. 4 ranks on 2 cores) the ranks share cores, so the speed-up
and the bubble are not those of a real pipeline: the JSON records the core count.

Run: ``python benchmarks/bench_pipeline.py [--repeats N] [--dim D] [--microbatch-size B]
[--fused]``; writes ``benchmarks/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pickle
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
UPDATES = {"pipeoptim": "AdamW after every micro-batch", "plain": "AdamW once per step"}


# ---------------------------------------------------------------------------------------------
# Model and launcher
# ---------------------------------------------------------------------------------------------


def block(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU())


def make_model(blocks: int, dim: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [block(dim) for _ in range(blocks)]


def cut(blocks: list[nn.Module], parts: int) -> list[nn.Module]:
    per = len(blocks) // parts
    return [nn.Sequential(*blocks[i * per:(i + 1) * per]) for i in range(parts)]


FUSED = os.environ.get("BENCH_PIPELINE_FUSED") == "1"  # set by --fused, seen by the children


def adamw(params: Any) -> torch.optim.Optimizer:
    kw = {"fused": True} if FUSED else {}
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kw)


def _entry(fn: Any, rank: int, world: int, tmp: str, kw: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world),
                                rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=120))
        out = {"ok": True, "value": fn(rank, world, **kw)}
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        out = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(tmp, f"{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)


def launch(fn: Any, world: int, timeout: float = 600.0, **kw: Any) -> list[Any]:
    tmp = tempfile.mkdtemp(prefix="bench_pipeline_")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, tmp, kw), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    values = []
    for r in range(world):
        path = os.path.join(tmp, f"{r}.pkl")
        if not os.path.exists(path):
            raise RuntimeError(f"rank {r} of {fn.__name__} returned nothing (timeout or crash)")
        with open(path, "rb") as f:
            out = pickle.load(f)
        if not out["ok"]:
            raise RuntimeError(f"rank {r} of {fn.__name__} failed:\n{out['error']}")
        values.append(out["value"])
    return values


# ---------------------------------------------------------------------------------------------
# One pipeline run
# ---------------------------------------------------------------------------------------------


def _timed(cls: type) -> type:
    """``cls`` with the time spent in its compute calls accumulated in ``busy``."""

    class Timed(cls):  # type: ignore[misc, valid-type]
        busy = 0.0

        def forward_one_chunk(self, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = super().forward_one_chunk(*a, **k)
            self.busy += time.perf_counter() - t
            return out

        def backward_one_chunk(self, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = super().backward_one_chunk(*a, **k)
            self.busy += time.perf_counter() - t
            return out

        def backward_weight_one_chunk(self, *a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            out = super().backward_weight_one_chunk(*a, **k)
            self.busy += time.perf_counter() - t
            return out

    Timed.__name__ = f"Timed{cls.__name__}"
    return Timed


def _pipeline(rank: int, world: int, variant: str, blocks: int, dim: int, n: int, mb: int,
              steps: int) -> dict[str, Any]:
    """Train ``steps`` steps (after 2 warm-up steps); per-step times and busy fractions."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from predictopt.pipeline.runtime import PredictiveStage

    module = cut(make_model(blocks, dim), world)[rank]
    opt = adamw(module.parameters())
    if variant == "plain":
        stage = _timed(PipelineStage)(module, rank, world, torch.device("cpu"))
    else:
        stage = _timed(PredictiveStage)(module, rank, world, "cpu", optimizer=opt,
                                        method=variant)
    sched = Schedule1F1B(stage, n_microbatches=n, loss_fn=F.mse_loss,
                         scale_grads=variant == "plain")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n * mb, dim, generator=gen), torch.randn(n * mb, dim, generator=gen)
    times, busy, cpu = [], [], []
    for s in range(steps + 2):
        dist.barrier()
        stage.busy = 0.0
        c0 = time.process_time()
        t0 = time.perf_counter()
        if rank == 0:
            sched.step(x)
        elif rank == world - 1:
            sched.step(target=y)
        else:
            sched.step()
        t1 = time.perf_counter()
        if variant == "plain":  # the torch way: one update per step, outside the schedule
            opt.step()
            opt.zero_grad()
        t2 = time.perf_counter()
        c2 = time.process_time()
        if s >= 2:
            times.append(t2 - t0)
            busy.append(stage.busy / (t1 - t0))
            cpu.append(c2 - c0)
    return {"times": times, "busy": busy, "cpu": cpu}


def _variants_worker(rank: int, world: int, variants: list[str], rounds: int,
                     **kw: Any) -> dict[str, Any]:
    """All variants, round-robin ``rounds`` times (load from other processes hits all alike)."""
    out: dict[str, Any] = {v: {"times": [], "busy": [], "cpu": [], "rounds": []}
                           for v in variants}
    for _ in range(rounds):
        for v in variants:
            res = _pipeline(rank, world, v, **kw)
            out[v]["times"] += res["times"]
            out[v]["busy"] += res["busy"]
            out[v]["cpu"] += res["cpu"]
            out[v]["rounds"].append(res["times"])
    return out


def _summarise(per_rank: list[dict[str, Any]], variant: str) -> tuple[float, float]:
    """Median step time (slowest rank per step) and mean bubble over ranks."""
    steps = zip(*(r[variant]["times"] for r in per_rank))
    step_time = statistics.median(max(ts) for ts in steps)
    busy = statistics.mean(statistics.median(r[variant]["busy"]) for r in per_rank)
    return step_time, 1.0 - busy


def _cpu(per_rank: list[dict[str, Any]], variant: str) -> float:
    """Median CPU time of a step, summed over the ranks (insensitive to other processes)."""
    return statistics.median(sum(ts) for ts in zip(*(r[variant]["cpu"] for r in per_rank)))


def _paired_ratio(per_rank: list[dict[str, Any]], variant: str, base: str) -> float:
    """Median over rounds of (step time of ``variant`` / step time of ``base``) in that round.

    Variants run round-robin, so a round's pair saw similar load from other processes.
    """
    def round_times(v: str) -> list[float]:
        rounds = zip(*(r[v]["rounds"] for r in per_rank))  # per round: one list per rank
        return [statistics.median(max(ts) for ts in zip(*lists)) for lists in rounds]

    return statistics.median(a / b for a, b in zip(round_times(variant), round_times(base)))


def _one_process(blocks: int, dim: int, n: int, mb: int, steps: int, repeats: int,
                 per_microbatch: bool) -> float:
    """Median step time of the whole model in one process, AdamW after every micro-batch
    (``per_microbatch``) or once per step on the mean gradient."""
    torch.set_num_threads(1)
    model = nn.Sequential(*make_model(blocks, dim))
    opt = adamw(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n * mb, dim, generator=gen), torch.randn(n * mb, dim, generator=gen)
    times = []
    for s in range(repeats * steps + 2):
        t0 = time.perf_counter()
        for xi, yi in zip(x.split(mb), y.split(mb)):
            loss = F.mse_loss(model(xi), yi)
            if per_microbatch:
                loss.backward()
                opt.step()
                opt.zero_grad()
            else:
                (loss / n).backward()
        if not per_microbatch:
            opt.step()
            opt.zero_grad()
        if s >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="PredictiveStage overhead and pipeline throughput")
    ap.add_argument("--dim", type=int, default=256, help="width of the MLP blocks")
    ap.add_argument("--microbatch-size", type=int, default=32)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4, help="blocks of the whole model")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (variants round-robin)")
    ap.add_argument("--fused", action="store_true",
                    help="AdamW(fused=True) (about 2.5x faster on CPU than the default)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4],
                    help="pipeline sizes of the throughput measurement")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global FUSED
    args = parse_args(argv)
    FUSED = args.fused
    os.environ["BENCH_PIPELINE_FUSED"] = "1" if args.fused else "0"
    n, mb, dim, blocks = args.microbatches, args.microbatch_size, args.dim, args.blocks
    common = {"blocks": blocks, "dim": dim, "n": n, "mb": mb, "steps": args.steps}
    cores = os.cpu_count() or 1
    fused = " (fused)" if FUSED else ""
    print(f"PredictiveStage benchmark: {blocks} blocks of Linear({dim},{dim})+GELU x2, "
          f"{n} micro-batches of {mb}, AdamW{fused}, Schedule1F1B, gloo/CPU, {cores} cores, "
          f"1 thread per process")
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    # ---- overhead, 2 ranks
    variants = ["plain", "gpipe", "pipedream", "pipeoptim", "pipeoptim-lean"]
    per_rank = launch(_variants_worker, 2, variants=variants, rounds=args.repeats, **common)
    base = _summarise(per_rank, "plain")[0]
    overhead = []
    base_cpu = _cpu(per_rank, "plain")
    print("\n2 ranks, per micro-batch: wall time (median step / n) and CPU time of both ranks; "
          "ratios vs plain PipelineStage (wall: median over rounds of the same round's ratio):")
    print(f"{'stage':<28}{'wall ms':>9}{'ratio':>7}{'CPU ms':>9}{'ratio':>7}{'bubble':>8}")
    for v in variants:
        t, bubble = _summarise(per_rank, v)
        ratio = _paired_ratio(per_rank, v, "plain")
        c = _cpu(per_rank, v)
        label = "PipelineStage (plain)" if v == "plain" else f"PredictiveStage {v}"
        overhead.append({"variant": v, "ms_per_microbatch": 1e3 * t / n, "ratio": ratio,
                         "ratio_of_medians": t / base, "cpu_ms_per_microbatch": 1e3 * c / n,
                         "cpu_ratio": c / base_cpu, "bubble": bubble})
        print(f"{label:<28}{1e3 * t / n:>9.2f}{ratio:>7.2f}{1e3 * c / n:>9.2f}"
              f"{c / base_cpu:>7.2f}{bubble:>8.2f}")

    # ---- throughput, p ranks vs 1 process doing the same work
    samples = n * mb
    single = {v: _one_process(blocks, dim, n, mb, args.steps, args.repeats, v == "pipeoptim")
              for v in ("pipeoptim", "plain")}
    throughput = [{"ranks": 1, "variant": f"one process, {UPDATES[v]}",
                   "samples_per_s": samples / t, "speedup": 1.0}
                  for v, t in single.items()]
    print("\nthroughput of p ranks vs one process doing the same work (the whole model, the "
          "same micro-batches and updates):")
    for v, t in single.items():
        print(f"  one process, {UPDATES[v]}: {samples / t:.0f} samples/s")
    print(f"{'ranks':>5}  {'stage':<26}{'samples/s':>10}{'speed-up':>10}{'bubble':>8}"
          f"{'theory':>8}")
    for p in args.ranks:
        if blocks % p:
            print(f"{p:>5}  skipped: {blocks} blocks do not split into {p} stages")
            continue
        per_rank = launch(_variants_worker, p, variants=["plain", "pipeoptim"],
                          rounds=args.repeats, **common)
        theory = (p - 1) / (n + p - 1)
        for v in ("pipeoptim", "plain"):
            t, bubble = _summarise(per_rank, v)
            label = "PredictiveStage pipeoptim" if v == "pipeoptim" else "PipelineStage (plain)"
            row = {"ranks": p, "variant": v, "updates": UPDATES[v],
                   "samples_per_s": samples / t, "speedup": single[v] / t, "bubble": bubble,
                   "bubble_theory": theory, "oversubscribed": p > cores}
            throughput.append(row)
            print(f"{p:>5}  {label:<26}{samples / t:>10.0f}{single[v] / t:>10.2f}{bubble:>8.2f}"
                  f"{theory:>8.2f}{'  (more ranks than cores)' if p > cores else ''}")
    elapsed = time.perf_counter() - t_start
    load_end = os.getloadavg()
    print(f"\n{elapsed:.0f} s; 1-minute load average {load_start[0]:.1f} at the start, "
          f"{load_end[0]:.1f} at the end ({cores} cores)")
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": cores,
                    "load_average_start": load_start[0], "load_average_end": load_end[0],
                    "date": _dt.datetime.now().isoformat(timespec="seconds")},
        "config": {**vars(args)},
        "overhead_2_ranks": overhead,
        "throughput": throughput,
        "seconds": elapsed,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "pipeline.json", "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
