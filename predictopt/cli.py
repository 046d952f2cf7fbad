"""The ``predictopt`` command line: compare pipeline methods, show staleness tables.

``predictopt compare`` (``--task lm``, the default) trains the language-model yardstick of
:mod:`predictopt.lm` (a character-level transformer, one block per stage, on a corpus that
ships with Python or a text file of yours) with several pipeline methods in the single-process
simulator (:mod:`predictopt.pipeline.simulator`, bit-exact to a distributed run) and reports
the held-out loss and the iso-loss sample overhead of every method against the staleness-free
``sequential`` run (:mod:`predictopt.study`; ``results.json``, ``runs.jsonl`` and ``curves.png``
in ``--out``).

``predictopt compare --task mlp`` trains a stage-split MLP on a data set bundled with
scikit-learn and reports final training loss, test accuracy, time and staleness per method
(``results.json`` and ``curves.png`` in ``--out``).

For ``--task mlp``, besides the methods of :data:`METHODS_MLP` (its default list),
``--methods`` accepts the fine-grained Pipelined Backpropagation methods ``pb``, ``pb-sc``,
``pb-lwp`` and ``pb-sc-lwp`` (:mod:`predictopt.pipeline.pb`; not run by default: each takes
several times longer than all default methods together). They run the paper's setting whatever
``--optimizer`` says: every MLP layer a stage (``--stages`` of them), one sample per update, one
stream per epoch over the same shuffled samples the other methods see, momentum SGD
(``momentum=0.9``) with the learning rate ``--pb-lr``, by default the SGD learning rate (``--lr``
if ``--optimizer sgd``, else the SGD default) divided by ``--microbatch-size`` (the linear
scaling rule from the other methods' samples per update down to one). Their loss curve is the
mean per-sample loss over each block of ``--microbatch-size x --microbatches`` samples, so it is
on the same axis as the others' per-step losses. ``pb-sync`` is their reference: the same
per-sample momentum SGD without any pipeline delay (``sequential`` on the ``"PB"`` schedule).

``--seeds N`` repeats every method for the seeds ``--seed``, ``--seed + 1``, ...,
``--seed + N - 1`` (each one changing the split, the initialisation and the shuffling as
``--seed`` does). The table then shows the mean and the sample standard deviation across seeds
of the final training loss and test accuracy (time: mean per seed), ``curves.png`` the mean
curve of each method with a band from the smallest to the largest seed's (smoothed) curve, and
``results.json`` adds, per method, ``seeds``, ``per_seed`` (the result of each seed, as a
single-seed run writes it) and ``<key>_mean`` / ``<key>_std`` for ``final_train_loss``,
``test_accuracy``, ``test_loss`` and ``time_s``; the method's own ``final_train_loss``,
``test_accuracy``, ``test_loss``, ``time_s`` and ``train_loss_curve`` are then the means across
seeds. The config records ``seeds`` (also for one seed).

``predictopt staleness`` prints the staleness table of a schedule and draws its timeline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "build_parser", "OPTIMIZERS", "DEFAULT_LR", "PB_MOMENTUM"]

#: Optimizers ``--optimizer`` accepts.
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw", "rmsprop", "nadam", "radam", "adamax",
                               "adagrad")
#: Learning rate used when ``--lr`` is not given.
DEFAULT_LR: dict[str, float] = {"sgd": 0.02, "adam": 6e-3, "adamw": 6e-3, "rmsprop": 1e-3,
                                "nadam": 6e-3, "radam": 6e-3, "adamax": 1e-2, "adagrad": 3e-2}

#: Momentum of the SGD the Pipelined Backpropagation methods (``pb*``) always run.
PB_MOMENTUM = 0.9
#: The reference of the ``pb*`` methods: the same per-sample momentum SGD without pipelining
#: (``sequential`` on the ``"PB"`` schedule: no delay), the "SGD" the paper compares against.
PB_SYNC = "pb-sync"

# Chosen so that the default run (digits, 4 stages, 1F1B, AdamW) takes well under a minute on
# one CPU core and the learning rate is high enough for staleness to matter.
_DEFAULTS = {"dataset": "digits", "stages": 4, "schedule": "1F1B", "optimizer": "adamw",
             "microbatch_size": 32, "microbatches": 8, "epochs": 10, "hidden": 64,
             "activation": "tanh", "seed": 0, "seeds": 1}
#: The language-model task's defaults (the yardstick of the study, docs/study.md).
_LM_DEFAULTS = {"stages": 8, "microbatch_size": 8, "steps": 150, "horizon": 1.3,
                "eval_every": 5, "context": 64, "dim": 96}

#: Per-seed result fields that ``--seeds N`` (N > 1) averages, adding ``<key>_mean`` and
#: ``<key>_std`` (sample standard deviation) per method.
_SEED_STATS: tuple[str, ...] = ("final_train_loss", "test_accuracy", "test_loss", "time_s")


def make_optimizer_factory(name: str, lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    """``params -> optimizer`` for an ``--optimizer`` name (SGD with momentum 0.9, AdamW with
    weight decay 1e-2, the others with torch's defaults)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
    o = torch.optim
    table: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
        "sgd": lambda p: o.SGD(p, lr=lr, momentum=0.9),
        "adam": lambda p: o.Adam(p, lr=lr),
        "adamw": lambda p: o.AdamW(p, lr=lr, weight_decay=1e-2),
        "rmsprop": lambda p: o.RMSprop(p, lr=lr),
        "nadam": lambda p: o.NAdam(p, lr=lr),
        "radam": lambda p: o.RAdam(p, lr=lr),
        "adamax": lambda p: o.Adamax(p, lr=lr),
        "adagrad": lambda p: o.Adagrad(p, lr=lr),
    }
    return table[name]


# ---------------------------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------------------------


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (``what`` names the accepted values)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _methods(text: str) -> list[str]:
    from .pipeline import available_methods

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of methods")
    known = tuple(available_methods()) + (PB_SYNC,)
    bad = [m for m in names if m not in known]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(bad)}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"methods listed twice in {text!r}")
    return names


def _pb_methods() -> tuple[str, ...]:
    """The Pipelined Backpropagation methods ``--methods`` accepts, with the reference."""
    from .pipeline.pb import PB_METHODS

    return PB_METHODS + (PB_SYNC,)


def _schedule(text: str) -> str:
    from .pipeline.bitpipe import BITPIPE_SCHEDULE
    from .pipeline.schedules import SUPPORTED_SCHEDULES

    names = SUPPORTED_SCHEDULES + (BITPIPE_SCHEDULE,)  # BitPipe: simulator only
    for name in names:
        if name.lower() == text.lower():
            return name
    raise argparse.ArgumentTypeError(
        f"unknown schedule {text!r}; choose from {', '.join(names)}")


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------


#: The methods ``--task mlp`` runs by default (the paper methods).
METHODS_MLP: tuple[str, ...] = ("sequential", "gpipe", "pipedream", "pipedream-2bw", "spectrain",
                                "xpipe", "pipeoptim", "pipeoptim-lean")


def _lm_methods() -> tuple[str, ...]:
    from .pipeline import DEFAULT_METHOD

    return tuple(dict.fromkeys(("sequential", "pipedream", "pipeoptim", DEFAULT_METHOD)))


def build_parser() -> argparse.ArgumentParser:
    """The ``predictopt`` argument parser."""
    from .data import DATASETS

    lm_methods = _lm_methods()

    parser = argparse.ArgumentParser(
        prog="predictopt",
        description="Weight prediction for asynchronous pipeline-parallel training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "compare",
        help="train a model with several pipeline methods and compare them",
        description="Train the same model with several pipeline methods (simulated in one "
                    "process, bit-exact to a distributed run) and compare them. --task lm "
                    "(default): a character-level transformer language model, one block per "
                    "stage; held-out loss and iso-loss sample overhead against the "
                    "staleness-free run. --task mlp: a stage-split MLP on a scikit-learn data "
                    "set; final training loss, test accuracy, time and staleness.",
    )
    d = _DEFAULTS
    c.add_argument("--task", choices=("lm", "mlp"), default="lm",
                   help="lm: the transformer language model; mlp: a stage-split MLP "
                        "(default: %(default)s)")
    c.add_argument("--dataset", choices=DATASETS, default=d["dataset"],
                   help="mlp: scikit-learn bundled data set (default: %(default)s)")
    c.add_argument("--stages", type=_positive_int, default=None,
                   help=f"number of pipeline stages K (lm: transformer blocks, default "
                        f"{_LM_DEFAULTS['stages']}; mlp: layers, default {d['stages']}); "
                        "num_ranks = K, or K/2 for 2-stages-per-rank schedules")
    c.add_argument("--schedule", type=_schedule, default=d["schedule"],
                   help="torch pipeline schedule (default: %(default)s)")
    c.add_argument("--optimizer", choices=tuple(dict.fromkeys(OPTIMIZERS + ("muon",))),
                   default=d["optimizer"],
                   help="per-stage optimizer (default: %(default)s)")
    c.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: per optimizer, "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    c.add_argument("--microbatch-size", type=_positive_int, default=None,
                   help=f"samples per micro-batch (lm: sequences, default "
                        f"{_LM_DEFAULTS['microbatch_size']}; mlp: default {d['microbatch_size']}, "
                        "capped so that an epoch has at least 4 steps on small data sets)")
    c.add_argument("--microbatches", type=_positive_int, default=d["microbatches"],
                   help="micro-batches per step (default: %(default)s)")
    c.add_argument("--epochs", type=_positive_int, default=d["epochs"],
                   help="mlp: passes over the training set (default: %(default)s)")
    c.add_argument("--steps", type=_positive_int, default=_LM_DEFAULTS["steps"],
                   help="lm: training steps of the staleness-free run; the final held-out loss "
                        "of every method is read there (default: %(default)s)")
    c.add_argument("--horizon", type=_positive_float, default=_LM_DEFAULTS["horizon"],
                   help="lm: the other methods train horizon x --steps steps, so that iso-loss "
                        "overheads up to it can be measured (default: %(default)s)")
    c.add_argument("--eval-every", type=_positive_int, default=_LM_DEFAULTS["eval_every"],
                   help="lm: steps between held-out evaluations (default: %(default)s)")
    c.add_argument("--corpus", type=str, default=None,
                   help="lm: a UTF-8 text file (default: Python's own help topics, "
                        "pydoc_data.topics, which ship with every Python)")
    c.add_argument("--context", type=_positive_int, default=_LM_DEFAULTS["context"],
                   help="lm: characters per sequence (default: %(default)s)")
    c.add_argument("--dim", type=_positive_int, default=_LM_DEFAULTS["dim"],
                   help="lm: model width, 4 heads (default: %(default)s)")
    c.add_argument("--methods", type=_methods, default=None,
                   help="comma-separated methods (lm default: " + ",".join(lm_methods)
                        + "; mlp default: " + ",".join(METHODS_MLP) + "); any registered "
                        "method (predictopt.pipeline.available_methods()), for mlp also the "
                        "Pipelined Backpropagation methods, pb-sync being their synchronous "
                        "per-sample SGD reference")
    c.add_argument("--hidden", type=_positive_int, default=d["hidden"],
                   help="mlp: hidden width of the MLP (default: %(default)s)")
    c.add_argument("--activation", choices=("relu", "tanh", "gelu", "silu"),
                   default=d["activation"], help="mlp: activation (default: %(default)s)")
    c.add_argument("--update-every", type=_positive_int, default=None,
                   help="micro-batches per update for pipedream-2bw and xpipe (default: the "
                        "smallest divisor of --microbatches that is >= the number of stages)")
    c.add_argument("--pb-lr", type=_positive_float, default=None,
                   help="learning rate of the pb* methods, which always run SGD with momentum "
                        f"{PB_MOMENTUM} and one sample per update (default: the SGD learning rate "
                        "divided by the micro-batch size: --lr with --optimizer sgd, else "
                        f"{DEFAULT_LR['sgd']:g})")
    c.add_argument("--seed", type=_nonneg_int, default=d["seed"],
                   help="seed of the split, the initialisation and the shuffling; the first "
                        "seed with --seeds (default: %(default)s)")
    c.add_argument("--seeds", type=_positive_int, default=d["seeds"],
                   help="number of seeds: run every method with --seed, --seed+1, ..., "
                        "--seed+N-1 and report mean and sample standard deviation "
                        "(default: %(default)s)")
    c.add_argument("--threads", type=_positive_int, default=1,
                   help="torch intra-op threads (default: %(default)s; the models are tiny)")
    c.add_argument("--processes", type=_positive_int, default=None,
                   help="--task lm: runs at a time, in worker processes of --threads threads "
                        "each; the numbers do not depend on it (default: the CPU cores this "
                        "process may use, divided by --threads)")
    c.add_argument("--out", type=Path, default=Path("runs/compare"),
                   help="output directory for results.json and curves.png "
                        "(default: %(default)s)")
    c.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    c.set_defaults(subparser=c)

    s = sub.add_parser(
        "staleness",
        help="print a schedule's staleness table and draw its timeline",
        description="Print s(stage, micro-batch), the number of the stage's own updates between "
                    "a micro-batch's forward and the update applying its gradient, and render "
                    "the schedule's timeline as a PNG.",
    )
    s.add_argument("--schedule", type=_schedule, required=True,
                   help="pipeline schedule (torch's, ZBH1 / ZBH2, or BitPipe)")
    s.add_argument("--ranks", type=_positive_int, required=True, help="pipeline ranks")
    s.add_argument("--microbatches", type=_positive_int, required=True,
                   help="micro-batches per step")
    s.add_argument("--update-every", type=_positive_int, default=1,
                   help="completed backwards per update (default: %(default)s)")
    s.add_argument("--stages-per-rank", type=_positive_int, default=None,
                   help="stages per rank (default: 1, or 2 for multi-stage schedules)")
    s.add_argument("--out", type=Path, default=None,
                   help="timeline PNG (default: runs/staleness_<schedule>.png)")
    s.set_defaults(subparser=s)
    return parser


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(header, widths)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot_curves(results: dict[str, dict[str, Any]], config: dict[str, Any], path: Path) -> None:
    """Draw every method's training-loss curve into ``path``.

    A method with ``per_seed`` results (``--seeds`` > 1) is drawn as its mean curve with a band
    from the smallest to the largest of its seeds' smoothed curves.

    Args:
        results: Per method, its ``results.json`` entry.
        config: The run's ``results.json`` config.
        path: The PNG to write (its folder is created).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    window = max(1, config["steps_per_epoch"] // 2)
    colors = ["#000000", "#4C72B0", "#DD8452", "#8172B3", "#937860", "#55A868", "#C44E52",
              "#17BECF", "#BCBD22", "#E377C2", "#7F7F7F"]
    for j, (name, r) in enumerate(results.items()):
        curve = r["train_loss_curve"]
        xs = [(i + 1) / config["steps_per_epoch"] for i in range(len(curve))]
        color = colors[j % len(colors)]
        ax.plot(xs, curve, color=color, alpha=0.15, linewidth=0.8)
        runs = r.get("per_seed")
        if runs:
            smoothed = [_smooth(run["train_loss_curve"], window) for run in runs]
            ax.fill_between(xs, [min(v) for v in zip(*smoothed)],
                            [max(v) for v in zip(*smoothed)], color=color, alpha=0.2,
                            linewidth=0)
            label = (f"{name} (test acc {r['test_accuracy_mean']:.3f} "
                     f"± {r['test_accuracy_std']:.3f})")
        else:
            label = f"{name} (test acc {r['test_accuracy']:.3f})"
        ax.plot(xs, _smooth(curve, window), color=color, linewidth=1.8,
                linestyle="--" if name in ("sequential", "gpipe", PB_SYNC)
                else ":" if name.startswith("pb") else "-",
                label=label)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    seeds = config.get("seeds", [config["seed"]])
    multi = len(seeds) > 1
    ax.set_ylabel(f"training loss per step ({'mean over seeds, ' if multi else ''}"
                  f"moving average over {window} steps)")
    ax.set_title(
        f"{config['dataset']}: {config['stages']}-stage {config['activation']} MLP, "
        f"{config['schedule']} ({config['num_ranks']} ranks), "
        f"{config['optimizer']} lr {config['lr']:g}, "
        f"{config['microbatches']}x{config['microbatch_size']} per step"
        + (f"\n{len(seeds)} seeds ({seeds[0]}..{seeds[-1]}): mean curve, band from the lowest "
           "to the highest seed" if multi else "")
        + (f"\npb*: every layer a stage, 1 sample per update, sgd (momentum {PB_MOMENTUM:g}) "
           f"lr {config['pb_lr']:g}" if config.get("pb_methods") else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _aggregate_seeds(seeds: Sequence[int], runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One method's ``results.json`` entry from its per-seed results.

    Args:
        seeds: The seeds, in the order of ``runs``.
        runs: Per seed, the method's result dict.

    Returns:
        ``runs[0]`` itself for one seed. Otherwise the first seed's seed-independent fields
        (staleness, optimizer, ...), the means across seeds of :data:`_SEED_STATS` and of
        ``train_loss_curve`` (step by step) under their own keys, ``<key>_mean`` and
        ``<key>_std`` (sample standard deviation) for each key of :data:`_SEED_STATS`,
        ``seeds`` and ``per_seed`` (``runs``).
    """
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    stats: dict[str, float] = {}
    for key in _SEED_STATS:
        values = [float(r[key]) for r in runs]
        mean = statistics.mean(values)
        out[key] = mean
        stats[f"{key}_mean"] = mean
        stats[f"{key}_std"] = statistics.stdev(values)
    out["train_loss_curve"] = [statistics.mean(v)
                               for v in zip(*(r["train_loss_curve"] for r in runs))]
    out.update(stats)
    out["seeds"] = list(seeds)
    out["per_seed"] = list(runs)
    return out


def _mean_std(r: dict[str, Any], key: str, fmt: str) -> str:
    """``r[key]`` formatted with ``fmt``, as ``mean ± std`` when ``r`` covers several seeds."""
    if "per_seed" not in r:
        return format(r[key], fmt)
    return f"{format(r[f'{key}_mean'], fmt)} ± {format(r[f'{key}_std'], fmt)}"


def _usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _run_compare_lm(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .study import LM_OPTIMIZERS, LMConfig, compare_lm

    torch.set_num_threads(args.threads)
    if args.optimizer not in LM_OPTIMIZERS:
        parser.error(f"argument --optimizer: --task lm runs {', '.join(LM_OPTIMIZERS)}, got "
                     f"{args.optimizer}")
    methods = args.methods if args.methods is not None else list(_lm_methods())
    if PB_SYNC in methods or any(m in _pb_methods() for m in methods):
        parser.error("argument --methods: the Pipelined Backpropagation methods run with "
                     "--task mlp only")
    try:
        cfg = LMConfig(stages=args.stages or _LM_DEFAULTS["stages"], schedule=args.schedule,
                       optimizer=args.optimizer, lr=args.lr, microbatches=args.microbatches,
                       microbatch_size=args.microbatch_size or _LM_DEFAULTS["microbatch_size"],
                       context=args.context, dim=args.dim, steps=args.steps,
                       horizon=args.horizon, eval_every=args.eval_every, corpus=args.corpus)
        from .pipeline import get_method
        from .study import applicable, corpus_of

        corpus_of(cfg)
        for m in methods:  # configuration errors before any training
            if not applicable(get_method(m), cfg):
                raise ValueError(f"method {m} does not run with --optimizer {cfg.optimizer} "
                                 f"on {cfg.schedule} (e.g. Spike Compensation needs momentum "
                                 "SGD, Nesterov momentum converts Adam/AdamW/SGD only)")
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    seeds = list(range(args.seed, args.seed + args.seeds))
    processes = args.processes or max(1, _usable_cores() // args.threads)
    compare_lm(cfg, methods, seeds, args.out, progress=not args.no_progress,
               processes=processes, threads=args.threads)
    return 0


def _run_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tqdm import tqdm

    if args.task == "lm":
        return _run_compare_lm(args, parser)
    if args.processes is not None:
        parser.error("argument --processes: --task mlp runs in this process; --processes is "
                     "for --task lm")
    if args.methods is None:
        args.methods = list(METHODS_MLP)
    if args.stages is None:
        args.stages = _DEFAULTS["stages"]
    if args.optimizer not in OPTIMIZERS:
        parser.error(f"argument --optimizer: --task mlp runs {', '.join(OPTIMIZERS)}, got "
                     f"{args.optimizer}")

    from .data import load_dataset, mlp_stages
    from .pipeline.bitpipe import BITPIPE_SCHEDULE, BitPipeSimulator
    from .pipeline.schedules import stage_to_rank
    from .pipeline.simulator import PipelineSimulator, train

    torch.set_num_threads(args.threads)
    bitpipe = args.schedule == BITPIPE_SCHEDULE  # 2K chunks on K ranks, two copies each
    spr = 2 if bitpipe else len(stage_to_rank(args.schedule, 1))
    pb_all = _pb_methods()
    pb_methods = [m for m in args.methods if m in pb_all]
    if args.stages % spr and len(pb_methods) < len(args.methods):
        parser.error(f"argument --stages: schedule {args.schedule} places {spr} stages per rank, "
                     f"so --stages must be a multiple of {spr} (got {args.stages})")
    num_ranks = args.stages // spr
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    ds = load_dataset(args.dataset, seed=args.seed)
    n_train = int(ds.x_train.shape[0])
    if args.microbatch_size is None:
        args.microbatch_size = max(1, min(_DEFAULTS["microbatch_size"],
                                          n_train // (4 * args.microbatches)))
    batch = args.microbatch_size * args.microbatches
    steps_per_epoch = ds.x_train.shape[0] // batch
    if steps_per_epoch == 0:
        parser.error(f"--microbatch-size x --microbatches ({batch}) exceeds the {args.dataset} "
                     f"training set ({ds.x_train.shape[0]} samples)")
    make_opt = make_optimizer_factory(args.optimizer, lr)
    # Pipelined Backpropagation: momentum SGD, one sample per update (linear lr scaling), one
    # stream per epoch over the same samples the other methods see in that epoch.
    sgd_lr = args.lr if args.lr is not None and args.optimizer == "sgd" else DEFAULT_LR["sgd"]
    pb_lr = args.pb_lr if args.pb_lr is not None else sgd_lr / args.microbatch_size
    make_pb_opt = make_optimizer_factory("sgd", pb_lr)  # momentum PB_MOMENTUM
    pb_stream = steps_per_epoch * batch

    seeds = list(range(args.seed, args.seed + args.seeds))

    def build(method: str, ds: Any, seed: int) -> PipelineSimulator:
        stages = mlp_stages(ds.num_features, args.hidden, ds.num_classes, args.stages,
                            activation=args.activation, seed=seed)
        if method in pb_all:
            return PipelineSimulator(stages, make_pb_opt,
                                     method="sequential" if method == PB_SYNC else method,
                                     schedule="PB", n_microbatches=pb_stream)
        ue = args.update_every if method in ("pipedream-2bw", "xpipe") else None
        if bitpipe and method != "sequential":
            return BitPipeSimulator(stages, make_opt, method=method,  # type: ignore[return-value]
                                    n_microbatches=args.microbatches, update_every=ue)
        return PipelineSimulator(stages, make_opt, method=method,  # sequential: no schedule
                                 schedule="1F1B" if bitpipe else args.schedule,
                                 n_microbatches=args.microbatches, update_every=ue)

    def build_all(ds: Any, seed: int) -> dict[str, PipelineSimulator]:
        sims = {}
        for method in args.methods:
            try:
                sims[method] = build(method, ds, seed)
            except ValueError as exc:
                parser.error(f"method {method}: {exc}")
        return sims

    # Build the first seed's simulators first so configuration errors surface before any
    # training (the other seeds only change the data and the initial weights).
    first_sims: dict[str, PipelineSimulator] | None = build_all(ds, args.seed)

    config = {
        "dataset": args.dataset, "num_train": int(ds.x_train.shape[0]),
        "num_test": int(ds.x_test.shape[0]), "stages": args.stages, "schedule": args.schedule,
        "num_ranks": num_ranks, "stages_per_rank": spr, "optimizer": args.optimizer, "lr": lr,
        "microbatch_size": args.microbatch_size, "microbatches": args.microbatches,
        "epochs": args.epochs, "steps_per_epoch": steps_per_epoch, "hidden": args.hidden,
        "activation": args.activation, "update_every": args.update_every,
        "methods": list(args.methods), "seed": args.seed, "seeds": seeds,
        "torch": torch.__version__,
        "pb_methods": pb_methods, "pb_lr": pb_lr, "pb_optimizer": "sgd",
        "pb_momentum": PB_MOMENTUM, "pb_microbatch_size": 1, "pb_stream_length": pb_stream,
    }
    print(f"predictopt compare: {args.dataset} ({config['num_train']} train / "
          f"{config['num_test']} test), {args.stages}-stage {args.activation} MLP (hidden "
          f"{args.hidden}) on "
          f"{args.schedule} with {num_ranks} ranks, {args.optimizer} lr {lr:g}, "
          f"{args.microbatches} micro-batches x {args.microbatch_size}, {args.epochs} epochs "
          f"({steps_per_epoch} steps each)"
          + (f", {len(seeds)} seeds ({seeds[0]}..{seeds[-1]})" if len(seeds) > 1 else ""),
          flush=True)
    if pb_methods:
        print(f"  {', '.join(pb_methods)}: Pipelined Backpropagation, every layer a stage "
              f"({args.stages}), 1 sample per update, sgd (momentum {PB_MOMENTUM:g}) lr "
              f"{pb_lr:g}, one stream of {pb_stream} samples per epoch", flush=True)

    def run(method: str, sim: PipelineSimulator, ds: Any, seed: int, bar: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        pb = method in pb_all
        if pb:
            per_sample = train(sim, ds.x_train, ds.y_train, epochs=args.epochs,
                               microbatch_size=1, seed=seed,
                               progress=_ScaledProgress(bar, steps_per_epoch),
                               per_microbatch=True)
            curve = [sum(per_sample[i:i + batch]) / batch
                     for i in range(0, len(per_sample), batch)]
        else:
            curve = train(sim, ds.x_train, ds.y_train, epochs=args.epochs,
                          microbatch_size=args.microbatch_size, seed=seed, progress=bar)
        elapsed = time.perf_counter() - t0
        train_loss, _ = sim.loss_and_accuracy(ds.x_train, ds.y_train)
        test_loss, test_acc = sim.loss_and_accuracy(ds.x_test, ds.y_test)
        return {
            "final_train_loss": train_loss, "test_accuracy": test_acc,
            "train_loss_curve": curve, "time_s": elapsed,
            "max_staleness": sim.max_staleness, "test_loss": test_loss,
            "update_every": sim.update_every,
            "updates_per_stage": sim.workers[0].num_updates,
            "schedule": sim.schedule,
            "optimizer": "sgd" if pb else args.optimizer,
            "lr": pb_lr if pb else lr,
            "microbatch_size": 1 if pb else args.microbatch_size,
            "updates_per_step": batch if pb else args.microbatches // sim.update_every,
        }

    per_seed: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    total = steps_per_epoch * args.epochs * len(args.methods) * len(seeds)
    with tqdm(total=total, desc="compare", unit="step", disable=args.no_progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for seed in seeds:
            if first_sims is not None:
                seed_ds, sims, first_sims = ds, first_sims, None
            else:
                seed_ds = load_dataset(args.dataset, seed=seed)
                sims = build_all(seed_ds, seed)
            for method, sim in sims.items():
                bar.set_description(method if len(seeds) == 1 else f"{method} seed {seed}")
                per_seed[method].append(run(method, sim, seed_ds, seed, bar))
    results = {m: _aggregate_seeds(seeds, runs) for m, runs in per_seed.items()}

    header = ["method", "final train loss", "test acc", "time (s)", "max staleness",
              "upd/step", "optimizer"]
    rows = [[m, _mean_std(r, "final_train_loss", ".4f"), _mean_std(r, "test_accuracy", ".4f"),
             f"{r['time_s']:.1f}", str(r["max_staleness"]), str(r["updates_per_step"]),
             f"{r['optimizer']} {r['lr']:g}"] for m, r in results.items()]
    if len(seeds) > 1:
        print(f"final train loss and test acc: mean ± sample std over {len(seeds)} seeds "
              f"({seeds[0]}..{seeds[-1]}); time: mean per seed")
    print(_format_table(header, rows))

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump({"config": config, "methods": results}, f, indent=1)
    _plot_curves(results, config, out / "curves.png")
    print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    return 0


class _ScaledProgress:
    """Forwards ``update(n)`` as ``update(n * factor)``: a PB stream counts as ``factor`` steps."""

    def __init__(self, bar: Any, factor: int) -> None:
        self.bar, self.factor = bar, factor

    def update(self, n: int = 1) -> None:
        self.bar.update(n * self.factor)

    def set_postfix(self, **kwargs: Any) -> None:
        self.bar.set_postfix(**kwargs)


# ---------------------------------------------------------------------------------------------
# staleness
# ---------------------------------------------------------------------------------------------


def _run_staleness(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .pipeline.schedules import (
        bubble_fraction,
        bubble_rate,
        peak_activations,
        render_timeline,
        schedule_actions,
        stage_to_rank,
        staleness,
    )
    from .pipeline.schedules import timeline as make_timeline

    if args.schedule == "BitPipe":
        return _run_staleness_bitpipe(args, parser)
    try:
        table = staleness(args.schedule, args.ranks, args.microbatches,
                          stages_per_rank=args.stages_per_rank, update_every=args.update_every)
        placement = stage_to_rank(args.schedule, args.ranks, args.stages_per_rank)
        tl = make_timeline(args.schedule, args.ranks, args.microbatches,
                           stages_per_rank=args.stages_per_rank)
        equal = make_timeline(args.schedule, args.ranks, args.microbatches,
                              stages_per_rank=args.stages_per_rank,
                              durations={"F": 1, "B": 2, "I": 1, "W": 1})
        peak = max(peak_activations(schedule_actions(
            args.schedule, args.ranks, args.microbatches,
            stages_per_rank=args.stages_per_rank)).values())
    except ValueError as exc:
        parser.error(str(exc))
    spr = len(placement) // args.ranks
    print(f"staleness s(stage, micro-batch) for {args.schedule}: {args.ranks} ranks x {spr} "
          f"stage(s), {args.microbatches} micro-batches, update every {args.update_every} "
          f"completed backward(s)")
    header = ["stage", "rank"] + [f"mb{i}" for i in range(args.microbatches)] + ["max"]
    rows = [[str(k), str(placement[k])] + [str(v) for v in vals] + [str(max(vals))]
            for k, vals in table.items()]
    print(_format_table(header, rows))
    print(f"bubble fraction (F=1, B=2, I=W=1): {bubble_fraction(tl):.3f}")
    print(f"bubble rate per unit of work, Zero Bubble's measure (T_F=T_B=T_W): "
          f"{bubble_rate(equal):.3f}")
    print(f"peak activations: {peak:g} micro-batches on the busiest rank")
    path = args.out if args.out is not None else Path(f"runs/staleness_{args.schedule}.png")
    render_timeline(tl, path, title=f"{args.schedule}, {args.ranks} ranks, "
                                    f"{args.microbatches} micro-batches")
    print(f"wrote {path}")
    return 0


def _run_staleness_bitpipe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``predictopt staleness --schedule BitPipe``: one row per copy (replica, chunk)."""
    from .pipeline import bitpipe as bp
    from .pipeline.schedules import bubble_fraction, bubble_rate, render_timeline

    try:
        table = bp.bitpipe_staleness(args.ranks, args.microbatches,
                                     update_every=args.update_every)
        tl = bp.bitpipe_timeline(args.ranks, args.microbatches,
                                 update_every=args.update_every)
        equal = bp.bitpipe_timeline(args.ranks, args.microbatches, durations={"F": 1, "B": 2},
                                    update_every=args.update_every)
        peak = max(bp.bitpipe_peak_activations(args.ranks, args.microbatches).values())
    except ValueError as exc:
        parser.error(str(exc))
    place = bp.bitpipe_placement(args.ranks)
    half = args.microbatches // 2
    print(f"staleness s(copy, micro-batch) for BitPipe: {args.ranks} ranks x 4 chunk copies, "
          f"{args.microbatches} micro-batches (0..{half - 1} down, {half}.."
          f"{args.microbatches - 1} up), update every {args.update_every} completed "
          f"backward(s) of a copy, with its partner")
    header = ["replica", "chunk", "rank"] + [f"mb{i}" for i in range(half)] + ["max"]
    rows = [[rep, str(c), str(place[(rep, c)])] + [str(v) for v in vals] + [str(max(vals))]
            for (rep, c), vals in table.items()]
    print(_format_table(header, rows))
    print(f"bubble fraction (F=1, B=2): {bubble_fraction(tl):.3f}")
    print(f"bubble rate per unit of work, Zero Bubble's measure (T_F=T_B=T_W): "
          f"{bubble_rate(equal):.3f}")
    print(f"peak activations: {peak:g} micro-batches on the busiest rank (weights: 2x 1F1B's)")
    path = args.out if args.out is not None else Path("runs/staleness_BitPipe.png")
    render_timeline(tl, path, title=f"BitPipe, {args.ranks} ranks, {args.microbatches} "
                                    "micro-batches")
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``predictopt`` console script (and ``python -m predictopt``).

    Returns:
        The exit status (argparse exits with status 2 on bad arguments).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        return _run_compare(args, args.subparser)
    return _run_staleness(args, args.subparser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
