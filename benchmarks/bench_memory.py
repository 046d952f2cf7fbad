r"""Memory each pipeline method holds: weight versions per in-flight micro-batch vs two copies.

`PipelineSimulator` (one process, the same :class:`~predictopt.pipeline.StageWorker` per stage as
a distributed run) trains a ``K``-stage MLP whose weights dominate memory (every stage
``Linear(W, W) -> GELU -> Linear(W, W)``, micro-batches of 2 samples: activations are a
thousandth of the weights) under ``Schedule1F1B`` with ``n`` micro-batches and AdamW (or SGD
with momentum). Every method runs in a **fresh subprocess** (no peak or allocator state carries
over from another method). In each, the optimizer state is created before the simulator is
built (one zero-gradient step per stage), so the *baseline* is exactly the model's weights plus
the optimizer state; everything a method allocates afterwards (gradients, stashed or predicted
weights, a previous version, optimizer temporaries, activations) counts as its extra memory, and
the figure is the **peak extra** over ``--steps`` training steps, in MiB and in units of one
copy of the whole model's weights (``model copies``), with the ratio against ``sequential``
measured in the same run.

Three independent measures of the peak:

* ``allocator`` (the reported one): every allocation and free of torch's CPU allocator during
  the steps, from the torch profiler's memory events (``profile_memory=True``), summed in time
  order; exact and deterministic (the same bytes on every run);
* ``live tensors`` (cross-check, and the per-stage figures): a ``TorchDispatchMode`` that sees
  every op's output, counts each new tensor storage once (outputs sharing an input's storage,
  i.e. views and in-place ops, are not new) with the stage whose ``forward``/``backward`` was
  running, and a ``weakref.finalize`` on the storage subtracts it when the storage dies.
  Per-stage figures are in units of one copy of *that stage's* weights;
* ``RSS`` (cross-check that sees all memory, torch's or not): the peak resident set
  (``VmHWM``, reset through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is
  unavailable) minus the resident set at the baseline, with glibc's mmap threshold pinned
  (``MALLOC_MMAP_THRESHOLD_``) so that freed weight-sized blocks go back to the kernel. It runs
  first in the method's process, on its own simulator, after one step of the same
  configuration at width 16 (imports and kernel code pages resident before the baseline);
  the other two measures then run on a newly built simulator. ``--rss-repeats`` > 1 adds
  processes measuring only RSS (median reported).

``stash bound`` is what the schedule implies for a method that keeps one copy of all the
stage's weights per in-flight micro-batch (``pipedream``, ``spectrain``, ``pipeoptim``,
``xpipe``): walking the simulator's action order, the micro-batches of each stage in flight whose
staleness is positive (they run on a copy; ``s = 0`` ones alias the real weights), per stage the
most at once (under 1F1B ``K - k`` for stage ``k < K - 1``, 0 for the last stage) and in total the
most bytes held at once over all stages, in model copies. The measured stash stays below it:
forwards between the same two updates share one copy (the warm-up), and a copy lives only as long
as autograd holds it, i.e. for the weights the backward reads (a bias is not saved, nor the first
stage's first weight matrix, whose input needs no gradient). It is 0 for ``pipeoptim-lean``,
whose predictions live only during their forward, and for ``sequential`` and ``gpipe`` (no
staleness).

``--methods`` (default: all) selects the methods.

Run: ``python -m benchmarks.bench_memory [--width W] [--stages K] [--microbatches N]
[--optimizer adamw|sgd] [--methods ...]`` (or ``python benchmarks/bench_memory.py``); writes
``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from predictopt.pipeline import DEFAULT_METHOD, LEAN_METHODS, PipelineSimulator

try:  # python -m benchmarks.bench_memory
    from benchmarks.bench_predict import (
        allocator_peak,
        machine_info,
        machine_line,
        quiet_stderr,
        write_report,
    )
except ImportError:  # python benchmarks/bench_memory.py
    from bench_predict import (  # type: ignore[no-redef]
        allocator_peak,
        machine_info,
        machine_line,
        quiet_stderr,
        write_report,
    )

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["sequential", "gpipe", "pipedream", "pipedream-2bw", "spectrain", "xpipe", "pipeoptim",
           "pipeoptim-lean", DEFAULT_METHOD]
ALL_METHODS = METHODS
BASELINE = "sequential"
MiB = 2**20
# glibc: serve (and return) every block of 128 KiB or more with mmap, not from a heap that
# keeps freed memory resident (the default threshold grows with the blocks freed).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# Model, optimizer and simulator
# ---------------------------------------------------------------------------------------------


def make_stages(stages: int, width: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
            for _ in range(stages)]


def optimizer_factory(name: str) -> Callable[[Any], torch.optim.Optimizer]:
    """``params -> optimizer`` whose state already exists (one step on zero gradients), so
    the state is part of the baseline, not of the method's extra memory."""

    def make(params: Any) -> torch.optim.Optimizer:
        params = list(params)
        if name == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        else:
            opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return opt

    return make


def build(cfg: dict[str, Any]) -> tuple[PipelineSimulator, Tensor, Tensor]:
    stages = make_stages(cfg["stages"], cfg["width"])
    sim = PipelineSimulator(stages, optimizer_factory(cfg["optimizer"]), method=cfg["method"],
                            schedule="1F1B", n_microbatches=cfg["microbatches"],
                            loss_fn=F.mse_loss)
    gen = torch.Generator().manual_seed(1)
    batch = cfg["microbatches"] * cfg["microbatch_size"]
    x = torch.randn(batch, cfg["width"], generator=gen)
    y = torch.randn(batch, cfg["width"], generator=gen)
    return sim, x, y


def stage_bytes(sim: PipelineSimulator) -> list[int]:
    return [sum(p.numel() * p.element_size() for p in m.parameters()) for m in sim.stages]


def expected_stash(sim: PipelineSimulator) -> tuple[list[int], int]:
    """Weight copies a method holds when every in-flight micro-batch keeps its version: per
    stage, the most micro-batches with ``s > 0`` in flight at once (``s = 0`` ones alias the
    real weights), and the most bytes of such copies over all stages at once."""
    inflight: list[set[int]] = [set() for _ in sim.stages]
    sizes = stage_bytes(sim)
    most = [0] * len(sim.stages)
    total = 0
    for a in sim.order:
        k, i = a.stage, a.microbatch
        if a.kind == "F":
            inflight[k].add(i)
        elif a.kind in ("B", "W"):
            inflight[k].discard(i)
        now = [sum(1 for j in fl if sim.staleness[s][j] > 0) for s, fl in enumerate(inflight)]
        most = [max(m, c) for m, c in zip(most, now)]
        total = max(total, sum(c * b for c, b in zip(now, sizes)))
    return most, total


# ---------------------------------------------------------------------------------------------
# Measures (run inside a child process)
# ---------------------------------------------------------------------------------------------


class LiveStorages(TorchDispatchMode):
    """Bytes of the tensor storages created while active and still alive, in total and per tag.

    A storage is new when an op returns it and it is not the storage of one of the op's tensor
    inputs (views, in-place and ``out=`` ops return those); it is counted once, under the
    current ``tag``, until a ``weakref.finalize`` on it fires (torch keeps a storage's Python
    object alive as long as the storage itself, so the finalizer fires when the memory is
    freed). The ops autograd runs in ``backward`` pass through the mode as well.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tag = -1
        self.live = 0
        self.peak = 0
        self.live_by: dict[int, int] = {}
        self.peak_by: dict[int, int] = {}
        self._seen: set[int] = set()  # ids of live tracked storages

    def _freed(self, key: int, tag: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes
        self.live_by[tag] -= nbytes

    def _track(self, st: torch.UntypedStorage) -> None:
        key, nbytes = id(st), st.nbytes()
        if key in self._seen or nbytes == 0:
            return
        self._seen.add(key)
        tag = self.tag
        weakref.finalize(st, self._freed, key, tag, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.live_by[tag] = self.live_by.get(tag, 0) + nbytes
        self.peak_by[tag] = max(self.peak_by.get(tag, 0), self.live_by[tag])

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                if st.data_ptr() not in inputs:
                    self._track(st)
        return out


@contextmanager
def tagged(sim: PipelineSimulator, mode: LiveStorages) -> Iterator[None]:
    """Set ``mode.tag`` to the stage whose worker call is running."""
    names = ("forward", "backward", "backward_input", "backward_weight")
    for k, w in enumerate(sim.workers):
        for name in names:
            fn = getattr(w, name)

            def wrapper(*a: Any, _fn: Any = fn, _k: int = k, **kw: Any) -> Any:
                prev, mode.tag = mode.tag, _k
                try:
                    return _fn(*a, **kw)
                finally:
                    mode.tag = prev

            setattr(w, name, wrapper)
    try:
        yield
    finally:
        for w in sim.workers:
            for name in names:
                delattr(w, name)


def run_steps(sim: PipelineSimulator, x: Tensor, y: Tensor, steps: int) -> None:
    for _ in range(steps):
        sim.step(x, y)


def warm_up(cfg: dict[str, Any]) -> None:
    """One step of the same configuration at width 16: imports, lazy initialisations and the
    code pages of every kernel used are resident before the RSS baseline is taken."""
    sim, x, y = build({**cfg, "width": 16})
    run_steps(sim, x, y, 1)
    del sim, x, y
    gc.collect()


def measure_allocator(cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak extra bytes from the profiler's allocator events and from :class:`LiveStorages`."""
    from torch.profiler import ProfilerActivity, profile

    sim, x, y = build(cfg)
    gc.collect()
    mode = LiveStorages()
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with mode, tagged(sim, mode):
            run_steps(sim, x, y, cfg["steps"])
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    peak, net = allocator_peak(events)
    stash, stash_total = expected_stash(sim)
    if cfg["method"] in LEAN_METHODS:  # forward-time predictions only, no version kept
        stash, stash_total = [0] * len(stash), 0
    return {"allocator_peak": peak, "allocator_net": net, "allocator_events": len(events),
            "live_peak": mode.peak, "live_net": mode.live,
            "live_peak_by_stage": [mode.peak_by.get(k, 0) for k in range(len(sim.stages))],
            "stage_bytes": stage_bytes(sim), "expected_stash": stash,
            "expected_stash_bytes": stash_total}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_rss(cfg: dict[str, Any]) -> dict[str, Any]:
    """Peak resident set during the steps minus the resident set at the baseline."""
    import resource

    sim, x, y = build(cfg)
    gc.collect()
    base = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        source = "VmHWM"
    except OSError:  # ru_maxrss is the process's peak so far: the warm-up and build included
        source = "ru_maxrss"
    run_steps(sim, x, y, cfg["steps"])
    peak = (_status_kib("VmHWM") if source == "VmHWM"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return {"rss_peak": (peak - base) * 1024, "rss_source": source}


def child(cfg: dict[str, Any]) -> None:
    """One method in this fresh process: RSS first (the process has seen nothing but the
    warm-up), then, on a newly built simulator, the allocator and live-tensor measures."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    warm_up(cfg)
    out = measure_rss(cfg)
    gc.collect()
    if cfg["measure"] == "all":
        out.update(measure_allocator(cfg))
    out["seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(out))


def spawn(cfg: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, **CHILD_ENV}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                           json.dumps(cfg)], capture_output=True, text=True, env=env,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{cfg['method']} ({cfg['measure']}) failed:\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1024, help="W of the Linear(W, W) layers")
    ap.add_argument("--stages", type=int, default=4, help="pipeline stages K")
    ap.add_argument("--microbatches", type=int, default=8, help="micro-batches per step n")
    ap.add_argument("--microbatch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="measured training steps")
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                    help="AdamW or SGD with momentum 0.9")
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=METHODS,
                    help=f"methods besides {BASELINE} (always run)")
    ap.add_argument("--rss-repeats", type=int, default=1,
                    help="processes per method for the RSS cross-check (median reported; the "
                         "allocator and live-tensor figures are deterministic)")
    ap.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def table(rows: list[dict[str, Any]], model: int) -> str:
    base = rows[0]["allocator_peak"]
    head = ("| method | peak extra MiB | model copies | / sequential | - sequential (copies) "
            "| stash bound (copies) | live tensors (copies) | RSS (copies) "
            "| per stage k: peak (stash), stage copies |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        per_stage = " / ".join(f"{b / s:.2f} ({c})" for b, s, c in
                               zip(r["live_peak_by_stage"], r["stage_bytes"],
                                   r["expected_stash"]))
        peak = r["allocator_peak"]
        lines.append(
            f"| {r['method']} | {peak / MiB:.1f} | {peak / model:.2f} | {peak / base:.2f} "
            f"| {(peak - base) / model:+.2f} | {r['expected_stash_bytes'] / model:.2f} "
            f"| {r['live_peak'] / model:.2f} | {r['rss_peak'] / model:.2f} | {per_stage} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return {}
    torch.set_num_threads(1)
    info = machine_info(torch.device("cpu"))
    t0 = time.perf_counter()
    common = {"stages": args.stages, "width": args.width, "microbatches": args.microbatches,
              "microbatch_size": args.microbatch_size, "steps": args.steps,
              "optimizer": args.optimizer}
    methods = [BASELINE] + [m for m in args.methods if m != BASELINE]
    rows = []
    for m in methods:
        row: dict[str, Any] = {"method": m, **spawn({**common, "method": m, "measure": "all"})}
        more = [spawn({**common, "method": m, "measure": "rss"})["rss_peak"]
                for _ in range(args.rss_repeats - 1)]
        row["rss_samples"] = [row["rss_peak"], *more]
        row["rss_peak"] = statistics.median(row["rss_samples"])
        rows.append(row)
    model = sum(rows[0]["stage_bytes"])
    base = rows[0]["allocator_peak"]
    for r in rows:
        r["model_copies"] = r["allocator_peak"] / model
        r["ratio_vs_sequential"] = r["allocator_peak"] / base
        r["excess_over_sequential_copies"] = (r["allocator_peak"] - base) / model
    elapsed = time.perf_counter() - t0
    opt = "AdamW" if args.optimizer == "adamw" else "SGD momentum 0.9"
    w = args.width
    print(f"# memory benchmark: {args.stages} stages of Linear({w},{w})-GELU-Linear({w},{w}) "
          f"({model / MiB:.0f} MiB of weights), 1F1B, {args.microbatches} micro-batches of "
          f"{args.microbatch_size}, {opt}, peak over {args.steps} steps, one process per method")
    print(machine_line(info))
    print()
    print(table(rows, model))
    print(f"\npeak extra: the CPU allocator's live bytes above weights + optimizer state, peak "
          f"over the steps (torch profiler memory events); model copies: / {model / MiB:.1f} "
          f"MiB; stash bound: most copies held at once by one version per in-flight "
          f"micro-batch with s > 0; live tensors: dispatch-mode storage tracker; RSS: VmHWM - "
          f"baseline VmRSS, median of {args.rss_repeats}; per stage k: peak live bytes "
          f"allocated by stage k's calls / its weights (stash bound). {elapsed:.0f} s")
    report = {"machine": info, "config": {k: (str(v) if isinstance(v, Path) else v)
                                          for k, v in vars(args).items() if k != "child"},
              "model_bytes": model, "baseline": BASELINE, "results": rows,
              "seconds": elapsed}
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
