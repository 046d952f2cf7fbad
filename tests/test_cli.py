"""Tests for the ``predictopt`` command line (predictopt.cli)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from predictopt.cli import DEFAULT_LR, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_tiny_config_writes_results(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--task", "mlp", "--dataset", "iris", "--stages", "2", "--epochs", "1",
               "--methods", "pipedream,pipeoptim", "--microbatch-size", "4",
               "--microbatches", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "final train loss" in text and "pipeoptim" in text and "pipedream" in text
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"config", "methods"}
    cfg = data["config"]
    assert cfg["dataset"] == "iris" and cfg["stages"] == 2 and cfg["epochs"] == 1
    assert cfg["methods"] == ["pipedream", "pipeoptim"]
    assert set(data["methods"]) == {"pipedream", "pipeoptim"}
    steps = cfg["steps_per_epoch"]
    for r in data["methods"].values():
        assert isinstance(r["final_train_loss"], float)
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert len(r["train_loss_curve"]) == steps and all(
            isinstance(v, float) for v in r["train_loss_curve"])
        assert r["time_s"] > 0
        assert r["max_staleness"] == 1  # 2-stage 1F1B: stage 0 lags one update
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC


_TINY = ["compare", "--task", "mlp", "--dataset", "iris", "--stages", "2", "--epochs", "1",
         "--methods", "pipedream,pipeoptim", "--microbatch-size", "4", "--microbatches", "4",
         "--no-progress"]


def _compare(out, *argv):
    assert main([*_TINY, "--out", str(out), *argv]) == 0
    return json.loads((out / "results.json").read_text())


def test_compare_seeds_aggregates_single_seed_runs(tmp_path, capsys):
    singles = [_compare(tmp_path / f"s{s}", "--seed", str(s)) for s in (3, 4)]
    capsys.readouterr()
    data = _compare(tmp_path / "multi", "--seed", "3", "--seeds", "2")
    text = capsys.readouterr().out
    assert data["config"]["seed"] == 3 and data["config"]["seeds"] == [3, 4]
    assert [d["config"]["seeds"] for d in singles] == [[3], [4]]
    assert set(data["methods"]) == {"pipedream", "pipeoptim"}
    for method, r in data["methods"].items():
        runs = [d["methods"][method] for d in singles]
        assert "seeds" not in runs[0] and "per_seed" not in runs[0]  # N=1: unchanged fields
        assert r["seeds"] == [3, 4] and len(r["per_seed"]) == 2
        for got, want in zip(r["per_seed"], runs):
            assert set(got) == set(want)
            for key in ("final_train_loss", "test_accuracy", "test_loss", "train_loss_curve",
                        "max_staleness", "updates_per_stage", "updates_per_step"):
                assert got[key] == want[key], (method, key)
        for key in ("final_train_loss", "test_accuracy", "test_loss"):
            values = [w[key] for w in runs]
            assert r[f"{key}_mean"] == statistics.mean(values) == r[key]
            assert r[f"{key}_std"] == statistics.stdev(values)
        times = [g["time_s"] for g in r["per_seed"]]
        assert r["time_s_mean"] == statistics.mean(times) == r["time_s"]
        assert r["time_s_std"] == statistics.stdev(times)
        assert r["train_loss_curve"] == [statistics.mean(v) for v in
                                         zip(*(w["train_loss_curve"] for w in runs))]
        assert r["max_staleness"] == 1 and isinstance(r["per_seed"][0]["time_s"], float)
        row = next(ln for ln in text.splitlines() if ln.startswith(method))
        want_loss = (f"{r['final_train_loss_mean']:.4f} ± {r['final_train_loss_std']:.4f}")
        want_acc = f"{r['test_accuracy_mean']:.4f} ± {r['test_accuracy_std']:.4f}"
        assert want_loss in row and want_acc in row
    assert "±" in text and "2 seeds (3..4)" in text
    assert (tmp_path / "multi" / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_one_seed_prints_no_std(tmp_path, capsys):
    data = _compare(tmp_path, "--seeds", "1")
    assert "±" not in capsys.readouterr().out
    assert data["config"]["seeds"] == [0]
    assert not any(k.endswith(("_mean", "_std")) for k in data["methods"]["pipeoptim"])


def test_compare_two_stages_per_rank_schedule(tmp_path, capsys):
    rc = main(["compare", "--task", "mlp", "--dataset", "moons", "--stages", "4", "--schedule",
               "interleaved1f1b", "--epochs", "1", "--methods", "xpipe", "--optimizer", "sgd",
               "--microbatches", "4", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    cfg = json.loads((tmp_path / "results.json").read_text())["config"]
    assert cfg["num_ranks"] == 2 and cfg["stages_per_rank"] == 2
    assert cfg["schedule"] == "Interleaved1F1B" and cfg["lr"] == DEFAULT_LR["sgd"]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--stages", "3", "--schedule", "Interleaved1F1B"], "--stages"),
        (["--methods", "sequential,async"], "--methods"),
        (["--lr", "-1"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--dataset", "mnist"], "--dataset"),
        (["--schedule", "nope"], "--schedule"),
        (["--optimizer", "lamb"], "--optimizer"),
        (["--microbatches", "2", "--methods", "pipedream"], "rejects"),  # 1F1B: n >= 4 ranks
        (["--dataset", "iris", "--microbatch-size", "64"], "exceeds"),
        (["--seeds", "0"], "--seeds"),
        (["--seeds", "x"], "--seeds"),
        (["--seeds", "-2"], "--seeds"),
    ],
)
def test_compare_bad_arguments(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--task", "mlp", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_staleness_prints_table_and_writes_png(tmp_path, capsys):
    png = tmp_path / "tl.png"
    rc = main(["staleness", "--schedule", "1F1B", "--ranks", "4", "--microbatches", "8",
               "--out", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln[:1].isdigit()}
    assert rows["0"][2:] == ["0", "1", "2", "3", "3", "3", "3", "3", "3"]  # last column: max
    assert rows["3"][2:] == ["0"] * 9
    assert "bubble fraction" in text
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_staleness_update_every_and_errors(tmp_path, capsys):
    png = tmp_path / "zb.png"
    assert main(["staleness", "--schedule", "ZBVZeroBubble", "--ranks", "2", "--microbatches",
                 "4", "--update-every", "2", "--out", str(png)]) == 0
    assert "update every 2" in capsys.readouterr().out and png.exists()
    with pytest.raises(SystemExit) as exc:
        main(["staleness", "--schedule", "1F1B", "--ranks", "4", "--microbatches", "6",
              "--update-every", "4", "--out", str(png)])
    assert exc.value.code == 2 and "update_every" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["staleness", "--schedule", "1F1B", "--microbatches", "4"])  # --ranks missing


def test_python_dash_m_help():
    res = subprocess.run([sys.executable, "-m", "predictopt", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0
    assert "compare" in res.stdout and "staleness" in res.stdout
