"""The language-model yardstick (predictopt.lm), the study's metrics (predictopt.study), the
``compare --task lm`` command and the generated documentation."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from predictopt.cli import main
from predictopt.lm import DEFAULT_CORPUS, lm_loss, lm_stages, load_text
from predictopt.study import (
    LMConfig,
    RunCache,
    _run_parallel,
    aggregate,
    compare_lm,
    iso_loss_overhead,
    markdown_table,
    run_lm,
)
from tests._hyp import props

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


# ------------------------------------------------------------------ corpus and model


def test_default_corpus_ships_with_python():
    data = load_text()
    assert data.name == DEFAULT_CORPUS and data.vocab_size > 50
    assert len(data.train) > 300_000 and len(data.val) > 30_000
    assert data.train.dtype == torch.long and int(data.train.max()) < data.vocab_size
    # train then held-out decode to the corpus: the held-out text is its end
    from predictopt.lm import _default_text

    decoded = "".join(data.vocab[i] for i in torch.cat([data.train, data.val]).tolist())
    assert decoded == _default_text()


def test_load_text_from_a_file_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefgh" * 1000, encoding="utf-8")
    data = load_text(f, val_fraction=0.25)
    assert data.vocab == "abcdefgh" and len(data.val) == 2000
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="val_fraction"):
        load_text(f, val_fraction=0.9)
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(ValueError, match="too short"):
        load_text(tmp_path / "short.txt")


def test_batches_are_seeded_windows():
    data = load_text()
    a = data.batch(torch.Generator().manual_seed(3), 4, 16)
    b = data.batch(torch.Generator().manual_seed(3), 4, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][:, :-1], a[0][:, 1:])
    xv, yv = data.held_out(8, 16)
    assert torch.equal(xv, data.held_out(8, 16)[0]) and xv.shape == (8, 16)


def test_lm_stages_compose_into_a_language_model():
    stages = lm_stages(3, 20, dim=16, heads=2, context=8, seed=0)
    again = lm_stages(3, 20, dim=16, heads=2, context=8, seed=0)
    for m, n in zip(stages, again):
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), n.parameters()))
    x = torch.randint(0, 20, (2, 8))
    out = x
    for m in stages:
        out = m(out)
    assert out.shape == (2, 8, 20)
    assert lm_loss(out, x).ndim == 0
    # causal: the logits at position t do not depend on tokens after t
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 20
    out2 = y
    for m in stages:
        out2 = m(out2)
    assert torch.equal(out[:, :5], out2[:, :5])
    for bad in ({"dim": 15, "heads": 2}, {"dropout": 1.0}, {"context": 0}):
        with pytest.raises(ValueError):
            lm_stages(2, 20, **bad)


# ------------------------------------------------------------------ metrics


@props(50)
@given(start=st.floats(2.0, 5.0), drop=st.floats(0.01, 0.5), n=st.integers(2, 30),
       frac=st.floats(0.05, 0.95))
def test_iso_loss_overhead_interpolates_the_first_crossing(start, drop, n, frac):
    # a straight line from (0, start) down by `drop` per 10 samples: the crossing is exact
    curve = [[10 * i, start - drop * i] for i in range(n + 1)]
    target = start - drop * n * frac
    ref = 10 * n
    got = iso_loss_overhead(curve, target, ref)
    assert got == pytest.approx(frac, rel=1e-9, abs=1e-9)
    assert iso_loss_overhead(curve, start - drop * (n + 1), ref) is None  # never reached
    assert iso_loss_overhead(curve, start + 1, ref) == 0.0  # reached at once


def test_iso_loss_overhead_takes_the_first_crossing_of_a_noisy_curve():
    curve = [[0, 3.0], [10, 2.0], [20, 2.5], [30, 1.5]]
    assert iso_loss_overhead(curve, 2.2, 10) == pytest.approx(0.8)  # 3.0 -> 2.0 crosses 2.2
    assert iso_loss_overhead(curve, 1.8, 10) == pytest.approx(2.7)


def _record(method, seed, final, curve, cfg):
    from dataclasses import asdict

    return {"method": method, "seed": seed, "config": asdict(cfg), "curve": curve,
            "final_loss": final, "steps_run": cfg.steps, "time_s": 0.0}


def test_aggregate_and_table(tmp_path):
    cfg = LMConfig(steps=2, microbatches=2, microbatch_size=1, eval_every=1, horizon=2.0)
    recs = [_record("sequential", 0, 2.0, [[0, 3.0], [2, 2.5], [4, 2.0]], cfg),
            _record("sequential", 1, 2.2, [[0, 3.0], [2, 2.6], [4, 2.2]], cfg),
            _record("pipedream", 0, 2.4, [[0, 3.0], [4, 2.4], [8, 2.3]], cfg),
            _record("pipedream", 1, 2.5, [[0, 3.0], [4, 2.5], [8, 2.1]], cfg),
            _record("mine", 0, 2.1, [[0, 3.0], [4, 2.1], [8, 1.9]], cfg)]
    cache = RunCache(tmp_path / "runs.jsonl")
    for r in recs:
        cache.add(r)
    again = RunCache(tmp_path / "runs.jsonl")
    assert again.get(cfg, "mine", 0)["final_loss"] == 2.1
    s = aggregate(list(again.records.values()), cfg, ["sequential", "pipedream", "mine"],
                  [0, 1])
    assert s["sequential"].final == [2.0, 2.2] and s["mine"].seeds == [0]
    assert s["pipedream"].overhead[0] is None  # never reaches 2.0 within 8 samples
    assert s["pipedream"].overhead[1] == pytest.approx((4 + 0.3 / 0.4 * 4) / 4)
    table = markdown_table(s, cfg)
    assert "| pipedream | 2.450 ± 0.071 | +0.350 |" in table
    # paired by seed: mine - sequential on seed 0; share = (pipedream - mine) / (pipedream -
    # sequential), each gap over the seeds both runs have: 0.3 / 0.35
    assert "| mine | 2.100 | +0.100 | 86 % |" in table, table
    with pytest.raises(ValueError, match="optimizer"):
        LMConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="horizon"):
        LMConfig(horizon=0.5)


def test_run_lm_is_deterministic_and_reference_trains_fewer_steps():
    cfg = LMConfig(stages=2, steps=2, eval_every=1, horizon=1.5, dim=16, context=16,
                   microbatches=4, microbatch_size=2, eval_sequences=8)
    ref = run_lm("sequential", cfg, 0)
    assert ref["steps_run"] == 2 and [c[0] for c in ref["curve"]] == [0, 8, 16]
    a = run_lm("pipedream", cfg, 0)
    b = run_lm("pipedream", cfg, 0)
    assert a["steps_run"] == 3 and a["curve"] == b["curve"]
    assert a["final_loss"] == a["curve"][2][1]
    # what the bits depend on is recorded with the run
    assert a["machine"] == {"cpu": a["machine"]["cpu"],
                            "capability": torch.backends.cpu.get_cpu_capability(),
                            "torch": torch.__version__} and a["machine"]["cpu"]


# ------------------------------------------------------------------ the command


def test_compare_lm_writes_results(tmp_path, capsys):
    rc = main(["compare", "--stages", "2", "--steps", "2", "--eval-every", "1", "--dim", "16",
               "--context", "16", "--microbatches", "4", "--microbatch-size", "2",
               "--methods", "pipedream,nesterov-dl", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| sequential |" in out and "| nesterov-dl |" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["summary"]) == {"sequential", "pipedream", "nesterov-dl"}
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # a second call reuses the cached runs
    rc = main(["compare", "--stages", "2", "--steps", "2", "--eval-every", "1", "--dim", "16",
               "--context", "16", "--microbatches", "4", "--microbatch-size", "2",
               "--methods", "pipedream", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0 and len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3


def test_compare_lm_in_processes_equals_in_process(tmp_path):
    """Two worker processes give the records of one process, bit for bit, in the same order."""
    cfg = LMConfig(stages=2, microbatches=4, microbatch_size=2, context=16, dim=16, steps=2,
                   eval_every=1, eval_sequences=8)
    runs = {}
    for processes in (1, 2):
        compare_lm(cfg, ["pipedream"], [0, 1], tmp_path / str(processes), progress=False,
                   processes=processes, log=lambda _: None)
        runs[processes] = json.loads((tmp_path / str(processes) / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in runs[2]["runs"]] == [
        ("sequential", 0), ("pipedream", 0), ("sequential", 1), ("pipedream", 1)]
    assert [(r["method"], r["seed"], r["curve"]) for r in runs[1]["runs"]] == \
        [(r["method"], r["seed"], r["curve"]) for r in runs[2]["runs"]]


def test_parallel_runs_feed_one_progress_bar():
    cfg = LMConfig(stages=2, microbatches=4, microbatch_size=2, context=16, dim=16, steps=2,
                   eval_every=1, eval_sequences=8)

    class Bar:
        n = 0

        def update(self, n=1):
            self.n += n

    bar = Bar()
    jobs = [(asdict(cfg), m, 0, 1) for m in ("sequential", "pipedream")]
    records = list(_run_parallel(jobs, 2, bar))
    assert sorted(r["method"] for r in records) == ["pipedream", "sequential"]
    assert bar.n == sum(r["steps_run"] for r in records) == 2 + 3  # horizon 1.3: ceil(2.6)


def test_compare_lm_processes_argument(tmp_path):
    with pytest.raises(ValueError, match="processes must be an int >= 1"):
        compare_lm(LMConfig(stages=2), ["pipedream"], [0], tmp_path, processes=0)


@pytest.mark.parametrize("argv,match", [
    (["--task", "mlp", "--processes", "2"], "--processes is for --task lm"),
    (["--optimizer", "rmsprop"], "--task lm runs"),
    (["--methods", "pb"], "Pipelined Backpropagation"),
    (["--methods", "pipeoptim-sc"], "momentum SGD"),
    (["--corpus", "/no/such/file.txt"], "not found"),
])
def test_compare_lm_bad_arguments(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


# ------------------------------------------------------------------ generated documentation


def test_generated_docs_are_up_to_date():
    """Every generated section of docs/ equals what the committed result files give."""
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_yardstick_optimizers():
    """Each name of LM_OPTIMIZERS builds its optimizer (NAdam: beta1 = 0.99, decoupled weight
    decay, as issue 10's measurement); an unknown name is an error naming the accepted ones."""
    from predictopt.study import LM_DEFAULT_LR, LM_OPTIMIZERS, stage_optimizer

    m = lm_stages(2, 20, dim=8, heads=2, context=4, seed=0)[0]
    kinds = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "nadam": torch.optim.NAdam}
    assert set(LM_DEFAULT_LR) == set(LM_OPTIMIZERS)
    for name in LM_OPTIMIZERS:
        opt = stage_optimizer(name, LM_DEFAULT_LR[name], m)
        if name in kinds:
            assert type(opt) is kinds[name]
        assert LMConfig(optimizer=name).learning_rate == LM_DEFAULT_LR[name]
    g = stage_optimizer("nadam", 3e-3, m).param_groups[0]
    assert g["betas"] == (0.99, 0.999) and g["decoupled_weight_decay"] and g["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="adamw, sgd, muon, nadam"):
        LMConfig(optimizer="adam")


def test_every_screen_record_has_its_definition():
    """Each run in docs/results/lm_screens.jsonl is a variant tools/screens.py defines, with
    that run listed (so ``python tools/screens.py --verify`` can rerun it), in its group."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("screens", ROOT / "tools" / "screens.py")
    screens = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screens)
    defined = screens.variants()
    lines = (ROOT / "docs" / "results" / "lm_screens.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    assert records
    for r in records:
        v = defined.get(r["method"])
        assert v is not None, r["method"]
        run = screens._key(r)[1:]
        assert run in [tuple(x) for x in v["runs"]], (r["method"], run)
        assert r.get("group", "sgd-default") == v["group"] and r["variant"] == v["variant"], (
            r["method"])
        assert v["method"].name == r["method"]


def test_gaps_are_paired_by_seed():
    """A method with a seed missing is compared with the reference on the seeds both have."""
    from predictopt.study import MethodSummary

    ref = MethodSummary("sequential", [0, 1, 2], [1.0, 2.0, 3.0])
    m = MethodSummary("m", [0, 2], [1.5, 3.5])
    assert m.gap_to(ref) == 0.5  # not 2.5 - 2.0
    with pytest.raises(ValueError, match="no seed in common"):
        MethodSummary("x", [5], [1.0]).gap_to(ref)
