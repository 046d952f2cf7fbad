"""Peak memory and time of ``predict_()`` with the chunked engine, against the former engine.

The engine processes each (group, device, dtype) bucket in chunks of at most
``min(CHUNK_BYTES, total / CHUNK_FRACTION)`` parameter bytes (`predictopt.prediction`), so a
rule's temporaries (Adam's denominators, RAdam's rectified directions) exist for one chunk at a
time. Three variants of the same library call are compared, interleaved inside every round
(the order rotates from round to round, so load from other processes and allocator warm-up hit
all of them alike):

* ``chunked``: the default;
* ``bucket``: one chunk per bucket (``CHUNK_BYTES = 2**62``, ``CHUNK_FRACTION = 1``), the former
  engine and the **baseline** every ratio is taken against, measured in the same run;
* ``per-tensor``: one chunk per tensor (``CHUNK_BYTES = 1``), a per-parameter loop.

All three give the same bits (checked at start, with ``torch.equal``). Figures per variant:
the peak bytes allocated by torch above the state before the call, while ``predict_()`` runs
(the saved copy included; CPU: allocator events of the torch profiler, CUDA:
``torch.cuda.max_memory_allocated``), in units of the parameters' bytes; the wall time of
``predict_()`` + ``restore_()``. Medians over the rounds with min and max.

Models: ``transformer`` (a GPT-2-small-like stack: embedding 8192 x 768 and 6 blocks of
``Linear(768, 2304)``, ``Linear(768, 768)``, ``Linear(768, 3072)``, ``Linear(3072, 768)`` and two
LayerNorms: 48.8M parameters in 73 tensors) and ``many-small`` (2000 tensors of 4096 parameters:
foreach kernels matter here). Optimizers: AdamW, RAdam, SGD with momentum.

Run: ``python -m benchmarks.bench_predict_memory [--rounds N] [--models ...] [--device cpu]``;
writes ``benchmarks/results/predict_memory_<device>.json`` (every sample, machine and date).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from predictopt import PredictiveOptimizer, prediction

try:  # python -m benchmarks.bench_predict_memory
    from benchmarks.bench_predict import (
        _peak_bytes_cpu,
        _peak_bytes_cuda,
        machine_info,
        machine_line,
        sync,
        write_report,
    )
except ImportError:  # python benchmarks/bench_predict_memory.py
    from bench_predict import (  # type: ignore[no-redef]
        _peak_bytes_cpu,
        _peak_bytes_cuda,
        machine_info,
        machine_line,
        sync,
        write_report,
    )

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "bucket"
VARIANTS = {"chunked": None, "bucket": (2**62, 1), "per-tensor": (1, 1)}


def transformer(d: int = 768, layers: int = 6, vocab: int = 8192) -> nn.Module:
    blocks: list[nn.Module] = [nn.Embedding(vocab, d)]
    for _ in range(layers):
        blocks += [nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d),
                   nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]
    return nn.Sequential(*blocks)


def many_small(n: int = 2000, size: int = 4096) -> nn.Module:
    return nn.ParameterList([nn.Parameter(torch.randn(size)) for _ in range(n)])


MODELS: dict[str, Callable[[], nn.Module]] = {"transformer": transformer,
                                              "many-small": many_small}
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-3, foreach=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True),
}


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Set the engine's chunk size for ``name`` (see the module docstring)."""
    setting = VARIANTS[name]
    old = prediction.CHUNK_BYTES, prediction.CHUNK_FRACTION
    if setting is not None:
        prediction.CHUNK_BYTES, prediction.CHUNK_FRACTION = setting
    try:
        yield
    finally:
        prediction.CHUNK_BYTES, prediction.CHUNK_FRACTION = old


def check_same_bits(popt: PredictiveOptimizer) -> None:
    params = [p for g in popt.param_groups for p in g["params"]]
    ref = None
    for name in VARIANTS:
        with variant(name), popt.predicted():
            got = [p.detach().clone() for p in params]
        if ref is None:
            ref = got
        elif not all(torch.equal(a, b) for a, b in zip(ref, got)):
            raise AssertionError(f"variant {name} predicts other bits")


def run_case(model_name: str, opt_name: str, rounds: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device)
    params = list(model.parameters())
    popt = PredictiveOptimizer(OPTIMIZERS[opt_name](params), steps=1, calibrate=False)
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-2)
    for _ in range(7):  # RAdam turns adaptive at step 6
        popt.step()
    check_same_bits(popt)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    peak_of = ((lambda f: _peak_bytes_cuda(f, device)) if device.type == "cuda"
               else _peak_bytes_cpu)
    names = list(VARIANTS)
    ms: dict[str, list[float]] = {n: [] for n in names}
    peak: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            with variant(name):
                sync(device)
                t0 = time.perf_counter()
                popt.predict_()
                popt.restore_()
                sync(device)
                elapsed = (time.perf_counter() - t0) * 1e3
                bytes_, _ = peak_of(popt.predict_)
                popt.restore_()
            if r > 0:
                ms[name].append(elapsed)
                peak[name].append((bytes_ or 0) / param_bytes)
    base_ms = statistics.median(ms[BASELINE])
    base_peak = statistics.median(peak[BASELINE])
    return {
        "model": model_name, "optimizer": opt_name, "tensors": len(params),
        "params": sum(p.numel() for p in params), "param_bytes": param_bytes,
        "samples_ms": ms, "samples_peak_over_params": peak,
        "median_ms": {n: statistics.median(v) for n, v in ms.items()},
        "min_ms": {n: min(v) for n, v in ms.items()},
        "max_ms": {n: max(v) for n, v in ms.items()},
        "median_peak_over_params": {n: statistics.median(v) for n, v in peak.items()},
        "time_vs_baseline": {n: statistics.median(v) / base_ms for n, v in ms.items()},
        "peak_vs_baseline": {n: statistics.median(v) / base_peak for n, v in peak.items()},
    }


def table(results: list[dict]) -> str:
    lines = ["| model | optimizer | variant | peak / params | peak / bucket | predict+restore ms "
             "median (min-max) | time / bucket |", "|" + "---|" * 7]
    for r in results:
        for n in VARIANTS:
            lines.append(
                f"| {r['model']} | {r['optimizer']} | {n} "
                f"| {r['median_peak_over_params'][n]:.3f} | {r['peak_vs_baseline'][n]:.2f} "
                f"| {r['median_ms'][n]:.1f} ({r['min_ms'][n]:.1f}-{r['max_ms'][n]:.1f}) "
                f"| {r['time_vs_baseline'][n]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS),
                    default=list(OPTIMIZERS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info(device)
    t0 = time.perf_counter()
    results = [run_case(m, o, args.rounds, device) for m in args.models for o in args.optimizers]
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"# predict_ memory and time, chunked vs bucket engine (median of {args.rounds} "
          f"rounds, chunks of min({prediction.CHUNK_BYTES >> 20} MiB, total / "
          f"{prediction.CHUNK_FRACTION}))")
    print(machine_line(info))
    print()
    print(table(results))
    report = {"machine": info, "config": {k: str(v) for k, v in vars(args).items()},
              "chunk_bytes": prediction.CHUNK_BYTES, "chunk_fraction": prediction.CHUNK_FRACTION,
              "baseline": BASELINE, "results": results}
    print()
    write_report(args.out or RESULTS / f"predict_memory_{args.device}.json", report)
    return report


if __name__ == "__main__":
    main()
