r"""Train a small transformer language model with asynchronous pipeline parallelism.

The model of :mod:`predictopt.lm` (token + position embedding, ``S`` pre-norm transformer
blocks, a linear head) is cut into ``S`` stages, one block each, and trained on the characters of
Python's own help topics (a corpus that ships with every Python) with
:class:`~predictopt.pipeline.runtime.PredictiveStage` under one of PyTorch's native pipeline
schedules: every stage updates itself after each micro-batch with the chosen method (by default
the library's :data:`~predictopt.pipeline.DEFAULT_METHOD`), inside ``schedule.step()``.

Distributed, one stage per process (gloo, CPU)::

    torchrun --nproc-per-node 4 examples/pipeline_lm.py

One process, the same training through the reference simulator (the printed losses are the
same numbers, bit for bit, as the distributed run's)::

    python examples/pipeline_lm.py --single-process

Options: ``--schedule`` (``1F1B``, ``GPipe``, ``Interleaved1F1B``, ``ZBVZeroBubble``, ...;
multi-stage schedules put 2 blocks on each process), ``--method`` (``pipeoptim``,
``pipedream``, ``gpipe``, ...), ``--steps``, ``--microbatches``, ``--lr``.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from predictopt.lm import lm_loss, lm_stages, load_text

# ---------------------------------------------------------------------------------------------
# Data and model: the yardstick of predictopt.lm
# ---------------------------------------------------------------------------------------------

DATA = load_text()  # Python's own help topics: ships with every Python, nothing is downloaded


def make_stages(num_stages: int, *, dim: int, heads: int, seq_len: int, seed: int
                ) -> list[nn.Module]:
    """All stages, initialised identically in every process."""
    return lm_stages(num_stages, DATA.vocab_size, dim=dim, heads=heads, context=seq_len,
                     seed=seed)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--single-process", action="store_true",
                    help="train in one process with the reference simulator")
    ap.add_argument("--ranks", type=int, default=4,
                    help="pipeline ranks simulated by --single-process (torchrun: WORLD_SIZE)")
    ap.add_argument("--schedule", default="1F1B")
    ap.add_argument("--method", default=None,
                    help="a registered method (default: predictopt.pipeline.DEFAULT_METHOD)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--microbatch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds after which a rank waiting for a dead or hung peer fails")
    return ap.parse_args(argv)


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=ARGS.lr, weight_decay=0.01)


def batches(args: argparse.Namespace) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    """The same training windows and held-out set in every process."""
    size = args.microbatches * args.microbatch_size
    gen = torch.Generator().manual_seed(args.seed)
    train = [DATA.batch(gen, size, args.seq_len) for _ in range(args.steps)]
    return train, DATA.held_out(size, args.seq_len)


def report(step: int, losses: list[float], t0: float, val: float | None = None) -> None:
    extra = "" if val is None else f"  val {val:.4f}"
    print(f"step {step:4d}  loss {sum(losses) / len(losses):.4f}{extra}  "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)


def run_single_process(args: argparse.Namespace) -> None:
    from predictopt.pipeline import PipelineSimulator, stage_to_rank

    num_stages = len(stage_to_rank(args.schedule, args.ranks))
    stages = make_stages(num_stages, dim=args.dim, heads=args.heads, seq_len=args.seq_len,
                         seed=args.seed)
    sim = PipelineSimulator(stages, make_optimizer, method=args.method, schedule=args.schedule,
                            n_microbatches=args.microbatches, loss_fn=lm_loss)
    print(f"single process: {args.schedule} over {args.ranks} simulated ranks, {num_stages} "
          f"stages, method {args.method}, vocab {DATA.vocab_size} (uniform loss "
          f"{math.log(DATA.vocab_size):.3f})")
    train, (xv, yv) = batches(args)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(train, 1):
        losses = sim.step(x, y)
        if step % args.log_every == 0 or step == 1:
            val = None
            if step % args.log_every == 0:
                with torch.no_grad():  # per micro-batch, as the pipeline's eval computes it
                    val_losses = [float(lm_loss(sim.evaluate(a), b)) for a, b in
                                  zip(xv.split(args.microbatch_size),
                                      yv.split(args.microbatch_size))]
                val = sum(val_losses) / len(val_losses)
            report(step, losses, t0, val)


def run_distributed(args: argparse.Namespace) -> None:
    from predictopt.pipeline.runtime import build_pipeline, init_distributed

    rank, world = init_distributed("gloo", timeout=args.timeout)
    try:
        from predictopt.pipeline import stage_to_rank

        num_stages = len(stage_to_rank(args.schedule, world))
        modules = make_stages(num_stages, dim=args.dim, heads=args.heads,
                              seq_len=args.seq_len, seed=args.seed)
        stages, schedule = build_pipeline(
            modules, args.schedule, n_microbatches=args.microbatches,
            make_optimizer=make_optimizer, method=args.method, loss_fn=lm_loss)
        first = any(s.is_first for s in stages)
        last = any(s.is_last for s in stages)
        if last:
            print(f"{world} processes: {type(schedule).__name__}, {num_stages} stages, method "
                  f"{args.method}, vocab {DATA.vocab_size} (uniform loss "
                  f"{math.log(DATA.vocab_size):.3f})", flush=True)
        train, (xv, yv) = batches(args)
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(train, 1):
            losses: list[Tensor] = []
            schedule.step(*((x,) if first else ()), **({"target": y, "losses": losses}
                                                       if last else {}))
            if step % args.log_every == 0:  # evaluation on the real weights (no update)
                val_losses: list[Tensor] = []
                with torch.no_grad():
                    schedule.eval(*((xv,) if first else ()), **(
                        {"target": yv, "losses": val_losses} if last else {}))
            if last and (step % args.log_every == 0 or step == 1):
                val = None if step % args.log_every else \
                    sum(float(v) for v in val_losses) / len(val_losses)
                report(step, [float(v.detach()) for v in losses], t0, val)
    finally:
        dist.destroy_process_group()


ARGS = parse_args([])


def main(argv: list[str] | None = None) -> None:
    global ARGS
    ARGS = parse_args(argv)
    if ARGS.method is None:
        from predictopt.pipeline import DEFAULT_METHOD

        ARGS.method = DEFAULT_METHOD
    torch.set_num_threads(1)  # 1 thread per process: identical numbers in both modes
    if ARGS.single_process:
        run_single_process(ARGS)
    elif "RANK" in os.environ:
        run_distributed(ARGS)
    else:
        raise SystemExit("launch with: torchrun --nproc-per-node 4 examples/pipeline_lm.py\n"
                         "or run in one process: python examples/pipeline_lm.py --single-process")


if __name__ == "__main__":
    main()
