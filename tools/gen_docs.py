"""Generate the figures of the documentation from the committed result files.

Every table of numbers in ``docs/`` sits between ``<!-- gen:NAME -->`` and ``<!-- /gen:NAME -->``
markers and is written by the generator ``NAME`` below from a file under ``docs/results/`` or
``benchmarks/results/`` (or from the method registry). Nothing between the markers is typed by
hand.

    python tools/gen_docs.py           # rewrite the generated sections (and the study's plots)
    python tools/gen_docs.py --check   # exit 1 if a section differs from what the files give

``tests/test_docs.py`` runs the check, so a result file and the docs that quote it cannot drift
apart within a commit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
STUDY = RESULTS / "lm_study.jsonl"
MARK = re.compile(r"(<!-- gen:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /gen:(?P=name) -->)",
                  re.S)

#: The settings of the language-model study and the methods shown for each.
STUDY_SETTINGS: list[tuple[int, str]] = [(8, "adamw"), (8, "sgd"), (8, "muon"), (4, "adamw"),
                                         (4, "sgd"), (4, "muon"), (16, "adamw"), (16, "sgd"),
                                         (16, "muon")]
SEEDS = [0, 1, 2]


def _records() -> list[dict]:
    if not STUDY.exists():
        return []
    return [json.loads(line) for line in STUDY.read_text().splitlines() if line.strip()]


def _cfg(stages: int, optimizer: str):
    from predictopt.study import LMConfig

    return LMConfig(stages=stages, optimizer=optimizer)


def _methods_in(records: list[dict], cfg) -> list[str]:
    from predictopt.study import LMConfig

    seen: list[str] = []
    for r in records:
        if LMConfig(**r["config"]) == cfg and r["method"] not in seen:
            seen.append(r["method"])
    return seen


def study_table(stages: int, optimizer: str) -> str:
    """The table of one setting of the study."""
    from predictopt.study import aggregate, markdown_table

    records = _records()
    cfg = _cfg(stages, optimizer)
    methods = _methods_in(records, cfg)
    summaries = aggregate(records, cfg, methods, SEEDS)
    if not summaries:
        return "(no runs in docs/results/lm_study.jsonl yet)\n"
    seeds = sorted({s for v in summaries.values() for s in v.seeds})
    head = (f"![{stages} stages, {optimizer}](img/lm_{stages}_{optimizer}.png)\n\n"
            f"{stages} stages, {optimizer} lr {cfg.learning_rate:g}, seeds "
            f"{', '.join(map(str, seeds))} (from `docs/results/lm_study.jsonl`):\n\n")
    return head + markdown_table(summaries, cfg) + "\n"


def study_summary() -> str:
    """Every method in every setting: the gap to ``sequential`` and the iso-loss overhead."""
    from predictopt.study import aggregate

    records = _records()
    rows: dict[str, dict[str, str]] = {}
    cols = []
    for stages, opt in STUDY_SETTINGS:
        cfg = _cfg(stages, opt)
        methods = _methods_in(records, cfg)
        summaries = aggregate(records, cfg, methods, SEEDS)
        if "sequential" not in summaries:
            continue
        col = f"{stages} st. {opt}"
        cols.append(col)
        ref = summaries["sequential"].final_mean
        for m, s in summaries.items():
            if m == "sequential":
                continue
            o = s.overhead_mean
            over = "never" if o is None else f"{o:.2f}x"
            if o is not None and len(s.reached) < len(s.overhead):
                over += "*"
            rows.setdefault(m, {})[col] = f"{s.final_mean - ref:+.3f} / {over}"
    if not cols:
        return "(no runs yet)\n"
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m, r in rows.items():
        lines.append(f"| {m} | " + " | ".join(r.get(c, "") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def methods_table() -> str:
    """The registry: every method's forward and backward weights, cadence and transforms."""
    from predictopt.pipeline import available_methods, get_method

    lines = ["| method | forward | backward | updates | transforms | schedules | source |",
             "|---|---|---|---|---|---|---|"]
    for name in available_methods():
        m = get_method(name)
        cadence = {"microbatch": "per micro-batch", "step": "per step",
                   "window": "every u micro-batches"}[m.cadence.kind]
        if m.staleness_free:
            cadence = "per micro-batch, no pipeline"
        transforms = ", ".join(type(t).__name__ for t in m.transforms) or "-"
        scheds = ", ".join(m.schedules) if m.schedules else "all"
        lines.append(f"| `{name}` | {m.forward} | {m.backward} | {cadence} | {transforms} | "
                     f"{scheds} | {m.source} |")
    return "\n".join(lines) + "\n"


def stability_table() -> str:
    """Largest stable preconditioned curvature of delayed EMA momentum (predictopt.analysis)."""
    from predictopt.analysis import max_stable_curvature

    delays = [0, 1, 2, 3, 7, 15]
    rows = [("momentum 0.9", 0.9, 1.0, 0.0), ("momentum 0.9, predicted forward", 0.9, 1.0, 1.0),
            ("momentum 0.9, nu = 0.5", 0.9, 0.5, 0.0), ("momentum 0.99", 0.99, 1.0, 0.0),
            ("momentum 0.99, predicted forward", 0.99, 1.0, 1.0), ("no momentum", 0.0, 1.0, 0.0)]
    lines = ["| update | " + " | ".join(f"D = {d}" for d in delays) + " |",
             "|---|" + "---:|" * len(delays)]
    for label, beta, nu, gain in rows:
        vals = [max_stable_curvature(beta, d, nu=nu, gain=gain) for d in delays]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3g}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def _mlp_table(path: Path, methods: list[str] | None = None) -> str:
    if not path.exists():
        return f"(no {path.relative_to(ROOT)} yet)\n"
    res = json.loads(path.read_text())
    cfg = res["config"]
    head = (f"{cfg['dataset']}, {cfg['stages']}-stage {cfg['activation']} MLP, "
            f"{cfg['schedule']}, {cfg['optimizer']} lr {cfg['lr']:g}, {cfg['microbatches']} "
            f"micro-batches of {cfg['microbatch_size']}, {cfg['epochs']} epochs, seeds "
            f"{', '.join(map(str, cfg['seeds']))}:\n\n")
    lines = ["| method | final training loss | test accuracy | max staleness |",
             "|---|---:|---:|---:|"]
    for m, r in res["methods"].items():
        if methods is not None and m not in methods:
            continue
        if "per_seed" in r:
            loss = f"{r['final_train_loss_mean']:.4f} ± {r['final_train_loss_std']:.4f}"
            acc = f"{r['test_accuracy_mean']:.3f} ± {r['test_accuracy_std']:.3f}"
        else:
            loss, acc = f"{r['final_train_loss']:.4f}", f"{r['test_accuracy']:.3f}"
        lines.append(f"| {m} | {loss} | {acc} | {r['max_staleness']} |")
    return head + "\n".join(lines) + "\n"


def digits_table() -> str:
    """The MLP comparison on digits (docs/results/digits_mlp.json)."""
    return _mlp_table(RESULTS / "digits_mlp.json")


def pb_results() -> str:
    """Pipelined Backpropagation on digits (docs/results/pb_mlp.json)."""
    return _mlp_table(RESULTS / "pb_mlp.json")


def study_twins() -> str:
    """Candidates beside their staleness-free twins (same transforms, no pipeline)."""
    from predictopt.study import aggregate

    records = _records()
    pairs = [("nesterov-dl", "sequential-nesterov-dl")]
    lines = ["| setting | sequential | twin: " + ", ".join(t for _, t in pairs)
             + " | method: " + ", ".join(m for m, _ in pairs) + " |", "|---|---:|---:|---:|"]
    n = 0
    for stages, opt in STUDY_SETTINGS:
        cfg = _cfg(stages, opt)
        names = ["sequential"] + [x for p in pairs for x in p]
        s = aggregate(records, cfg, names, SEEDS)
        if not all(x in s for x in names):
            continue
        n += 1
        cells = [f"{s[x].final_mean:.3f} ± {s[x].final_std:.3f}" for x in names]
        lines.append(f"| {stages} stages, {opt} | " + " | ".join(cells) + " |")
    return ("\n".join(lines) + "\n") if n else "(twin runs not in docs/results yet)\n"


def _machine(m: dict) -> str:
    return (f"{m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, torch "
            f"{m.get('torch', '?')}, {m.get('date', '?')}, load average "
            f"{m.get('load_average_start', float('nan')):.1f} at the start")


def pipeline_overhead() -> str:
    """Per-micro-batch cost of PredictiveStage against a plain PipelineStage (2 ranks)."""
    path = ROOT / "benchmarks" / "results" / "pipeline.json"
    d = json.loads(path.read_text())
    cfg = d["config"]
    lines = [f"`benchmarks/results/pipeline.json` ({_machine(d['machine'])}; {cfg['blocks']} "
             f"MLP blocks of width {cfg['dim']}, {cfg['microbatches']} micro-batches of "
             f"{cfg['microbatch_size']}, fused AdamW: {cfg['fused']}):", "",
             "| stage | CPU ms per micro-batch | CPU ratio | wall ms | wall ratio |",
             "|---|---:|---:|---:|---:|"]
    for r in d["overhead_2_ranks"]:
        lines.append(f"| {r['variant']} | {r['cpu_ms_per_microbatch']:.1f} | "
                     f"{r['cpu_ratio']:.2f} | {r['ms_per_microbatch']:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def pipeline_throughput() -> str:
    """Throughput against one process, with the measured and the 1F1B-theory bubble."""
    d = json.loads((ROOT / "benchmarks" / "results" / "pipeline.json").read_text())
    lines = ["| ranks | stage | samples/s | speed-up | bubble | theory |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in d["throughput"]:
        b = f"{r['bubble']:.2f}" if "bubble" in r else ""
        t = f"{r['bubble_theory']:.2f}" if "bubble_theory" in r else ""
        lines.append(f"| {r['ranks']} | {r['variant']} | {r['samples_per_s']:.0f} | "
                     f"{r['speedup']:.2f} | {b} | {t} |")
    return "\n".join(lines) + "\n"


def memory_table() -> str:
    """Peak memory of every method (benchmarks/results/memory.json)."""
    d = json.loads((ROOT / "benchmarks" / "results" / "memory.json").read_text())
    m, c = d["machine"], d["config"]
    head = (f"`benchmarks/results/memory.json` ({m.get('date')}, {m.get('cpu')}, "
            f"{m.get('cores')} cores, torch {m.get('torch')}; {c['stages']}-stage MLP of width "
            f"{c['width']}, {c['microbatches']} micro-batches of {c['microbatch_size']}, "
            f"{c['optimizer']}):\n\n")
    lines = ["| method | peak extra (model copies) | extra over `sequential` | per stage "
             "(stage copies) |", "|---|---:|---:|---|"]
    for r in d["results"]:
        per = " / ".join(f"{b / s:.2f}" for b, s in zip(r["live_peak_by_stage"], r["stage_bytes"]))
        lines.append(f"| `{r['method']}` | {r['model_copies']:.2f} | "
                     f"{r['excess_over_sequential_copies']:+.2f} | {per} |")
    return head + "\n".join(lines) + "\n"


def example_lm_output() -> str:
    """What examples/pipeline_lm.py --single-process printed (docs/results/example_lm.txt),
    without the timings."""
    path = RESULTS / "example_lm.txt"
    if not path.exists():
        return "(no docs/results/example_lm.txt yet)\n"
    out = [re.sub(r"\s+\(\d+\.\d s\)$", "", line) for line in path.read_text().splitlines()
           if line.strip()]
    return "```text\n" + "\n".join(out) + "\n```\n"


def _study_generators() -> dict[str, Callable[[], str]]:
    gens: dict[str, Callable[[], str]] = {"methods-table": methods_table,
                                          "study-summary": study_summary,
                                          "stability-table": stability_table,
                                          "digits-table": digits_table,
                                          "pb-results": pb_results,
                                          "study-twins": study_twins,
                                          "pipeline-overhead": pipeline_overhead,
                                          "pipeline-throughput": pipeline_throughput,
                                          "example-lm-output": example_lm_output,
                                          "memory-table": memory_table}
    for stages, opt in STUDY_SETTINGS:
        gens[f"study-{stages}-{opt}"] = (lambda k=stages, o=opt: study_table(k, o))
    return gens


GENERATORS = _study_generators()


def render(text: str) -> str:
    """``text`` with every generated section rewritten."""
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in GENERATORS:
            raise KeyError(f"unknown generated section {name!r}")
        return m.group(1) + GENERATORS[name]() + m.group(4)

    return MARK.sub(sub, text)


def plots() -> None:
    """The study's held-out-loss curves, one PNG per setting."""
    from predictopt.study import plot_curves

    records = _records()
    for stages, opt in STUDY_SETTINGS:
        cfg = _cfg(stages, opt)
        methods = _methods_in(records, cfg)
        if methods:
            plot_curves(records, cfg, methods, DOCS / "img" / f"lm_{stages}_{opt}.png",
                        f"{stages}-stage transformer LM, 1F1B, {opt} lr {cfg.learning_rate:g}, "
                        "mean over seeds")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 on a difference")
    args = ap.parse_args(argv)
    stale = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path.name)
            if not args.check:
                path.write_text(new)
    if args.check:
        if stale:
            print("generated sections out of date in: " + ", ".join(stale)
                  + " (run python tools/gen_docs.py)")
            return 1
        return 0
    plots()
    print("rewrote " + (", ".join(stale) if stale else "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
