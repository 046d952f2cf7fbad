r"""Cost of :class:`~predictopt.pipeline.runtime.PredictiveStage` against a plain torch stage.

**Overhead** (the default, ``--what overhead``): 2 gloo/CPU ranks spawned by this script (one
torch thread each) train one stage each under ``Schedule1F1B``, as a user would:

* ``plain``: torch's own ``PipelineStage``, ``optimizer.step()`` and ``zero_grad()`` once per
  ``schedule.step()`` (``scale_grads=True``);
* every method of ``--variants`` (default: ``gpipe``, ``pipedream``, ``pipeoptim``,
  ``pipeoptim-lean``, the project's default method ``predictopt.pipeline.DEFAULT_METHOD`` when
  it is another one, ``qh-dl`` and ``nesterov-dl``): ``PredictiveStage(method=...)``, which
  steps the optimizer itself (once per step for ``gpipe``, after every micro-batch for the
  others) and runs the forwards on the method's weights (stashed for ``pipedream``, predicted
  for ``pipeoptim``, ...; ``qh-dl`` adds its quasi-hyperbolic correction pass per update,
  ``nesterov-dl`` turns AdamW into NAdam). A variant ``METHOD-everyK`` is the registered
  ``METHOD`` with ``calibration_every=K`` (the default's calibration sampled at most once every
  ``K`` updates per horizon; the default set measures ``K = 1``, the default method's until
  2026-12-08).

Stages (``--stage``): ``mlp``, ``Linear(1024,1024)-GELU-Linear(1024,1024)`` on micro-batches of
32 vectors; ``transformer``, the project's pre-norm transformer block (``predictopt.lm``,
``d = 256``, 4 heads) on micro-batches of 8 sequences of 32 tokens. Optimizer (``--optimizer``):
AdamW ``fused=True`` or torch's default (on CPU a per-tensor loop).

Measure: CPU time of a step (``time.process_time`` of each rank around ``schedule.step()``, the
plain stage's update included), summed over both ranks. CPU time is what the stage costs; other
processes on the machine inflate wall time far more than CPU time (both are recorded). The
variants are **interleaved**: in every round each variant builds its stage afresh, runs
``--warmup`` untimed and ``--steps`` timed steps, and the order of the variants rotates from
round to round, so that load from other processes hits all of them alike. Per round the median
step is taken; the table reports the median over rounds and the min-max of the rounds, and the
ratio against ``plain`` *of the same round* (median and min-max over rounds).

Results go to ``--out``: one entry per (stage, optimizer) configuration, merged into that file (a
run replaces the entries of the configurations it measured), each with every sample, the
machine (platform, CPU, cores, torch), the date and the load average at start and end. Without
``--out`` the run writes ``benchmarks/results/pipeline_overhead.json`` if it does not exist yet,
else a new file beside it named with the date: a committed result is replaced only when ``--out``
names it. ``tools/gen_docs.py`` renders the docs' tables from ``pipeline_overhead.json``.

``--quick``: a smoke run (1 round, 1 + 2 steps, 4 micro-batches, into a temporary file unless
``--out`` is given) that checks the script works; its figures mean nothing.

**Throughput** (``--what throughput``): ``p`` ranks vs one process running the whole model on the
same micro-batches with the same updates, with the measured bubble (see `throughput`); written
to ``--out`` (default ``benchmarks/results/pipeline_throughput.json``). On a machine with fewer
cores than ranks the figures are not those of a real pipeline.

Run: ``python -m benchmarks.bench_pipeline [--stage mlp transformer] [--optimizer fused default]
[--rounds 5] [--steps 4] [--out PATH] [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from predictopt.pipeline.methods import DEFAULT_METHOD

try:  # python -m benchmarks.bench_pipeline
    from benchmarks.bench_predict import fresh_path, machine_info
except ImportError:  # python benchmarks/bench_pipeline.py
    from bench_predict import fresh_path, machine_info  # type: ignore[no-redef]

RESULTS = Path(__file__).resolve().parent / "results"
OVERHEAD_OUT = RESULTS / "pipeline_overhead.json"
THROUGHPUT_OUT = RESULTS / "pipeline_throughput.json"
#: ``plain`` (torch's PipelineStage) first: the baseline every ratio is taken against.
VARIANTS = tuple(dict.fromkeys(("plain", "gpipe", "pipedream", "pipeoptim", "pipeoptim-lean",
                                DEFAULT_METHOD, f"{DEFAULT_METHOD}-every1", "qh-dl",
                                "nesterov-dl")))
#: The targets of issue 11: CPU-time ratio against ``plain`` (fused AdamW), per stage.
TARGETS: dict[str, dict[str, float]] = {
    "mlp": {"gpipe": 1.05, "pipedream": 1.25, "pipeoptim": 1.25, "pipeoptim-lean": 1.25},
    "transformer": {"gpipe": 1.10, "pipedream": 1.10, "pipeoptim": 1.10,
                    "pipeoptim-lean": 1.10},
}


def method_of(variant: str) -> Any:
    """The method a variant names: a registered name, or ``METHOD-everyK`` for that method
    with ``calibration_every=K``."""
    from predictopt.pipeline import available_methods, get_method

    base, sep, k = variant.rpartition("-every")
    if sep and k.isdigit() and variant not in available_methods():
        return get_method(base).with_(name=variant, calibration_every=int(k))
    return get_method(variant)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def mlp_stage(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024))


def transformer_stage(seed: int) -> nn.Module:
    from predictopt.lm import _Block

    torch.manual_seed(seed)
    return _Block(256, 4, 0.0)


#: name -> (build(seed), micro-batch shape, description)
STAGES: dict[str, tuple[Callable[[int], nn.Module], tuple[int, ...], str]] = {
    "mlp": (mlp_stage, (32, 1024), "Linear(1024,1024)-GELU-Linear(1024,1024), micro-batches "
            "of 32"),
    "transformer": (transformer_stage, (8, 32, 256), "pre-norm transformer block d=256, 4 heads "
                    "(predictopt.lm), micro-batches of 8 x 32 tokens"),
}


def make_optimizer(params: Any, kind: str) -> torch.optim.Optimizer:
    """AdamW lr 1e-4, weight decay 0.01: ``fused=True`` or torch's default."""
    if kind not in ("fused", "default"):
        raise ValueError(f"optimizer must be 'fused' or 'default', got {kind!r}")
    kw = {"fused": True} if kind == "fused" else {}
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kw)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _entry(fn: Any, rank: int, world: int, tmp: str, kw: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    backend = kw.pop("backend", "gloo")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, store=dist.FileStore(os.path.join(tmp, "store"), world),
                                rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=300))
        out = {"ok": True, "value": fn(rank, world, **kw)}
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        out = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(tmp, f"{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)


def launch(fn: Any, world: int, timeout: float = 1800.0, **kw: Any) -> list[Any]:
    """Run ``fn(rank, world, **kw)`` on ``world`` spawned ranks (gloo, or ``backend="nccl"``
    with rank r on ``cuda:r``); their return values."""
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
# Overhead
# ---------------------------------------------------------------------------------------------


def _schedule_step(sched: Any, rank: int, world: int, x: torch.Tensor,
                   y: torch.Tensor) -> None:
    """One ``schedule.step()`` as this rank takes it: inputs on the first stage, targets on the
    last (both in a one-process pipeline)."""
    if world == 1:
        sched.step(x, target=y)
    elif rank == 0:
        sched.step(x)
    elif rank == world - 1:
        sched.step(target=y)
    else:
        sched.step()


def _stage_run(rank: int, world: int, variant: str, stage: str, optimizer: str, n: int,
               warmup: int, steps: int, device: str = "cpu") -> dict[str, list[float]]:
    """One variant on this rank (``device`` ``"cuda"``: on ``cuda:rank``, synchronised around
    every step): per timed step, CPU and wall seconds."""
    import warnings

    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from predictopt.pipeline.runtime import PredictiveStage

    build, shape, _ = STAGES[stage]
    dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    module = build(rank).to(dev)
    opt = make_optimizer(module.parameters(), optimizer)
    if variant == "plain":
        st = PipelineStage(module, rank, world, dev)
    else:
        with warnings.catch_warnings():  # the per-tensor-loop advice, expected for "default"
            warnings.simplefilter("ignore")
            st = PredictiveStage(module, rank, world, dev, optimizer=opt,
                                 method=method_of(variant))
    sched = Schedule1F1B(st, n_microbatches=n, loss_fn=F.mse_loss,
                         scale_grads=variant == "plain")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n * shape[0], *shape[1:], generator=gen).to(dev)
    y = torch.randn(n * shape[0], *shape[1:], generator=gen).to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    cpu, wall = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in range(warmup + steps):
            sync()
            dist.barrier()
            c0, t0 = time.process_time(), time.perf_counter()
            _schedule_step(sched, rank, world, x, y)
            if variant == "plain":  # the torch way: one update per step, outside the schedule
                opt.step()
                opt.zero_grad()
            sync()
            c1, t1 = time.process_time(), time.perf_counter()
            if s >= warmup:
                cpu.append(c1 - c0)
                wall.append(t1 - t0)
    return {"cpu": cpu, "wall": wall}


def _overhead_worker(rank: int, world: int, variants: Sequence[str], rounds: int,
                     **kw: Any) -> list[dict[str, Any]]:
    """Every variant once per round, the order rotating; the samples of this rank."""
    out = []
    for r in range(rounds):
        order = list(variants[r % len(variants):]) + list(variants[:r % len(variants)])
        for v in order:
            res = _stage_run(rank, world, v, **kw)
            out.append({"round": r, "variant": v, **res})
    return out


def summarise(per_rank: list[list[dict[str, Any]]], variants: Sequence[str],
              n: int) -> list[dict[str, Any]]:
    """Per variant: the per-round medians of the step CPU time summed over ranks (and of the
    slowest rank's wall time), their median and min-max, and the ratio against ``plain`` of
    the same round (median, min-max). Times in ms per micro-batch."""
    rounds: dict[str, dict[int, dict[str, float]]] = {v: {} for v in variants}
    for entries in zip(*per_rank):  # the same (round, variant) on every rank
        r, v = entries[0]["round"], entries[0]["variant"]
        cpu = [sum(x) for x in zip(*(e["cpu"] for e in entries))]
        wall = [max(x) for x in zip(*(e["wall"] for e in entries))]
        rounds[v][r] = {"cpu": statistics.median(cpu), "wall": statistics.median(wall)}
    rows = []
    for v in variants:
        keys = sorted(rounds[v])
        cpu = [rounds[v][k]["cpu"] for k in keys]
        wall = [rounds[v][k]["wall"] for k in keys]
        ratio = [rounds[v][k]["cpu"] / rounds["plain"][k]["cpu"] for k in keys]
        wall_ratio = [rounds[v][k]["wall"] / rounds["plain"][k]["wall"] for k in keys]
        ms = [1e3 * x / n for x in cpu]
        rows.append({
            "variant": v,
            "cpu_ms_per_microbatch": statistics.median(ms),
            "cpu_ms_min": min(ms), "cpu_ms_max": max(ms),
            "cpu_ratio": statistics.median(ratio),
            "cpu_ratio_min": min(ratio), "cpu_ratio_max": max(ratio),
            "wall_ms_per_microbatch": 1e3 * statistics.median(wall) / n,
            "wall_ratio": statistics.median(wall_ratio),
            "wall_ratio_min": min(wall_ratio), "wall_ratio_max": max(wall_ratio),
            "rounds_cpu_s": cpu, "rounds_wall_s": wall,
        })
    return rows


def machine() -> dict[str, Any]:
    """Where and when (`benchmarks.bench_predict.machine_info`: platform, CPU, cores, torch,
    date in UTC), with the 1-minute load average under ``load_average_start``."""
    info = machine_info(torch.device("cpu"))
    info["load_average_start"] = info.pop("load_average_at_start")
    return info


def _out(args: argparse.Namespace, default: Path) -> Path:
    """The result file: ``--out``; for ``--quick`` a temporary file; else `fresh_path`."""
    if args.out is None and args.quick:
        return Path(tempfile.mkdtemp(prefix="bench_pipeline_quick_")) / default.name
    return fresh_path(default, args.out)


def merge(path: Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``path``'s results with the entries of ``runs`` replacing those of the same (stage,
    optimizer); written back to ``path``."""
    data: dict[str, Any] = {"runs": []}
    if path.exists():
        data = json.loads(path.read_text())
    keys = {(r["stage"], r["optimizer"]) for r in runs}
    data["runs"] = [r for r in data.get("runs", []) if (r["stage"], r["optimizer"]) not in keys]
    data["runs"] += runs
    order = {name: i for i, name in enumerate(STAGES)}
    data["runs"].sort(key=lambda r: (order.get(r["stage"], 99), r["optimizer"] != "fused"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    variants = list(dict.fromkeys(["plain", *args.variants]))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        world, backend = min(2, torch.cuda.device_count()), "nccl"
    else:
        world, backend = args.world, "gloo"
    runs = []
    for stage in args.stage:
        for optimizer in args.optimizer:
            info = machine()
            t0 = time.perf_counter()
            print(f"\n{stage} stage ({STAGES[stage][2]}), AdamW {optimizer}, {world} "
                  f"{backend} rank(s) on {args.device}, "
                  f"Schedule1F1B, {args.microbatches} micro-batches, {args.rounds} rounds x "
                  f"({args.warmup} + {args.steps}) steps; load average "
                  f"{info['load_average_start']}")
            per_rank = launch(_overhead_worker, world, variants=variants, rounds=args.rounds,
                              stage=stage, optimizer=optimizer, n=args.microbatches,
                              warmup=args.warmup, steps=args.steps, device=args.device,
                              backend=backend)
            rows = summarise(per_rank, variants, args.microbatches)
            info["load_average_end"] = round(os.getloadavg()[0], 2)
            info["seconds"] = round(time.perf_counter() - t0, 1)
            print(table(rows, stage))
            print(f"{info['seconds']:.0f} s, load average {info['load_average_start']} -> "
                  f"{info['load_average_end']}")
            if args.device == "cuda":
                info["gpu"] = torch.cuda.get_device_name(0)
            runs.append({"stage": stage, "optimizer": optimizer, "description": STAGES[stage][2],
                         "device": args.device, "ranks": world, "backend": backend,
                         "microbatches": args.microbatches, "rounds": args.rounds,
                         "warmup": args.warmup, "steps": args.steps, "machine": info,
                         "results": rows, "samples": per_rank})
    path = _out(args, OVERHEAD_OUT)
    data = merge(path, runs)
    print(f"wrote {path}")
    return data


def table(rows: list[dict[str, Any]], stage: str) -> str:
    """The printed table of one configuration."""
    lines = [f"{'stage':<16}{'CPU ms/mb':>10}{'(min-max)':>16}{'ratio':>7}{'(min-max)':>14}"
             f"{'wall ratio':>11}{'target':>8}"]
    for r in rows:
        t = TARGETS.get(stage, {}).get(r["variant"])
        name = r["variant"] + ("*" if r["variant"] == DEFAULT_METHOD else "")
        lines.append(f"{name:<16}{r['cpu_ms_per_microbatch']:>10.2f}"
                     f"{r['cpu_ms_min']:>8.2f}-{r['cpu_ms_max']:<7.2f}{r['cpu_ratio']:>7.2f}"
                     f"{r['cpu_ratio_min']:>7.2f}-{r['cpu_ratio_max']:<6.2f}"
                     f"{r['wall_ratio']:>11.2f}{'' if t is None else f'{t:.2f}':>8}")
    lines.append("(* the default method, predictopt.pipeline.DEFAULT_METHOD; ratios against "
                 "plain of the same round)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Throughput
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

    Timed.__name__ = f"Timed{cls.__name__}"
    return Timed


def _blocks(count: int, dim: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU())
            for _ in range(count)]


def _throughput_worker(rank: int, world: int, variants: Sequence[str], rounds: int,
                       blocks: int, dim: int, n: int, mb: int, steps: int,
                       optimizer: str) -> dict[str, Any]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from predictopt.pipeline.runtime import PredictiveStage

    out: dict[str, Any] = {v: {"times": [], "busy": []} for v in variants}
    per = blocks // world
    for _ in range(rounds):
        for v in variants:
            module = nn.Sequential(*_blocks(blocks, dim)[rank * per:(rank + 1) * per])
            opt = make_optimizer(module.parameters(), optimizer)
            if v == "plain":
                st = _timed(PipelineStage)(module, rank, world, torch.device("cpu"))
            else:
                st = _timed(PredictiveStage)(module, rank, world, "cpu", optimizer=opt,
                                             method=method_of(v))
            sched = Schedule1F1B(st, n_microbatches=n, loss_fn=F.mse_loss,
                                 scale_grads=v == "plain")
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(n * mb, dim, generator=gen), torch.randn(n * mb, dim,
                                                                        generator=gen)
            for s in range(steps + 2):
                dist.barrier()
                st.busy = 0.0
                t0 = time.perf_counter()
                _schedule_step(sched, rank, world, x, y)
                if v == "plain":
                    opt.step()
                    opt.zero_grad()
                t1 = time.perf_counter()
                if s >= 2:
                    out[v]["times"].append(t1 - t0)
                    out[v]["busy"].append(st.busy / (t1 - t0))
    return out


def _one_process(blocks: int, dim: int, n: int, mb: int, steps: int, optimizer: str,
                 per_microbatch: bool) -> float:
    torch.set_num_threads(1)
    model = nn.Sequential(*_blocks(blocks, dim))
    opt = make_optimizer(model.parameters(), optimizer)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n * mb, dim, generator=gen), torch.randn(n * mb, dim, generator=gen)
    times = []
    for s in range(steps + 2):
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


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    n, mb, dim, blocks = args.microbatches, 32, args.dim, args.blocks
    info = machine()
    samples = n * mb
    single = {v: _one_process(blocks, dim, n, mb, args.steps * args.rounds, args.optimizer[0],
                              v == "pipeoptim") for v in ("pipeoptim", "plain")}
    rows: list[dict[str, Any]] = [
        {"ranks": 1, "variant": f"one process, AdamW {'after every micro-batch' if v == 'pipeoptim' else 'once per step'}",  # noqa: E501
         "samples_per_s": samples / t, "speedup": 1.0} for v, t in single.items()]
    for p in args.ranks:
        if blocks % p:
            continue
        per_rank = launch(_throughput_worker, p, variants=["plain", "pipeoptim"],
                          rounds=args.rounds, blocks=blocks, dim=dim, n=n, mb=mb,
                          steps=args.steps, optimizer=args.optimizer[0])
        for v in ("pipeoptim", "plain"):
            t = statistics.median(max(ts) for ts in zip(*(r[v]["times"] for r in per_rank)))
            busy = statistics.mean(statistics.median(r[v]["busy"]) for r in per_rank)
            rows.append({"ranks": p, "variant": v, "samples_per_s": samples / t,
                         "speedup": single[v] / t, "bubble": 1.0 - busy,
                         "bubble_theory": (p - 1) / (n + p - 1),
                         "oversubscribed": p > (info["cores"] or 1)})
    for r in rows:
        print(r)
    info["load_average_end"] = round(os.getloadavg()[0], 2)
    result = {"machine": info, "config": {"blocks": blocks, "dim": dim, "microbatches": n,
                                          "microbatch_size": mb, "optimizer": args.optimizer[0]},
              "throughput": rows}
    path = _out(args, THROUGHPUT_OUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="PredictiveStage overhead (default) or pipeline "
                                 "throughput")
    ap.add_argument("--what", choices=["overhead", "throughput"], default="overhead")
    ap.add_argument("--stage", choices=list(STAGES), nargs="+", default=list(STAGES))
    ap.add_argument("--optimizer", choices=["fused", "default"], nargs="+",
                    default=["fused", "default"],
                    help="AdamW(fused=True) or torch's default AdamW")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS[1:]),
                    help="methods to compare with the plain stage (always measured)")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="overhead: gloo ranks on the CPU, or NCCL ranks on the visible GPUs "
                         "(2 if there are 2 or more, else 1 process)")
    ap.add_argument("--world", type=int, default=2, choices=[1, 2],
                    help="overhead on CPU: ranks (1: one process, the stage is the pipeline)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (variants interleaved)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--out", default=None, help="result file, merged into if it exists "
                    "(default: benchmarks/results/pipeline_overhead.json, or "
                    "pipeline_throughput.json, or a new dated file beside it if that exists)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round of 1 + 2 steps, 4 micro-batches, one stage and "
                         "optimizer unless given, into a temporary file unless --out is given")
    ap.add_argument("--dim", type=int, default=1024, help="throughput: width of the blocks")
    ap.add_argument("--blocks", type=int, default=4, help="throughput: blocks of the model")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4],
                    help="throughput: pipeline sizes")
    args = ap.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        args.rounds, args.warmup, args.steps, args.microbatches = 1, 1, 2, 4
        if "--stage" not in given:
            args.stage = ["mlp"]
        if "--optimizer" not in given:
            args.optimizer = ["fused"]
        args.ranks = [2]
    for name, value in (("rounds", args.rounds), ("steps", args.steps),
                        ("microbatches", args.microbatches)):
        if value < 1:
            ap.error(f"--{name} must be >= 1, got {value}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    for v in args.variants:
        if v != "plain":
            try:
                method_of(v)
            except (KeyError, ValueError) as e:
                ap.error(f"--variants: {e}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.what == "throughput":
        return throughput(args)
    return overhead(args)


if __name__ == "__main__":
    main()
