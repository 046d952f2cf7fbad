"""The benchmark scripts' pure parts, on CPU (no timing): output paths never overwrite a result
file unless asked, the GPU benchmark's arithmetic and shapes, the pipeline benchmark's
variants and summary, and gpu.sh's refusal without CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import bench_gpu, bench_pipeline
from benchmarks.bench_predict import fresh_path
from predictopt.pipeline import DEFAULT_METHOD, get_method

ROOT = Path(__file__).resolve().parents[1]


def test_fresh_path_never_overwrites_by_default(tmp_path) -> None:
    default = tmp_path / "r.json"
    assert fresh_path(default) == default
    default.write_text("{}")
    other = fresh_path(default)
    assert other != default and other.parent == tmp_path and other.name.startswith("r-")
    assert other.suffix == ".json"
    assert fresh_path(default, tmp_path / "x.json") == tmp_path / "x.json"
    assert fresh_path(default, default) == default  # asked for


def test_gpt2_shapes_are_124m() -> None:
    n = sum(torch.Size(s).numel() for s in bench_gpu.gpt2_shapes())
    assert 124_000_000 < n < 124_700_000


def test_gpu_summary_arithmetic() -> None:
    ms = {"fused_step": [2.0, 4.0, 3.0], "predict": [1.0, 1.5, 2.0],
          "predict_restore": [3.0, 3.0, 3.0]}
    out = bench_gpu.summarise(ms, param_bytes=10**9, bw=10**12)  # 1 GB at 1 TB/s: 1 ms a pass
    assert out["median_ms"]["fused_step"] == 3.0
    assert out["predict_limit_ms"] == pytest.approx(4.0)
    assert out["predict_over_limit"] == pytest.approx(1.5 / 4.0)
    assert out["predict_restore_over_limit"] == pytest.approx(3.0 / 8.0)
    assert out["predict_over_fused_step"] == pytest.approx(0.5)
    assert out["min_ms"]["predict"] == 1.0 and out["max_ms"]["predict"] == 2.0


def test_bench_gpu_refuses_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        bench_gpu.main([])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_sh_fails_clearly_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run")
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", __import__("sys").executable))
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "no CUDA device" in res.stderr


def test_pipeline_variants_and_quick_args() -> None:
    assert bench_pipeline.VARIANTS[0] == "plain"
    assert DEFAULT_METHOD in bench_pipeline.VARIANTS
    for v in ("gpipe", "pipedream", "pipeoptim", "pipeoptim-lean"):
        assert v in bench_pipeline.VARIANTS
    args = bench_pipeline.parse_args(["--quick"])
    assert (args.rounds, args.steps, args.stage, args.optimizer) == (1, 2, ["mlp"], ["fused"])
    assert bench_pipeline._out(args, bench_pipeline.OVERHEAD_OUT) != bench_pipeline.OVERHEAD_OUT
    full = bench_pipeline.parse_args([])
    assert full.stage == ["mlp", "transformer"] and full.optimizer == ["fused", "default"]
    assert full.microbatches == 8
    every = bench_pipeline.method_of(f"{DEFAULT_METHOD}-every1")
    assert every.calibration_every == 1 and every.name == f"{DEFAULT_METHOD}-every1"
    default = get_method(DEFAULT_METHOD)
    assert every.with_(name=DEFAULT_METHOD, calibration_every=default.calibration_every) == default
    with pytest.raises(SystemExit):
        bench_pipeline.parse_args(["--variants", "pipeoptim-every-3"])


def test_pipeline_summary_ratios_per_round() -> None:
    def entry(r, v, cpu):
        return {"round": r, "variant": v, "cpu": cpu, "wall": cpu}

    rank0 = [entry(0, "plain", [1.0, 1.0]), entry(0, "gpipe", [2.0, 2.0]),
             entry(1, "gpipe", [3.0, 3.0]), entry(1, "plain", [3.0, 3.0])]
    rows = bench_pipeline.summarise([rank0, rank0], ["plain", "gpipe"], n=2)
    g = next(r for r in rows if r["variant"] == "gpipe")
    assert g["cpu_ratio_min"] == pytest.approx(1.0) and g["cpu_ratio_max"] == pytest.approx(2.0)
    assert g["cpu_ratio"] == pytest.approx(1.5)
    assert g["cpu_ms_per_microbatch"] == pytest.approx(1e3 * 5.0 / 2)


def test_doc_generators_say_what_is_not_measured_yet(tmp_path, monkeypatch) -> None:
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import gen_docs

    monkeypatch.setattr(gen_docs, "BENCH", tmp_path)
    for name in ("bench-predict-cost", "bench-predict-previous", "bench-predict-memory",
                 "bench-predict-calibrated", "bench-fidelity", "bench-pipeline-cost",
                 "bench-gpu"):
        text = gen_docs.GENERATORS[name]()
        assert text.startswith("(not measured yet: run `") and "benchmarks/results/" in text
    run = {"stage": "mlp", "optimizer": "fused", "description": "d", "microbatches": 4,
           "rounds": 1, "warmup": 1, "steps": 2, "ranks": 2, "machine": {"date": "today"},
           "results": [{"variant": v, "cpu_ms_per_microbatch": 1.0, "cpu_ms_min": 1.0,
                        "cpu_ms_max": 1.0, "cpu_ratio": 1.0, "cpu_ratio_min": 1.0,
                        "cpu_ratio_max": 1.0, "wall_ratio": 1.0}
                       for v in ("plain", DEFAULT_METHOD)]}
    (tmp_path / "pipeline_overhead.json").write_text(__import__("json").dumps({"runs": [run]}))
    text = gen_docs.GENERATORS["bench-pipeline-cost"]()
    assert f"`{DEFAULT_METHOD}` (default)" in text and "today" in text
