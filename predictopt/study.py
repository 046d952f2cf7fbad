r"""Convergence of pipeline methods on the language-model yardstick, over seeds.

One *run* trains :func:`predictopt.lm.lm_stages` with one method in the
:class:`~predictopt.pipeline.PipelineSimulator` (bit-exact to a distributed run) and records
the held-out loss every ``eval_every`` steps. The metrics, per method and seed:

* the held-out loss after ``steps`` steps (nats);
* the **iso-loss sample overhead**: the samples the method needs to reach the staleness-free
  run's (``sequential``, same seed) final held-out loss, divided by that run's samples. The
  first crossing of the method's held-out-loss curve below the target is interpolated linearly
  between evaluations; the other methods train up to ``horizon`` times as many steps so that
  overheads up to ``horizon`` can be measured, and a run that does not reach the target by
  then reports ``None`` ("never").

Across seeds the table reports the mean and sample standard deviation of the final loss, and
the mean overhead over the seeds that reached the target (with the count when some did not).
Results are cached one JSON line per run (:class:`RunCache`), so a study can be resumed and
extended; :func:`aggregate` and :func:`markdown_table` turn them into the tables of the docs.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .lm import TextData, lm_loss, lm_stages, load_text

__all__ = [
    "LMConfig",
    "RunCache",
    "corpus_of",
    "aggregate",
    "iso_loss_overhead",
    "make_lm_optimizer",
    "stage_optimizer",
    "markdown_table",
    "plot_curves",
    "run_lm",
    "machine",
    "LM_OPTIMIZERS",
    "LM_DEFAULT_LR",
]

#: Optimizers of the yardstick: AdamW (weight decay 0.01), momentum SGD (0.9), Muon
#: (momentum 0.95, Nesterov, ``adjust_lr_fn="match_rms_adamw"``, weight decay 0.01) for the
#: matrices of the transformer blocks with AdamW for the embeddings, the head, the biases and
#: the norms (a :class:`~predictopt.combined.CombinedOptimizer` per stage), and NAdam with
#: $\beta_1 = 0.99$ (decoupled weight decay 0.01; the optimizer of Ajanthan et al.'s code, one
#: of issue 10's measurements).
LM_OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd", "muon", "nadam")
#: Their default learning rates (AdamW, SGD and NAdam: the issue's settings; Muon's RMS-matched
#: update takes AdamW's rate).
LM_DEFAULT_LR: dict[str, float] = {"adamw": 3e-3, "sgd": 0.05, "muon": 3e-3, "nadam": 3e-3}


@dataclass(frozen=True)
class LMConfig:
    """One setting of the yardstick (everything but the method and the seed).

    Attributes:
        stages: Transformer blocks = pipeline stages.
        schedule: Pipeline schedule.
        optimizer: One of :data:`LM_OPTIMIZERS`.
        lr: Learning rate (``None``: :data:`LM_DEFAULT_LR`).
        microbatches: Micro-batches per step.
        microbatch_size: Sequences per micro-batch.
        context: Tokens per sequence.
        dim: Model width.
        heads: Attention heads.
        steps: Training steps of the staleness-free reference (and where the final loss is
            read for every method).
        horizon: The other methods train ``ceil(horizon * steps)`` steps (overheads up to
            ``horizon`` are measurable).
        eval_every: Steps between held-out evaluations.
        eval_sequences: Held-out sequences (a fixed set).
        corpus: Text file, or ``None`` for the default corpus.
        dropout: Dropout of the blocks.
    """

    stages: int = 8
    schedule: str = "1F1B"
    optimizer: str = "adamw"
    lr: float | None = None
    microbatches: int = 8
    microbatch_size: int = 8
    context: int = 64
    dim: int = 96
    heads: int = 4
    steps: int = 150
    horizon: float = 1.3
    eval_every: int = 5
    eval_sequences: int = 256
    corpus: str | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("stages", "microbatches", "microbatch_size", "context", "dim", "heads",
                     "steps", "eval_every", "eval_sequences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.optimizer not in LM_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(LM_OPTIMIZERS)}, got "
                             f"{self.optimizer!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0
                                        and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number or None, got {self.lr!r}")
        if not isinstance(self.horizon, (int, float)) or self.horizon < 1:
            raise ValueError(f"horizon must be a number >= 1, got {self.horizon!r}")

    @property
    def learning_rate(self) -> float:
        """The learning rate used."""
        return self.lr if self.lr is not None else LM_DEFAULT_LR[self.optimizer]

    @property
    def samples_per_step(self) -> int:
        """Sequences per step."""
        return self.microbatches * self.microbatch_size

    def key(self) -> str:
        """A stable identifier of the setting (for the cache)."""
        return json.dumps(asdict(self), sort_keys=True)


def make_lm_optimizer(name: str, lr: float) -> Callable[[Iterable[torch.nn.Parameter]],
                                                        torch.optim.Optimizer]:
    """``params -> optimizer`` for the AdamW, SGD and NAdam settings of :data:`LM_OPTIMIZERS`
    (Muon needs the module: :func:`stage_optimizer`)."""
    if name == "adamw":
        return lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.01)
    if name == "sgd":
        return lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)
    if name == "nadam":
        return lambda p: torch.optim.NAdam(p, lr=lr, betas=(0.99, 0.999), weight_decay=0.01,
                                           decoupled_weight_decay=True)
    raise ValueError(f"optimizer must be one of adamw, sgd, nadam, got {name!r}")


def stage_optimizer(name: str, lr: float, module: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of one stage of the yardstick (see :data:`LM_OPTIMIZERS`)."""
    if name != "muon":
        return make_lm_optimizer(name, lr)(module.parameters())
    from .combined import CombinedOptimizer

    mats = [p for n, p in module.named_parameters() if n.startswith("block.") and p.ndim == 2]
    rest = [p for n, p in module.named_parameters()
            if not (n.startswith("block.") and p.ndim == 2)]
    return CombinedOptimizer([
        torch.optim.Muon(mats, lr=lr, weight_decay=0.01, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(rest, lr=lr, weight_decay=0.01)])


def _factory(cfg: LMConfig, stages: Sequence[torch.nn.Module]
             ) -> Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]:
    """``make_optimizer`` for the simulator: the stages' optimizers, in stage order."""
    it = iter([stage_optimizer(cfg.optimizer, cfg.learning_rate, m) for m in stages])
    return lambda _params: next(it)


_DATA: dict[str | None, TextData] = {}


def corpus_of(cfg: LMConfig) -> TextData:
    """The setting's corpus, loaded once per process.

    Raises:
        FileNotFoundError: ``cfg.corpus`` names no file.
    """
    if cfg.corpus not in _DATA:
        _DATA[cfg.corpus] = load_text(cfg.corpus)
    return _DATA[cfg.corpus]


def run_lm(method: str, cfg: LMConfig, seed: int, *, reference: bool | None = None,
           progress: Any = None) -> dict[str, Any]:
    """Train one method on the yardstick; return its record.

    Args:
        method: A registered method name (or ``Method``).
        cfg: The setting.
        seed: Seed of the initialisation and of the training batches (the held-out set is
            the same for every seed).
        reference: Whether this is the staleness-free reference (trained ``steps`` steps);
            default: ``method == "sequential"``.
        progress: Optional object with ``update(n)`` called after every step.

    Returns:
        ``{"method", "seed", "config", "curve": [[samples, loss], ...], "final_loss",
        "steps_run", "time_s", "machine"}`` (:func:`machine`); ``final_loss`` is the held-out
        loss after ``cfg.steps`` steps.
    """
    from .pipeline import PipelineSimulator, get_method

    spec = get_method(method)
    is_ref = spec.staleness_free if reference is None else reference
    data = corpus_of(cfg)
    stages = lm_stages(cfg.stages, data.vocab_size, dim=cfg.dim, heads=cfg.heads,
                       context=cfg.context, dropout=cfg.dropout, seed=seed)
    sim = PipelineSimulator(stages, _factory(cfg, stages), method=spec, schedule=cfg.schedule,
                            n_microbatches=cfg.microbatches, loss_fn=lm_loss)
    xv, yv = data.held_out(cfg.eval_sequences, cfg.context)
    gen = torch.Generator().manual_seed(10_000 + seed)
    total = cfg.steps if is_ref else math.ceil(cfg.horizon * cfg.steps)

    def evaluate() -> float:
        with torch.no_grad():
            losses = [float(lm_loss(sim.evaluate(a), b))
                      for a, b in zip(xv.split(64), yv.split(64))]
        return sum(losses) / len(losses)

    curve: list[list[float]] = [[0, evaluate()]]
    final = math.nan
    t0 = time.perf_counter()
    for step in range(1, total + 1):
        x, y = data.batch(gen, cfg.samples_per_step, cfg.context)
        sim.step(x, y)
        if step % cfg.eval_every == 0 or step == cfg.steps or step == total:
            loss = evaluate()
            curve.append([step * cfg.samples_per_step, loss])
            if step == cfg.steps:
                final = loss
        if progress is not None:
            progress.update(1)
    return {"method": spec.name, "seed": seed, "config": asdict(cfg), "curve": curve,
            "final_loss": final, "steps_run": total, "time_s": time.perf_counter() - t0,
            "machine": machine()}


def machine() -> dict[str, str]:
    """What a run's bits depend on besides its inputs: the CPU model and the vector instruction
    set torch uses on it (the math libraries pick their matrix-product and reduction kernels by
    both, and those round differently), and the torch build. Runs are bit-identical where these
    agree."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def iso_loss_overhead(curve: Sequence[Sequence[float]], target: float,
                      reference_samples: float) -> float | None:
    """Samples to first reach ``target`` on ``curve`` over ``reference_samples``.

    ``curve`` holds ``(samples, loss)`` pairs in increasing samples; the crossing is
    interpolated linearly between the last point above and the first at or below the target.
    ``None`` when the curve never reaches it.
    """
    prev = None
    for s, v in curve:
        if v <= target:
            if prev is None or prev[1] == v:
                return s / reference_samples
            s0, v0 = prev
            return (s0 + (v0 - target) / (v0 - v) * (s - s0)) / reference_samples
        prev = (s, v)
    return None


class RunCache:
    """Run records, one JSON line each, keyed by (setting, method, seed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: dict[tuple[str, str, int], dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.records[(LMConfig(**r["config"]).key(), r["method"], r["seed"])] = r

    def get(self, cfg: LMConfig, method: str, seed: int) -> dict[str, Any] | None:
        """The cached record, if any."""
        return self.records.get((cfg.key(), method, seed))

    def add(self, record: dict[str, Any]) -> None:
        """Store a record (appended to the file)."""
        cfg = LMConfig(**record["config"])
        self.records[(cfg.key(), record["method"], record["seed"])] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


@dataclass
class MethodSummary:
    """One method's results in one setting, over seeds."""

    method: str
    seeds: list[int]
    final: list[float]
    overhead: list[float | None] = field(default_factory=list)

    @property
    def final_mean(self) -> float:
        return statistics.mean(self.final)

    def gap_to(self, other: MethodSummary) -> float:
        """Mean over the seeds both have of this method's final loss minus ``other``'s (paired
        by seed, so a missing seed of one does not shift the other's mean)."""
        theirs = dict(zip(other.seeds, other.final))
        diffs = [f - theirs[s] for s, f in zip(self.seeds, self.final) if s in theirs]
        if not diffs:
            raise ValueError(f"{self.method} and {other.method} have no seed in common")
        return statistics.mean(diffs)

    @property
    def final_std(self) -> float:
        return statistics.stdev(self.final) if len(self.final) > 1 else 0.0

    @property
    def reached(self) -> list[float]:
        return [o for o in self.overhead if o is not None]

    @property
    def overhead_mean(self) -> float | None:
        return statistics.mean(self.reached) if self.reached else None


def aggregate(records: Sequence[dict[str, Any]], cfg: LMConfig, methods: Sequence[str],
              seeds: Sequence[int], reference: str = "sequential") -> dict[str, MethodSummary]:
    """Per method, the final losses and iso-loss overheads over ``seeds`` (a seed counts only
    if both the method's and the reference's runs of that seed are in ``records``)."""
    by = {(r["method"], r["seed"]): r for r in records if LMConfig(**r["config"]) == cfg}
    out: dict[str, MethodSummary] = {}
    for m in methods:
        summary = MethodSummary(m, [], [], [])
        for s in seeds:
            r, ref = by.get((m, s)), by.get((reference, s))
            if r is None or ref is None:
                continue
            summary.seeds.append(s)
            summary.final.append(r["final_loss"])
            ref_samples = cfg.steps * cfg.samples_per_step
            summary.overhead.append(
                1.0 if m == reference else
                iso_loss_overhead(r["curve"], ref["final_loss"], ref_samples))
        if summary.seeds:
            out[m] = summary
    return out


def _fmt_overhead(s: MethodSummary, horizon: float) -> str:
    if not s.reached:
        return f"never (> {horizon:g}x)"
    text = f"{s.overhead_mean:.2f}x"
    if len(s.reached) < len(s.overhead):
        text += f" ({len(s.reached)}/{len(s.overhead)} seeds; others > {horizon:g}x)"
    return text


def markdown_table(summaries: dict[str, MethodSummary], cfg: LMConfig,
                   reference: str = "sequential") -> str:
    """A markdown table: method, held-out loss (mean ± std), gap to the reference, share of
    the ``pipedream`` gap closed, iso-loss overhead."""
    ref = summaries.get(reference)
    pd = summaries.get("pipedream")
    lines = ["| method | held-out loss | gap to " + reference + " | pipedream gap closed "
             "| iso-loss overhead |", "|---|---:|---:|---:|---:|"]
    for m, s in summaries.items():
        loss = f"{s.final_mean:.3f} ± {s.final_std:.3f}" if len(s.final) > 1 \
            else f"{s.final_mean:.3f}"
        gap = f"{s.gap_to(ref):+.3f}" if ref else ""
        closed = ""
        if ref and pd and m not in (reference, "pipedream") and pd.final_mean > ref.final_mean:
            share = pd.gap_to(s) / pd.gap_to(ref)
            closed = f"{100 * share:.0f} %"
        lines.append(f"| {m} | {loss} | {gap} | {closed} | {_fmt_overhead(s, cfg.horizon)} |")
    return "\n".join(lines)


def plot_curves(records: Sequence[dict[str, Any]], cfg: LMConfig, methods: Sequence[str],
                path: str | Path, title: str) -> None:
    """Held-out loss against samples, mean over the seeds present, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for m in methods:
        runs = [r for r in records if r["method"] == m and LMConfig(**r["config"]) == cfg]
        if not runs:
            continue
        n = min(len(r["curve"]) for r in runs)
        xs = [runs[0]["curve"][i][0] for i in range(n)]
        ys = [statistics.mean(r["curve"][i][1] for r in runs) for i in range(n)]
        ax.plot(xs, ys, label=f"{m} ({len(runs)} seeds)",
                linestyle="--" if m == "sequential" else "-", linewidth=1.6)
    ax.axvline(cfg.steps * cfg.samples_per_step, color="#999", linewidth=0.8)
    tail = [v for r in records if LMConfig(**r["config"]) == cfg and r["method"] in methods
            for s, v in r["curve"] if s >= 0.1 * cfg.steps * cfg.samples_per_step]
    if tail:  # the first evaluations (near the uniform loss) would squash the rest
        ax.set_ylim(min(tail) - 0.05, max(tail) + 0.05)
    ax.set_xlabel("training sequences")
    ax.set_ylabel("held-out loss (nats per character)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def study_setting(stages: int, optimizer: str) -> LMConfig:
    """The study's setting at ``stages`` stages: 8 micro-batches of 8 sequences per step, or,
    beyond 8 stages, one micro-batch per stage (1F1B needs at least as many micro-batches as
    stages) with the same 64 sequences per step."""
    n = max(8, stages)
    return LMConfig(stages=stages, optimizer=optimizer, microbatches=n, microbatch_size=64 // n)


def configs_with(base: LMConfig, **grid: Sequence[Any]) -> list[LMConfig]:
    """Every combination of the given fields' values applied to ``base``."""
    out = [base]
    for name, values in grid.items():
        out = [replace(c, **{name: v}) for c in out for v in values]
    return out


def compare_lm(cfg: LMConfig, methods: Sequence[str], seeds: Sequence[int], out: str | Path,
               *, progress: bool = True, cache: RunCache | None = None, processes: int = 1,
               threads: int = 1, log: Callable[[str], None] = print) -> dict[str, MethodSummary]:
    """Run ``methods`` (``sequential`` is added first if missing: it is the reference) for
    every seed, write ``results.json`` and ``curves.png`` to ``out`` and return the summaries.

    ``results.json`` holds the setting, every run's record (curve included) and, per method,
    the final losses, their mean and sample standard deviation, and the iso-loss overheads.
    With ``processes > 1`` the runs missing from the cache run that many at a time in worker
    processes (``threads`` intra-op threads each), all feeding the one progress bar; runs are
    deterministic, so the numbers do not depend on ``processes``.
    """
    from tqdm import tqdm

    from .pipeline import get_method

    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an int >= 1, got {processes!r}")
    names = [get_method(m).name for m in methods]
    if "sequential" not in names:
        names = ["sequential", *names]
    cache = cache if cache is not None else RunCache(Path(out) / "runs.jsonl")
    total = sum(cfg.steps if n == "sequential" else math.ceil(cfg.horizon * cfg.steps)
                for n in names) * len(seeds)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    with tqdm(total=total, desc="compare", unit="step", disable=not progress,
              dynamic_ncols=True) as bar:
        todo = []
        for seed in seeds:
            for n in names:
                r = cache.get(cfg, n, seed)
                if r is None:
                    todo.append((n, seed))
                else:
                    done[n, seed] = r
                    bar.update(r["steps_run"])
        if processes == 1 or len(todo) <= 1:
            for n, seed in todo:
                bar.set_description(n if len(seeds) == 1 else f"{n} seed {seed}")
                done[n, seed] = r = run_lm(n, cfg, seed, progress=bar)
                cache.add(r)
        else:
            todo.sort(key=lambda job: job[0] == "sequential")  # the longer runs first
            for r in _run_parallel([(asdict(cfg), n, s, threads) for n, s in todo],
                                   min(processes, len(todo)), bar):
                done[r["method"], r["seed"]] = r
                cache.add(r)
    records = [done[n, s] for s in seeds for n in names]
    summaries = aggregate(records, cfg, names, seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump({"config": asdict(cfg), "seeds": list(seeds), "torch": torch.__version__,
                   "summary": {m: {"seeds": s.seeds, "final_loss": s.final,
                                   "final_loss_mean": s.final_mean,
                                   "final_loss_std": s.final_std,
                                   "iso_loss_overhead": s.overhead}
                               for m, s in summaries.items()},
                   "runs": records}, f, indent=1)
    title = (f"{cfg.stages}-stage transformer LM, {cfg.schedule}, {cfg.optimizer} lr "
             f"{cfg.learning_rate:g}, {cfg.microbatches}x{cfg.microbatch_size} sequences of "
             f"{cfg.context} per step, {len(seeds)} seed(s)")
    plot_curves(records, cfg, names, out / "curves.png", title)
    log(title)
    log(markdown_table(summaries, cfg))
    log(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    return summaries


class _QueueProgress:
    """A worker's progress: step counts sent to the parent's bar through a queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def update(self, n: int = 1) -> None:
        self.queue.put(n)


def _run_reporting(job: tuple[dict[str, Any], str, int, int, Any]) -> dict[str, Any]:
    cfg, method, seed, threads, queue = job
    torch.set_num_threads(threads)
    progress = None if queue is None else _QueueProgress(queue)
    return run_lm(method, LMConfig(**cfg), seed, progress=progress)


def _run_parallel(jobs: Sequence[tuple[dict[str, Any], str, int, int]], processes: int,
                  bar: Any = None) -> Iterator[dict[str, Any]]:
    """Run ``jobs`` in ``processes`` spawned workers; yield the records as they finish while a
    thread moves the workers' step counts onto ``bar`` (if any)."""
    import multiprocessing as mp
    import threading

    ctx = mp.get_context("spawn")
    if bar is None:
        with ctx.Pool(processes) as pool:
            yield from pool.imap_unordered(_run_reporting, [(*j, None) for j in jobs])
        return
    with ctx.Manager() as manager:
        queue = manager.Queue()

        def drain() -> None:
            while (n := queue.get()) is not None:
                bar.update(n)

        mover = threading.Thread(target=drain, daemon=True)
        mover.start()
        try:
            with ctx.Pool(processes) as pool:
                yield from pool.imap_unordered(_run_reporting,
                                               [(*j, queue) for j in jobs])
        finally:
            queue.put(None)
            mover.join(timeout=10)


def applicable(method: str, cfg: LMConfig) -> bool:
    """Whether ``method`` runs in setting ``cfg`` (e.g. Spike Compensation needs momentum SGD)."""
    from .pipeline import PipelineSimulator, get_method

    probe = lm_stages(cfg.stages, 5, dim=4, heads=1, context=2)
    try:
        PipelineSimulator(probe, _factory(cfg, probe), method=get_method(method),
                          schedule=cfg.schedule, n_microbatches=cfg.microbatches)
    except ValueError:
        return False
    return True


def run_grid(configs: Sequence[LMConfig], methods: Sequence[str], seeds: Sequence[int],
             cache: RunCache, *, processes: int = 1,
             log: Callable[[str], None] = print) -> None:
    """Run every (setting, method, seed) missing from ``cache``, ``processes`` at a time
    (one intra-op thread each), storing each record as it finishes. Runs are independent and
    deterministic, so the order and the parallelism do not change any number."""
    jobs = [(asdict(c), m, s, 1) for c in configs for s in seeds for m in methods
            if cache.get(c, m, s) is None and applicable(m, c)]
    log(f"{len(jobs)} runs to do ({processes} at a time)")
    if not jobs:
        return
    if processes <= 1:
        torch.set_num_threads(1)
        records: Iterable[dict[str, Any]] = (run_lm(m, LMConfig(**c), s) for c, m, s, _ in jobs)
    else:
        records = _run_parallel(jobs, processes)
    for r in records:
        cache.add(r)
        log(f"{r['method']} {r['config']['stages']} stages {r['config']['optimizer']} seed "
            f"{r['seed']}: {r['final_loss']:.4f} ({r['time_s']:.0f} s)")
