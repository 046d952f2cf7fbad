"""Helpers of tests/test_runtime.py: a bounded multi-process launcher and the per-rank workers.

Kept free of pytest so that the spawned children import little. Every child initialises a gloo
group through a FileStore with a short timeout, runs one worker function and writes its result
(or traceback) to a file; the parent kills every child still running at its deadline.
"""

from __future__ import annotations

import copy
import datetime
import io
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

IN, HID, OUT = 8, 8, 4
MB = 2  # samples per micro-batch


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _entry(fn: Callable[..., Any], rank: int, world_size: int, tmp: str, pg_timeout: float,
           args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    out = os.path.join(tmp, f"rank{rank}.pkl")
    try:
        dist.init_process_group(
            "gloo", store=dist.FileStore(os.path.join(tmp, "store"), world_size), rank=rank,
            world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout))
        value = fn(rank, world_size, *args)
        with open(out, "wb") as f:
            pickle.dump({"ok": True, "value": value}, f)
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(out, "wb") as f:
            pickle.dump({"ok": False, "error": traceback.format_exc()}, f)
        os._exit(1)  # do not wait for peers: they see the closed sockets at once
    dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 150.0,
           pg_timeout: float = 30.0, wait_for: list[int] | None = None
           ) -> list[dict[str, Any]]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    ``wait_for``: the ranks whose end ends the launch (default all); the others are then killed
    (their result is whatever they wrote).

    Returns, per rank, ``{"ok": True, "value": ...}``, ``{"ok": False, "error": traceback}``
    or ``{"ok": False, "error": "no result", "exitcode": ...}``; each also has ``"exitcode"``.

    Raises:
        TimeoutError: some child still ran at ``timeout`` seconds (all are killed first).
    """
    tmp = tempfile.mkdtemp(prefix="predictopt_dist_")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, tmp, pg_timeout, args),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    waited = range(world_size) if wait_for is None else wait_for
    for r in waited:
        procs[r].join(max(0.0, deadline - time.monotonic()))
    alive = [r for r in waited if procs[r].is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(10)
    results = []
    for r, p in enumerate(procs):
        path = os.path.join(tmp, f"rank{r}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                res = pickle.load(f)
        else:
            res = {"ok": False, "error": "no result"}
        res["exitcode"] = p.exitcode
        results.append(res)
    if alive:
        raise TimeoutError(f"ranks {alive} still ran after {timeout} s; results: {results}")
    return results


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "sgdm": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
}


def make_stages(num_stages: int, seed: int = 1, dropout: float = 0.0) -> list[torch.nn.Module]:
    """The test MLP; with ``dropout``, every stage but the last ends with a Dropout."""
    from predictopt.data import mlp_stages

    stages = mlp_stages(IN, HID, OUT, num_stages, seed=seed)
    if dropout:
        stages = [torch.nn.Sequential(*m, torch.nn.Dropout(dropout)) if k < num_stages - 1
                  else m for k, m in enumerate(stages)]
    return stages


def make_batches(n: int, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(MB * n, IN, generator=gen), torch.randint(0, OUT, (MB * n,),
                                                                   generator=gen))
            for _ in range(steps)]


def spr_of(schedule: str) -> int:
    from predictopt.pipeline import stage_to_rank

    return len(stage_to_rank(schedule, 1))


def make_native(stages: list[Any], schedule: str, n: int, scale_grads: bool = False) -> Any:
    """The torch schedule object over this rank's stages, built as a user would."""
    import torch.distributed.pipelining.schedules as S

    from predictopt.pipeline.schedules import _resolve_schedule

    _, cls = _resolve_schedule(schedule)
    if issubclass(cls, S.PipelineScheduleSingle):
        return cls(stages[0], n_microbatches=n, loss_fn=F.cross_entropy, scale_grads=scale_grads)
    return cls(stages, n_microbatches=n, loss_fn=F.cross_entropy, scale_grads=scale_grads)


def local_stages(rank: int, world_size: int, schedule: str, modules: list[torch.nn.Module],
                 method: str, opt: str, **kw: Any) -> list[Any]:
    """This rank's PredictiveStage objects, created by hand (no builder)."""
    from predictopt.pipeline import stage_to_rank
    from predictopt.pipeline.runtime import PredictiveStage

    placement = stage_to_rank(schedule, world_size)
    return [PredictiveStage(modules[k], k, len(modules), "cpu",
                            optimizer=OPTIMIZERS[opt](modules[k].parameters()), method=method,
                            **kw)
            for k in sorted(k for k, r in placement.items() if r == rank)]


def run_steps(rank_stages: list[Any], schedule: Any, batches: list[tuple[Any, Any]]
              ) -> list[torch.Tensor]:
    """``schedule.step`` on every batch, each rank passing what it must; the losses if last."""
    first = any(s.is_first for s in rank_stages)
    last = any(s.is_last for s in rank_stages)
    out: list[torch.Tensor] = []
    for x, y in batches:
        losses: list[torch.Tensor] = []
        args = (x,) if first else ()
        kw: dict[str, Any] = {"target": y, "losses": losses} if last else {}
        schedule.step(*args, **kw)
        out += [loss.detach() for loss in losses]
    return out


def simulate(schedule: str, world_size: int, method: str, opt: str, n: int,
             batches: list[tuple[Any, Any]], update_every: int | None = None, seed: int = 1,
             dropout: float = 0.0) -> tuple[list[torch.nn.Module], torch.Tensor, Any]:
    from predictopt.pipeline import PipelineSimulator

    modules = make_stages(world_size * spr_of(schedule), seed, dropout)
    sim = PipelineSimulator(modules, OPTIMIZERS[opt], method=method, schedule=schedule,
                            n_microbatches=n, loss_fn=F.cross_entropy, update_every=update_every)
    losses: list[float] = []
    for x, y in batches:
        losses += sim.step(x, y)
    return modules, torch.tensor(losses, dtype=torch.float32), sim


def compare(tag: str, rank_stages: list[Any], losses: list[torch.Tensor],
            ref_modules: list[torch.nn.Module], ref_losses: torch.Tensor) -> list[str]:
    """Mismatch descriptions (empty: bit for bit equal)."""
    bad = []
    for s in rank_stages:
        for (name, p), q in zip(s.submod.named_parameters(),
                                ref_modules[s.stage_index].parameters(), strict=True):
            if not torch.equal(p.detach(), q.detach()):
                diff = (p.detach() - q.detach()).abs().max().item()
                bad.append(f"{tag}: stage {s.stage_index} {name} differs (max {diff:.3g})")
    if any(s.is_last for s in rank_stages):
        got = torch.stack(losses) if losses else torch.empty(0)
        if got.shape != ref_losses.shape or not torch.equal(got, ref_losses):
            bad.append(f"{tag}: losses {got.tolist()} != simulator {ref_losses.tolist()}")
    return bad


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def config_tag(cfg: dict[str, Any]) -> str:
    extra = "".join(f"/{k}" for k in ("builder", "attach", "scale_grads", "dropout")
                    if cfg.get(k))
    u = cfg.get("update_every")
    return (f"{cfg['schedule']}/{cfg['method']}/{cfg['opt']}/n={cfg['n']}"
            f"{'' if u is None else f'/u={u}'}{extra}")


def equivalence_worker(rank: int, world_size: int, configs: list[dict[str, Any]],
                       extras: bool = False) -> dict[str, Any]:
    """Train every config distributed; return this rank's final weights, losses and timings.

    The parent compares them with the simulator (computed once there, not on every rank).
    """
    from predictopt.pipeline.runtime import attach, build_pipeline

    results: dict[str, Any] = {}
    times: dict[str, float] = {}
    for i, cfg in enumerate(configs):
        t0 = time.perf_counter()
        schedule, method, opt, n = cfg["schedule"], cfg["method"], cfg["opt"], cfg["n"]
        u = cfg.get("update_every")
        tag = config_tag(cfg)
        batches = make_batches(n, cfg["steps"], seed=i)
        torch.manual_seed(100 + i)  # every process the same seed: the random streams agree
        modules = make_stages(world_size * spr_of(schedule), dropout=cfg.get("dropout", 0.0))
        if cfg.get("builder"):
            stages, sched = build_pipeline(
                modules, schedule, rank=rank, world_size=world_size, n_microbatches=n,
                make_optimizer=OPTIMIZERS[opt], method=method, loss_fn=F.cross_entropy,
                update_every=u)
        else:  # plain torch user code; the stages find the schedule on their own
            stages = local_stages(rank, world_size, schedule, modules, method, opt,
                                  update_every=u)
            sched = make_native(stages, schedule, n, scale_grads=cfg.get("scale_grads", False))
            if cfg.get("attach"):
                attach(sched)
        losses = run_steps(stages, sched, batches)
        results[tag] = {
            "weights": {s.stage_index: [p.detach().clone() for p in s.submod.parameters()]
                        for s in stages},
            "losses": torch.stack(losses) if any(s.is_last for s in stages) else None,
        }
        dist.barrier()
        times[tag] = time.perf_counter() - t0
    out: dict[str, Any] = {"results": results, "times": times, "bad": []}
    if extras:
        t0 = time.perf_counter()
        out["bad"] += _checkpoint_and_eval(rank, world_size)
        out["misconfig"] = _placement_errors(rank, world_size)
        times["extras"] = time.perf_counter() - t0
    return out


def check_against_simulator(world_size: int, configs: list[dict[str, Any]],
                            per_rank: list[dict[str, Any]]) -> list[str]:
    """Simulate every config once and compare every rank's weights and losses exactly."""
    bad: list[str] = []
    for i, cfg in enumerate(configs):
        tag = config_tag(cfg)
        batches = make_batches(cfg["n"], cfg["steps"], seed=i)
        torch.manual_seed(100 + i)
        ref_modules, ref_losses, _ = simulate(cfg["schedule"], world_size, cfg["method"],
                                              cfg["opt"], cfg["n"], batches,
                                              cfg.get("update_every"),
                                              dropout=cfg.get("dropout", 0.0))
        seen_stages: set[int] = set()
        seen_losses = 0
        for res in per_rank:
            got = res["results"][tag]
            for k, ws in got["weights"].items():
                seen_stages.add(k)
                for j, (p, q) in enumerate(zip(ws, ref_modules[k].parameters(), strict=True)):
                    if not torch.equal(p, q.detach()):
                        diff = (p - q.detach()).abs().max().item()
                        bad.append(f"{tag}: stage {k} parameter {j} differs (max {diff:.3g})")
            if got["losses"] is not None:
                seen_losses += 1
                if not torch.equal(got["losses"], ref_losses):
                    bad.append(f"{tag}: losses {got['losses'].tolist()} != simulator "
                               f"{ref_losses.tolist()}")
        if seen_stages != set(range(len(ref_modules))) or seen_losses != 1:
            bad.append(f"{tag}: stages {sorted(seen_stages)} / {seen_losses} loss lists seen")
    return bad


def _save_load(sd: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _checkpoint_and_eval(rank: int, world_size: int) -> list[str]:
    """Resume from a checkpoint bit for bit; eval between steps uses the real weights."""
    bad: list[str] = []
    for schedule, method, opt in (("1F1B", "pipeoptim", "adamw"),
                                  ("1F1B", "pipedream-2bw", "sgdm"),
                                  ("ZBVZeroBubble", "pipeoptim", "adam")):
        n = 4
        tag = f"checkpoint {schedule}/{method}/{opt}"
        batches = make_batches(n, 3, seed=7)
        ref_modules, ref_losses, sim = simulate(schedule, world_size, method, opt, n, batches)
        num_stages = world_size * spr_of(schedule)
        # 1 step, checkpoint, a fresh pipeline (new modules, optimizers, schedule), 2 steps
        stages = local_stages(rank, world_size, schedule, make_stages(num_stages), method, opt)
        sched = make_native(stages, schedule, n)
        losses = run_steps(stages, sched, batches[:1])
        saved = [_save_load(s.state_dict()) for s in stages]
        # eval on the real weights, then training must continue unchanged
        first = any(s.is_first for s in stages)
        last = any(s.is_last for s in stages)
        x, y = batches[0]
        with torch.no_grad():
            out = sched.eval(*((x,) if first else ()), **({"target": y} if last else {}))
        if last:
            one = _sim_after(schedule, world_size, method, opt, n, batches[:1])
            want = torch.cat([one.evaluate(xi) for xi in x.split(MB)])
            if not torch.equal(out, want):
                bad.append(f"{tag}: eval output differs from the real weights' output")
        fresh = local_stages(rank, world_size, schedule, make_stages(num_stages, seed=99),
                             method, opt)
        for s, sd in zip(fresh, saved):
            s.load_state_dict(sd)
        sched2 = make_native(fresh, schedule, n)
        losses += run_steps(fresh, sched2, batches[1:])
        bad += compare(tag, fresh, losses, ref_modules, ref_losses)
        # and the interrupted run itself, continued after eval
        losses1 = run_steps(stages, sched, batches[1:])
        bad += compare(tag + " (after eval)", stages, losses[:n] + losses1, ref_modules,
                       ref_losses)
        dist.barrier()
    return bad


def _sim_after(schedule: str, world_size: int, method: str, opt: str, n: int,
               batches: list[tuple[Any, Any]]) -> Any:
    return simulate(schedule, world_size, method, opt, n, batches)[2]


def _placement_errors(rank: int, world_size: int) -> list[str]:
    """Errors raised on every rank before any communication (so nobody waits)."""
    from predictopt.pipeline.runtime import PredictiveStage, attach

    msgs = []
    modules = make_stages(2 * world_size)
    # V schedule with loop placement: rank r holds r and r + K instead of r and 2K - 1 - r
    wrong = [PredictiveStage(modules[k], k, 2 * world_size, "cpu",
                             optimizer=OPTIMIZERS["adam"](modules[k].parameters()))
             for k in (rank, rank + world_size)]
    try:
        sched = make_native(wrong, "ZBVZeroBubble", 4)
        attach(sched)
        msgs.append("no error")
    except (ValueError, RuntimeError) as e:
        msgs.append(f"{type(e).__name__}: {e}")
    # and automatically at the first step, before any communication
    try:
        sched = make_native(wrong, "DualPipeV", 4)
        x, y = make_batches(4, 1)[0]
        sched.step(*((x,) if rank == 0 else ()), **({"target": y} if rank == 0 else {}))
        msgs.append("no error")
    except (ValueError, RuntimeError) as e:
        msgs.append(f"{type(e).__name__}: {e}")
    dist.barrier()
    return msgs


def fault_worker(rank: int, world_size: int, mode: str) -> dict[str, Any]:
    """Rank 1 dies (``kill``) or hangs (``hang``) in the second step; the others must raise."""
    from predictopt.pipeline.runtime import build_pipeline

    modules = make_stages(world_size)
    stages, sched = build_pipeline(modules, "1F1B", n_microbatches=4,
                                   make_optimizer=OPTIMIZERS["adamw"], loss_fn=F.cross_entropy)
    batches = make_batches(4, 3)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        if step == 1 and rank == 1:
            if mode == "kill":
                os._exit(17)
            time.sleep(120)  # hang; the parent kills this rank
        first, last = rank == 0, rank == world_size - 1
        try:
            sched.step(*((x,) if first else ()), **({"target": y} if last else {}))
        except Exception as e:  # noqa: BLE001 - the expected failure
            return {"raised": f"{type(e).__name__}: {str(e)[:200]}",
                    "seconds": time.perf_counter() - t0}
    return {"raised": None, "seconds": time.perf_counter() - t0}


def copy_modules(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    return copy.deepcopy(modules)


# ---------------------------------------------------------------------------------------------
# Registered action-list schedules (tests/test_zero_bubble.py)
# ---------------------------------------------------------------------------------------------

#: A schedule from the automatic scheduler with unequal costs (two I before a W on rank 0).
TEST_SCHEDULE = "ZBAutoTest"


def _auto_test_schedule(k: int, n: int) -> Any:
    from predictopt.pipeline.zero_bubble import auto_schedule

    return auto_schedule(k, n, t_f=1.0, t_b=2.0, t_w=2.0, t_comm=0.5, mem_limit=2 * k)


def ensure_test_schedule() -> str:
    """Register :data:`TEST_SCHEDULE` in this process (every rank must, like the parent)."""
    from predictopt.pipeline.schedules import available_schedules, register_schedule

    if TEST_SCHEDULE not in available_schedules():
        register_schedule(TEST_SCHEDULE, _auto_test_schedule, description="test costs")
    return TEST_SCHEDULE


def registered_equivalence_worker(rank: int, world_size: int, configs: list[dict[str, Any]]
                                  ) -> dict[str, Any]:
    """:func:`equivalence_worker` after registering the test schedule on this rank."""
    ensure_test_schedule()
    return equivalence_worker(rank, world_size, configs)


def determinism_worker(rank: int, world_size: int, threads: list[int]) -> dict[str, Any]:
    """``check_determinism`` with the given intra-op threads per rank: its warnings."""
    import warnings

    from predictopt.pipeline.runtime import check_determinism

    torch.set_num_threads(threads[rank])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = check_determinism()
    return {"settings": settings, "warnings": [str(w.message) for w in caught]}


def postvalidation_worker(rank: int, world_size: int, configs: list[dict[str, Any]]
                          ) -> dict[str, Any]:
    """Train every config with DistributedPostValidation; this rank's weights, losses and
    counters (compared with the simulator's deferred post-validation by the parent)."""
    from predictopt.pipeline import DistributedPostValidation
    from predictopt.pipeline.runtime import attach

    out: dict[str, Any] = {}
    for i, cfg in enumerate(configs):
        batches = postvalidation_batches(cfg, i)
        torch.manual_seed(100 + i)
        modules = make_stages(world_size * spr_of(cfg["schedule"]))
        stages = local_stages(rank, world_size, cfg["schedule"], modules, cfg["method"],
                              cfg["opt"])
        sched = make_native(stages, cfg["schedule"], cfg["n"])
        attach(sched)
        pv = DistributedPostValidation(stages, max_norm=cfg["max_norm"])
        losses = []
        for x, y in batches:
            losses += run_steps(stages, sched, [(x, y)])
            pv.validate()
        out[config_tag(cfg)] = {
            "weights": {s.stage_index: [p.detach().clone() for p in s.submod.parameters()]
                        for s in stages},
            "losses": torch.stack(losses) if any(s.is_last for s in stages) else None,
            "counters": (pv.redone, pv.clipped, pv.skipped, pv.pending)}
        dist.barrier()
    return out


def postvalidation_batches(cfg: dict[str, Any], i: int) -> list[tuple[Any, Any]]:
    """The config's batches, scaled up so that clipping triggers; ``poison``: an Inf in the
    second batch (every gradient of that step non-finite: the update is skipped)."""
    batches = [(3.0 * x, y) for x, y in make_batches(cfg["n"], cfg["steps"], seed=i)]
    if cfg.get("poison"):
        batches[1][0][0, 0] = float("inf")
    return batches


def simulate_postvalidation(cfg: dict[str, Any], i: int, world_size: int) -> dict[str, Any]:
    from predictopt.pipeline import PipelineSimulator, PostValidation

    batches = postvalidation_batches(cfg, i)
    torch.manual_seed(100 + i)
    modules = make_stages(world_size * spr_of(cfg["schedule"]))
    sim = PipelineSimulator(modules, OPTIMIZERS[cfg["opt"]], method=cfg["method"],
                            schedule=cfg["schedule"], n_microbatches=cfg["n"],
                            loss_fn=F.cross_entropy)
    pv = PostValidation(sim.workers, max_norm=cfg["max_norm"], deferred=True)
    losses: list[float] = []
    for x, y in batches:
        losses += sim.step(x, y)
        pv.validate()
    return {"modules": modules, "losses": torch.tensor(losses, dtype=torch.float32),
            "counters": (pv.redone, pv.clipped, pv.skipped, pv.pending)}


def _bitpipe_run(cls: Any, cfg: dict[str, Any], i: int, world_size: int,
                 step: Callable[[Any, Any, Any], dict[int, float]]) -> dict[str, Any]:
    """Config ``i`` trained by ``cls`` (BitPipeSimulator or BitPipeRuntime) from the same seeds
    and batches; the copies' weights and ``{micro-batch: [loss per step]}``."""
    batches = make_batches(cfg["n"], cfg["steps"], seed=i)
    torch.manual_seed(100 + i)
    modules = make_stages(2 * world_size, dropout=cfg.get("dropout", 0.0))
    run = cls(modules, OPTIMIZERS[cfg["opt"]], method=cfg["method"], n_microbatches=cfg["n"],
              loss_fn=F.cross_entropy)
    losses: dict[int, list[float]] = {}
    for x, y in batches:
        for mb, v in step(run, x, y).items():
            losses.setdefault(mb, []).append(v)
    return {"weights": {key: [p.detach().clone() for p in w.module.parameters()]
                        for key, w in run.copies.items()}, "losses": losses}


def bitpipe_worker(rank: int, world_size: int, configs: list[dict[str, Any]]
                   ) -> dict[str, Any]:
    """Train every config with BitPipeRuntime; this rank's copies' weights and losses."""
    from predictopt.pipeline import BitPipeRuntime

    edge = rank in (0, world_size - 1)  # the ranks holding first and last chunks
    out: dict[str, Any] = {}
    for i, cfg in enumerate(configs):
        out[config_tag({**cfg, "schedule": "BitPipe"})] = _bitpipe_run(
            BitPipeRuntime, cfg, i, world_size,
            lambda rt, x, y: rt.step(x, y) if edge else rt.step())
        dist.barrier()
    return out


def simulate_bitpipe(cfg: dict[str, Any], i: int, world_size: int) -> dict[str, Any]:
    from predictopt.pipeline import BitPipeSimulator

    return _bitpipe_run(BitPipeSimulator, cfg, i, world_size,
                        lambda sim, x, y: dict(enumerate(sim.step(x, y))))


def launch_ok(fn: Callable[..., Any], world_size: int, *args: Any, **kw: Any) -> list[Any]:
    """`launch`, failing with a rank's traceback if any rank failed; the ranks' values."""
    results = launch(fn, world_size, *args, **kw)
    for r, res in enumerate(results):
        if not res["ok"]:
            raise AssertionError(f"rank {r} failed:\n{res.get('error')}")
    return [res["value"] for res in results]
