"""Run every benchmark: ``python -m benchmarks.run_all`` (or ``python benchmarks/run_all.py``).

Runs `benchmarks.bench_predict` (cost of predict_+restore_),
`benchmarks.bench_fidelity` (fidelity ratios of every torch.optim configuration) and
`benchmarks.bench_pipeline` (PredictiveStage overhead and pipeline throughput) and
`benchmarks.bench_memory` (peak extra memory of every pipeline method); each
prints its tables and writes its JSON under ``benchmarks/results/``. The figures in
``docs/benchmarks.md`` come from ``python -m benchmarks.run_all`` with the defaults.
"""

from __future__ import annotations

import argparse
import time

try:  # python -m benchmarks.run_all
    from benchmarks import bench_fidelity, bench_memory, bench_pipeline, bench_predict
except ImportError:  # python benchmarks/run_all.py
    import bench_fidelity  # type: ignore[no-redef]
    import bench_memory  # type: ignore[no-redef]
    import bench_pipeline  # type: ignore[no-redef]
    import bench_predict  # type: ignore[no-redef]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Run the predictopt benchmarks.")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="device of the predict_ benchmark (fidelity always runs on CPU)")
    ap.add_argument("--size", choices=["small", "full"], default="full")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads of the predict_ benchmark (0: torch's default)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip", choices=["predict", "fidelity", "pipeline", "memory"], nargs="*",
                    default=[])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if "predict" not in args.skip:
        bench_predict.main(["--device", args.device, "--size", args.size,
                            "--repeats", str(args.repeats), "--threads", str(args.threads)])
        print()
    if "fidelity" not in args.skip:
        bench_fidelity.main(["--seeds", str(args.seeds)])
        print()
    if "pipeline" not in args.skip:
        bench_pipeline.main([])
        print()
    if "memory" not in args.skip:
        bench_memory.main([])
    print(f"\nall benchmarks: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
