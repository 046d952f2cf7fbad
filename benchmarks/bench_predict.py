"""Cost of ``predict_()`` + ``restore_()`` against one optimizer step and a per-parameter loop.

For each case (AdamW, SGD with momentum, plain SGD with the ``"observed"`` rule) on a stack of
``nn.Linear`` layers (~200 tensors, ~25M parameters with ``--size full``, ~2M with ``small``):

* ``step``: one ``optimizer.step()`` of the bare optimizer with ``foreach=True``;
* ``fused AdamW step``: one step of ``AdamW(..., fused=True)`` on the same parameters (the
  yardstick of issue 11: predict_+restore_ should cost at most half of it on CPU);
* ``sqrt``: ``torch.sqrt`` of that fused optimizer's second moments into one scratch buffer,
  tensor by tensor: the one pass any Adam-style prediction needs (its denominator
  sqrt(v)/r + eps) whatever its kernels, so a floor under an Adam rule's cost;
* ``copy(v)``: the same moments copied into that buffer: the same bytes read and written, the
  memory traffic alone (``sqrt`` above it: the square root is compute-bound here);
* ``wrapped step``: ``PredictiveOptimizer(calibrate=False).step()`` (differs only for rules that
  record updates);
* ``calibrated step``: ``step()`` of the default, calibrated wrapper (``s = 1``: one calibration
  sample per step: an uncalibrated prediction and three float64 inner products);
* ``predict_`` / ``restore_`` of `predictopt.PredictiveOptimizer`;
* ``loop``: the same prediction written per parameter in Python, in the style of the original
  research code (read the state, compute the direction, clone ``p``, ``p.sub_``; restore by
  copying back).

All variants are timed round-robin inside every repeat (so load from other processes hits all of
them alike); the table reports medians and ratios against the foreach step of the same run.
Memory: bytes of the saved real weights (held while predicted) and the peak extra bytes allocated
during ``predict_`` (CUDA: ``torch.cuda.max_memory_allocated``; CPU: allocator events of the
torch profiler).

Results go to ``--out``; by default to ``benchmarks/results/predict_cost_<device>.json``, or,
where that file exists already, to a new file beside it named with the date (`fresh_path`), so a
run never overwrites committed figures unless asked to. ``tools/gen_docs.py`` renders the docs'
table from ``predict_cost_cpu.json``.

Run: ``python -m benchmarks.bench_predict [--device cpu|cuda] [--size small|full] [--repeats N]
[--out PATH]`` (``--size small --repeats 3`` for a quick check).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from predictopt import PredictiveOptimizer, coefficients
from predictopt.rules import OBSERVED_KEY

RESULTS = Path(__file__).resolve().parent / "results"
# (layers, width): every layer holds width*width + width parameters, in two tensors.
SIZES = {"small": (100, 140), "full": (100, 500)}

Saved = list[tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------
# Per-parameter reference implementations (research-code style)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def loop_predict_adam(opt: torch.optim.Optimizer, steps: int) -> Saved:
    """Adam/AdamW: ``w_hat = a w - C m_hat / (sqrt(v_hat) + eps)``, one parameter at a time."""
    saved = []
    for group in opt.param_groups:
        beta1, beta2 = group["betas"]
        decay = group["weight_decay"] if group.get("decoupled_weight_decay") else 0.0
        a, c = coefficients([group["lr"]] * steps, decay)
        for p in group["params"]:
            state = opt.state[p]
            t = state["step"].item()
            m_hat = state["exp_avg"] / (1 - beta1**t)
            v_hat = state["exp_avg_sq"] / (1 - beta2**t)
            direction = m_hat / (v_hat.sqrt() + group["eps"])
            saved.append((p, p.detach().clone()))
            if a != 1.0:
                p.mul_(a)
            p.sub_(direction, alpha=c)
    return saved


@torch.no_grad()
def _loop_predict_buffer(opt: torch.optim.Optimizer, steps: int, key: str) -> Saved:
    saved = []
    for group in opt.param_groups:
        c = steps * group["lr"]
        for p in group["params"]:
            buf = opt.state[p].get(key)
            if buf is None:
                continue
            saved.append((p, p.detach().clone()))
            p.sub_(buf, alpha=c)
    return saved


def loop_predict_momentum(opt: torch.optim.Optimizer, steps: int) -> Saved:
    """SGD with momentum: ``w_hat = w - s lr b``, one parameter at a time."""
    return _loop_predict_buffer(opt, steps, "momentum_buffer")


def loop_predict_observed(opt: torch.optim.Optimizer, steps: int) -> Saved:
    """The observed rule: ``w_hat = w - s lr d_bar``, one parameter at a time."""
    return _loop_predict_buffer(opt, steps, OBSERVED_KEY)


@torch.no_grad()
def loop_restore(saved: Saved) -> None:
    for p, real in saved:
        p.copy_(real)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    loop: Callable[[torch.optim.Optimizer, int], Saved]
    rule: str | None = None


CASES = [
    Case("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True),
         loop_predict_adam),
    Case("sgd-momentum",
         lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True),
         loop_predict_momentum),
    # plain SGD with its own rule: the average is recorded from the gradients (no snapshot)
    Case("sgd-plain", lambda ps: torch.optim.SGD(ps, lr=1e-2, foreach=True),
         loop_predict_observed),
    # the generic rule any optimizer gets: the average is recorded from a weight snapshot
    Case("sgd-observed", lambda ps: torch.optim.SGD(ps, lr=1e-2, foreach=True),
         loop_predict_observed, rule="observed"),
]


def build_model(size: str, device: torch.device) -> nn.Module:
    layers, width = SIZES[size]
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)


def fill_grads(params: list[nn.Parameter]) -> None:
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """(milliseconds, minor page faults) of one call."""
    sync(device)
    f0 = minor_faults()
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, minor_faults() - f0


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------------------------
# Checks and measurements
# ---------------------------------------------------------------------------------------------
def check_equivalence(popt: PredictiveOptimizer, case: Case, steps: int) -> float:
    """Max relative difference between the library's and the loop's predicted weights;
    also asserts both restores are bit-exact."""
    params = [p for g in popt.param_groups for p in g["params"]]
    real = [p.detach().clone() for p in params]
    popt.predict_(steps)
    ours = [p.detach().clone() for p in params]
    popt.restore_()
    saved = case.loop(popt.optimizer, steps)
    theirs = [p.detach().clone() for p in params]
    loop_restore(saved)
    for p, r in zip(params, real):
        if not torch.equal(p, r):
            raise AssertionError("restore is not bit-exact")
    worst = 0.0
    for a, b, r in zip(ours, theirs, real):
        moved = (a - r).abs().max().item()
        if moved > 0:
            worst = max(worst, (a - b).abs().max().item() / moved)
    return worst


VARIANTS = ["step", "fused_step", "sqrt", "copy_v", "wrapped_step", "calibrated_step", "predict",
            "restore", "loop"]


def time_case(opt: torch.optim.Optimizer, popt: PredictiveOptimizer, case: Case, steps: int,
              repeats: int, warmup: int, device: torch.device
              ) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Round-robin timings (ms) and minor page faults of every variant, ``repeats`` each."""
    calibrated = PredictiveOptimizer(opt, steps=steps, rule=case.rule)
    params = [p for g in opt.param_groups for p in g["params"]]
    fused = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    fused.step()  # its state exists before the timing
    moments = [fused.state[p]["exp_avg_sq"] for p in params]
    scratch = torch.empty(max(v.numel() for v in moments), device=device)

    def sqrt_floor() -> None:
        for v in moments:
            torch.sqrt(v, out=scratch[: v.numel()].view(v.shape))

    def copy_floor() -> None:
        for v in moments:
            scratch[: v.numel()].view(v.shape).copy_(v)

    calls: dict[str, Callable[[], object]] = {
        "step": opt.step,
        "fused_step": fused.step,
        "sqrt": sqrt_floor,
        "copy_v": copy_floor,
        "wrapped_step": popt.step,
        "calibrated_step": calibrated.step,
        "predict": lambda: popt.predict_(steps),
        "restore": popt.restore_,
        "loop": lambda: loop_restore(case.loop(opt, steps)),
    }
    ms: dict[str, list[float]] = {n: [] for n in VARIANTS + ["predict_restore"]}
    faults: dict[str, list[int]] = {n: [] for n in VARIANTS}
    for i in range(warmup + repeats):
        row = {n: timed(calls[n], device) for n in VARIANTS}
        if i < warmup:
            continue
        for n in VARIANTS:
            ms[n].append(row[n][0])
            faults[n].append(row[n][1])
        ms["predict_restore"].append(row["predict"][0] + row["restore"][0])
    return ms, faults


def _peak_bytes_cpu(fn: Callable[[], object]) -> tuple[int | None, int | None]:
    """(peak, net) bytes allocated by torch on the CPU while ``fn`` runs (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                     profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # private profiler API; the figure is optional
        return None, None
    return allocator_peak(events)


def allocator_peak(events: list[Any]) -> tuple[int, int]:
    """(peak, net) of the running sum of the CPU allocator's memory events, in time order."""
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if str(e.device_type()).endswith("CPU"):
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak, cur


def fresh_path(default: Path, out: Path | str | None = None) -> Path:
    """Where a benchmark writes: ``out`` when given (it may replace a file: asked for), else
    ``default`` unless it exists, else a new file beside it named with the date and time
    (``predict_cost_cpu-20261205-1412.json``), so that committed results are never overwritten
    by default."""
    if out is not None:
        return Path(out)
    if not default.exists():
        return default
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return default.with_name(f"{default.stem}-{stamp}{default.suffix}")


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write a benchmark's JSON report to ``out`` (creating its folder) and say so."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def _peak_bytes_cuda(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base,
            torch.cuda.memory_allocated(device) - base)


def measure_memory(popt: PredictiveOptimizer, case: Case, steps: int,
                   device: torch.device) -> dict[str, float | int | None]:
    """Bytes held while predicted and peak extra bytes during the prediction, both ways."""
    params = [p for g in popt.param_groups for p in g["params"]]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    measure = ((lambda f: _peak_bytes_cuda(f, device)) if device.type == "cuda"
               else _peak_bytes_cpu)
    peak, held = measure(lambda: popt.predict_(steps))
    saved_bytes = sum(t.numel() * t.element_size() for _, real in popt._saved for t in real)
    popt.restore_()
    holder: list[Saved] = []
    loop_peak, _ = measure(lambda: holder.append(case.loop(popt.optimizer, steps)))
    loop_restore(holder.pop())
    return {
        "param_bytes": param_bytes,
        "saved_bytes": saved_bytes,
        "saved_over_params": saved_bytes / param_bytes,
        "peak_extra_bytes": peak,
        "peak_extra_over_params": _over(peak, param_bytes),
        "held_after_predict_bytes": held,
        "loop_peak_extra_over_params": _over(loop_peak, param_bytes),
    }


def _over(x: int | None, total: int) -> float | None:
    return None if x is None else x / total


def print_profile(popt: PredictiveOptimizer, case: Case, steps: int) -> None:
    """The torch profiler's top operators of predict_+restore_ and of the loop."""
    from torch.profiler import ProfilerActivity, profile

    for label, fn in [("predict_+restore_", lambda: (popt.predict_(steps), popt.restore_())),
                      ("loop", lambda: loop_restore(case.loop(popt.optimizer, steps)))]:
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n## {case.name}: {label}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict:
    model = build_model(args.size, device)
    params = list(model.parameters())
    opt = case.make(params)
    popt = PredictiveOptimizer(opt, steps=args.steps, rule=case.rule, calibrate=False)
    fill_grads(params)
    for _ in range(3):  # populate the state (and the observed average)
        popt.step()
    mismatch = check_equivalence(popt, case, args.steps)
    memory = measure_memory(popt, case, args.steps, device)
    samples, faults = time_case(opt, popt, case, args.steps, args.repeats, args.warmup, device)
    if args.profile:
        print_profile(popt, case, args.steps)
    return {
        "case": case.name,
        "tensors": len(params),
        "params": sum(p.numel() for p in params),
        "median_ms": {k: statistics.median(v) for k, v in samples.items()},
        "min_ms": {k: min(v) for k, v in samples.items()},
        "samples_ms": samples,
        "median_minor_faults": {k: statistics.median(v) for k, v in faults.items()},
        "loop_vs_library_max_rel_diff": mismatch,
        "memory": memory,
    }


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (`predictopt.study.machine`)."""
    from predictopt.study import machine

    return machine()["cpu"]


def machine_info(device: torch.device) -> dict[str, object]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "load_average_at_start": _load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load_average() -> float | None:
    """The 1-minute load average (other processes compete for the same cores)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_line(info: dict[str, object]) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"{info['date']}: {info['cpu']} ({info['cores']} cores available, torch threads "
            f"{info['torch_threads']}){gpu}, torch {info['torch']}, Python {info['python']}, "
            f"load average {info['load_average_at_start']} at start")


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def timing_table(results: list[dict]) -> str:
    head = ("| case | step ms | fused AdamW step ms | sqrt(v) ms | copy(v) ms | wrapped step ms "
            "| calibrated step ms "
            "| predict_ ms | restore_ ms | predict+restore ms | (p+r) / step "
            "| (p+r) / fused AdamW step | loop ms | loop / (p+r) "
            "| page faults (k): step, p+r, loop |")
    lines = [head, "|" + "---|" * 15]
    for r in results:
        m, f = r["median_ms"], r["median_minor_faults"]
        pr = m["predict_restore"]
        faults = ", ".join(f"{x / 1e3:.0f}" for x in
                           (f["step"], f["predict"] + f["restore"], f["loop"]))
        lines.append(
            f"| {r['case']} | {m['step']:.1f} | {m['fused_step']:.1f} | {m['sqrt']:.1f} "
            f"| {m['copy_v']:.1f} "
            f"| {m['wrapped_step']:.1f} "
            f"| {m['calibrated_step']:.1f} | {m['predict']:.1f} "
            f"| {m['restore']:.1f} | {pr:.1f} | {pr / m['step']:.2f} "
            f"| {pr / m['fused_step']:.2f} | {m['loop']:.1f} "
            f"| {m['loop'] / pr:.2f} | {faults} |"
        )
    return "\n".join(lines)


def memory_table(results: list[dict]) -> str:
    lines = ["| case | param MB | saved copy MB | saved / params | peak extra in predict_ / params "
             "| loop peak extra / params |", "|" + "---|" * 6]
    for r in results:
        mem = r["memory"]
        lines.append(
            f"| {r['case']} | {mem['param_bytes'] / 2**20:.1f} | {mem['saved_bytes'] / 2**20:.1f} "
            f"| {mem['saved_over_params']:.2f} | {_fmt_ratio(mem['peak_extra_over_params'])} "
            f"| {_fmt_ratio(mem['loop_peak_extra_over_params'])} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    ap.add_argument("--steps", type=int, default=1, help="prediction horizon s")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default). 1 keeps timings stable on a "
                         "shared machine, where OpenMP barriers stall whenever a core is taken")
    ap.add_argument("--cases", nargs="+", choices=[c.name for c in CASES],
                    default=[c.name for c in CASES])
    ap.add_argument("--profile", action="store_true",
                    help="also print the profiler's top operators of each variant")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default: benchmarks/results/predict_cost_<device>.json, or "
                         "a new dated file beside it if that exists)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info(device)
    results = []
    for case in CASES:
        if case.name in args.cases:
            results.append(run_case(case, args, device))
    r0 = results[0]
    print(f"# predict_+restore_ benchmark ({args.size}: {r0['tensors']} tensors, "
          f"{r0['params'] / 1e6:.1f}M parameters, s={args.steps}, median of {args.repeats})")
    print(machine_line(info))
    print()
    print(timing_table(results))
    print()
    print(memory_table(results))
    report = {"machine": info, "config": {k: str(v) for k, v in vars(args).items()},
              "results": results}
    print()
    write_report(fresh_path(RESULTS / f"predict_cost_{args.device}.json", args.out), report)
    return report


if __name__ == "__main__":
    main()
