"""Tests for the ``predictopt`` command line (predictopt.cli)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from predictopt.cli import DEFAULT_LR, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_tiny_config_writes_results(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--dataset", "iris", "--stages", "2", "--epochs", "1",
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


def test_compare_two_stages_per_rank_schedule(tmp_path, capsys):
    rc = main(["compare", "--dataset", "moons", "--stages", "4", "--schedule",
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
    ],
)
def test_compare_bad_arguments(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(tmp_path), *argv])
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
