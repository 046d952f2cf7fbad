r"""Prediction cost on a GPU against a fused AdamW step and against the memory-bandwidth limit.

For a GPT-2-small-sized set of tensors (124M parameters: the embedding, 12 blocks of attention
and MLP matrices with their biases and norms) in fp32 and in bf16, with a populated AdamW state:

* ``bandwidth``: the device's copy bandwidth, bytes read + written per second of a large
  ``copy_`` (median of the repeats): the yardstick of a memory-bound kernel;
* ``fused_step``: one ``AdamW(..., fused=True).step()``;
* ``predict``: `predictopt.predict` into a reused `predictopt.workspace.Workspace` (reads the
  weights and both moments, writes the prediction: 4 parameter-sized passes), against its
  limit ``4 x bytes / bandwidth``;
* ``predict_restore``: ``PredictiveOptimizer.predict_`` + ``restore_`` (copy out, predict in
  place, copy back: 8 passes), against ``8 x bytes / bandwidth``;
* the peak transient memory of ``predict_`` (``torch.cuda.max_memory_allocated``) in copies of
  the parameters.

Every figure is a median over ``--repeats`` CUDA-event timings after ``--warmup`` calls; the
variants are timed round-robin. Results go to ``benchmarks/results/gpu/predict_cost.json`` (a
new dated file beside it if that exists; ``--out`` to choose). Targets of issue 11: ``predict``
within 1.5x of its bandwidth limit, transient memory at most 1.25 copies.

Run (part of ``benchmarks/gpu.sh``): ``python -m benchmarks.bench_gpu [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:  # python -m benchmarks.bench_gpu
    from benchmarks.bench_predict import fresh_path, machine_info, write_report
except ImportError:  # python benchmarks/bench_gpu.py
    from bench_predict import fresh_path, machine_info, write_report  # type: ignore[no-redef]

OUT = Path(__file__).resolve().parent / "results" / "gpu" / "predict_cost.json"
#: Parameter-sized passes over memory of each variant (reads + writes).
PASSES = {"predict": 4, "predict_restore": 8}
TARGET_OVER_LIMIT = 1.5


def gpt2_shapes(vocab: int = 50257, ctx: int = 1024, d: int = 768,
                layers: int = 12) -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 small (tied embedding): 124.4M parameters."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def make_state(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device
               ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """Parameters of ``shapes`` and a fused AdamW with its state populated by two steps."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device, dtype=dtype))
              for s in shapes]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=dtype)
        opt.step()
    return params, opt


def cuda_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Bytes per second (read + written) of a ``copy_`` of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = statistics.median(cuda_ms(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * nbytes / (ms / 1e3)


def summarise(ms: dict[str, list[float]], param_bytes: int, bw: float) -> dict[str, Any]:
    """Medians, ratios against the fused step and against the bandwidth limit of each pass
    count (`PASSES`). Pure: tested on CPU."""
    med = {k: statistics.median(v) for k, v in ms.items()}
    out: dict[str, Any] = {"median_ms": med, "min_ms": {k: min(v) for k, v in ms.items()},
                           "max_ms": {k: max(v) for k, v in ms.items()}}
    for name, passes in PASSES.items():
        limit = passes * param_bytes / bw * 1e3
        out[f"{name}_limit_ms"] = limit
        out[f"{name}_over_limit"] = med[name] / limit
        out[f"{name}_over_fused_step"] = med[name] / med["fused_step"]
    return out


def run(dtype: torch.dtype, device: torch.device, repeats: int, warmup: int,
        bw: float) -> dict[str, Any]:
    from predictopt import PredictiveOptimizer, predict
    from predictopt.workspace import Workspace

    params, opt = make_state(gpt2_shapes(), dtype, device)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    popt = PredictiveOptimizer(opt, steps=1, calibrate=False)
    ws = Workspace()
    calls: dict[str, Callable[[], object]] = {
        "fused_step": opt.step,
        "predict": lambda: predict(opt, 1, workspace=ws),
        "predict_restore": lambda: (popt.predict_(1), popt.restore_()),
    }
    ms: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(warmup + repeats):
        for k, fn in calls.items():
            t = cuda_ms(fn, device)
            if i >= warmup:
                ms[k].append(t)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    popt.predict_(1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    popt.restore_()
    res = summarise(ms, param_bytes, bw)
    res.update({"dtype": str(dtype).removeprefix("torch."),
                "params": sum(p.numel() for p in params), "tensors": len(params),
                "param_bytes": param_bytes, "predict__peak_over_params": peak / param_bytes,
                "samples_ms": ms})
    return res


#: The header of the summary table (also rendered into docs/benchmarks.md by tools/gen_docs.py).
HEADER = ["| dtype | fused AdamW ms | predict ms | / bandwidth limit | / fused step | "
          "predict_+restore_ ms | / bandwidth limit | / fused step | peak / params |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]


def rows(results: list[dict[str, Any]]) -> list[str]:
    """The summary table's rows, one per dtype."""
    lines = []
    for r in results:
        m = r["median_ms"]
        lines.append(f"| {r['dtype']} | {m['fused_step']:.2f} | {m['predict']:.2f} | "
                     f"{r['predict_over_limit']:.2f} | {r['predict_over_fused_step']:.2f} | "
                     f"{m['predict_restore']:.2f} | {r['predict_restore_over_limit']:.2f} | "
                     f"{r['predict_restore_over_fused_step']:.2f} | "
                     f"{r['predict__peak_over_params']:.2f} |")
    return lines


def table(results: list[dict[str, Any]], bw: float) -> str:
    """The printed summary."""
    return "\n".join([f"device copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", *HEADER,
                      *rows(results)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"],
                    default=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default: benchmarks/results/gpu/predict_cost.json, or a "
                         "new dated file beside it if that exists)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: CUDA is not available (this benchmark needs a GPU)")
    device = torch.device("cuda", 0)
    info = machine_info(device)
    bw = bandwidth(device)
    results = []
    for d in args.dtypes:
        results.append(run(getattr(torch, d), device, args.repeats, args.warmup, bw))
        torch.cuda.empty_cache()
    print(table(results, bw))
    report = {"machine": info, "bandwidth_bytes_per_s": bw, "target_over_limit":
              TARGET_OVER_LIMIT, "config": {k: str(v) for k, v in vars(args).items()},
              "results": results}
    write_report(fresh_path(OUT, args.out), report)
    return report


if __name__ == "__main__":
    main()
