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
SCREENS = RESULTS / "lm_screens.jsonl"
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


def _cfg(stages: int, optimizer: str, lr: float | None = None):
    from dataclasses import replace

    from predictopt.study import study_setting

    return replace(study_setting(stages, optimizer), lr=lr)


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
        ref = summaries["sequential"]
        for m, s in summaries.items():
            if m == "sequential":
                continue
            o = s.overhead_mean
            over = "never" if o is None else f"{o:.2f}x"
            if o is not None and len(s.reached) < len(s.overhead):
                over += "*"
            rows.setdefault(m, {})[col] = f"{s.gap_to(ref):+.3f} / {over}"
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
            ("momentum 0.99, predicted forward", 0.99, 1.0, 1.0), ("no momentum", 0.0, 1.0, 0.0),
            ("momentum horizon 10 (1 + D), predicted forward", "dm", 1.0, 1.0),
            ("momentum horizon 10 (1 + D), nu = 0.5, predicted forward", "dm", 0.5, 1.0),
            ("the same, the whole update / (1 + D) (the former default with Adam)", "dm", 0.5,
             1.0, "rate"),
            ("the same, the fresh-gradient term alone / (1 + D) (the default's update with Adam "
             "and momentum SGD)", "dm", 0.5, 1.0, "fresh"),
            ("the same, the prediction at half its length (a calibrated gain below 1)", "dm",
             0.5, 0.5, "fresh")]
    lines = ["| update | " + " | ".join(f"D = {d}" for d in delays) + " |",
             "|---|" + "---:|" * len(delays)]
    for label, beta, nu, gain, *mode in rows:
        # "rate": a scaled rate a / (1 + D) is stable up to (1 + D) times the plain limit
        vals = [max_stable_curvature(1 - 0.1 / (1 + d) if beta == "dm" else beta, d, nu=nu,
                                     gain=gain, fresh=1 / (1 + d) if mode == ["fresh"] else 1.0)
                * ((1 + d) if mode == ["rate"] else 1) for d in delays]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3g}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def _mlp_table(path: Path, methods: list[str] | None = None, command: str = "") -> str:
    if not path.exists():
        how = f": run `{command}` and copy its `results.json` there" if command else ""
        return f"(no {path.relative_to(ROOT)} yet{how})\n"
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
    return _mlp_table(RESULTS / "pb_mlp.json", command=(
        "predictopt compare --task mlp --methods sequential,pb-sync,pb,pb-sc,pb-lwp,pb-sc-lwp,"
        "pb-lean,pb-sc-lean,pb-lwp-lean,pb-sc-lwp-lean --seeds 3 --out runs/pb"))


#: The staleness-free twin of a candidate: its transforms without a pipeline (a prediction
#: over no delay is the current weights, so a predicting method shares its twin).
TWINS = {"nesterov-dl": "sequential-nesterov-dl", "pipeoptim-nesterov-dl": "sequential-nesterov-dl",
         "qh-dl": "sequential-qh-dl", "pipeoptim-qh-dl": "sequential-qh-dl",
         "basis-rotation": "sequential-basis-rotation",
         "basis-rotation-dl": "sequential-basis-rotation-dl",
         "pipeoptim-basis-rotation-dl": "sequential-basis-rotation-dl",
         "pipeoptim-qh-dm-dl": "sequential-qh-dm-dl"}


def study_twins() -> str:
    """Candidates beside their staleness-free twins (same transforms, no pipeline)."""
    from predictopt.study import aggregate

    records = _records()
    pairs = [(m, TWINS[m]) for m in ("nesterov-dl", "qh-dl", "pipeoptim-qh-dl",
                                     "pipeoptim-qh-dm-dl", "basis-rotation",
                                     "basis-rotation-dl", "pipeoptim-basis-rotation-dl")]
    lines = ["| setting | method | held-out loss | its staleness-free twin | gap to the twin "
             "| `sequential` | gap to `sequential` |", "|---|---|---:|---:|---:|---:|---:|"]
    n = 0
    for stages, opt in STUDY_SETTINGS:
        cfg = _cfg(stages, opt)
        names = ["sequential"] + [x for p in pairs for x in p]
        s = aggregate(records, cfg, names, SEEDS)
        for m, twin in pairs:
            if not all(x in s for x in ("sequential", m, twin)):
                continue
            n += 1
            a, b, r = s[m], s[twin], s["sequential"]
            lines.append(f"| {stages} stages, {opt} | `{m}` | {a.final_mean:.3f} ± "
                         f"{a.final_std:.3f} | {b.final_mean:.3f} ± {b.final_std:.3f} | "
                         f"{a.gap_to(b):+.3f} | {r.final_mean:.3f} | "
                         f"{a.gap_to(r):+.3f} |")
    return ("\n".join(lines) + "\n") if n else "(twin runs not in docs/results yet)\n"


def _screens(groups: tuple[str, ...], columns: tuple[str, ...]) -> str:
    """One-seed screening runs of ``groups`` (lm_screens.jsonl; records without a group are the
    default's SGD variants), each beside the same seed's runs of ``columns``."""
    from predictopt.study import LMConfig

    if not SCREENS.exists():
        return "(no screening runs in docs/results yet)\n"
    screens = [r for r in (json.loads(x) for x in SCREENS.read_text().splitlines() if x.strip())
               if r.get("group", "sgd-default") in groups]
    ref = {(r["method"], r["seed"], json.dumps(r["config"], sort_keys=True)): r["final_loss"]
           for r in [*_records(), *(json.loads(x) for x in SCREENS.read_text().splitlines()
                                     if x.strip())]}
    lines = ["| variant | seed | held-out loss | " + " | ".join(f"`{c}`" for c in columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for r in screens:
        key = json.dumps(r["config"], sort_keys=True)
        cfg = LMConfig(**r["config"])
        vals = [ref.get((c, r["seed"], key)) for c in columns]
        cells = " | ".join("" if v is None else f"{v:.3f}" for v in vals)
        rate = "" if cfg.lr is None else f" {cfg.lr:g}"
        lines.append(f"| {r['variant']} ({cfg.stages} stages, {cfg.optimizer}{rate}) | "
                     f"{r['seed']} | "
                     f"{r['final_loss']:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def study_sgd_screens() -> str:
    """One-seed variants of ``pipeoptim-qh-dl`` tried on the 8-stage SGD setting
    (lm_screens.jsonl)."""
    return _screens(("sgd-default",), ("pipeoptim-qh-dl", "sequential"))


def study_ef_screens() -> str:
    """One-seed variants of error feedback and other corrections of the delayed update
    (lm_screens.jsonl, groups "error-feedback" and "corrections")."""
    return _screens(("error-feedback", "corrections"),
                    ("error-feedback", "pipedream", "pipeoptim-qh-dl", "sequential"))


def study_sgd_twin_screens() -> str:
    """What the per-stage rates cost SGD without a pipeline (lm_screens.jsonl, group
    "sgd-twin")."""
    return _screens(("sgd-twin",), ("sequential-qh-dl", "sequential-qh-dm-dl-sgd-whole",
                                    "sequential"))


def study_rate_screens() -> str:
    """The default with a milder rate scaling (lm_screens.jsonl, group "sgd-rate")."""
    return _screens(("sgd-rate",),
                    ("pipeoptim-qh-dm-dl-sgd-whole", "pipeoptim-qh-dm-dl-adam-whole",
                     "sequential-qh-dm-dl-sgd-whole", "sequential"))


def _former_and_now(group: str, optimizer: str | tuple[str, ...], cols: tuple[str, ...],
                    head: tuple[str, ...], also: tuple[str, ...] = (),
                    depths: tuple[int, ...] = (4, 8, 16)) -> str:
    """Screens of ``group`` (a former form of the default, all seeds) beside the study's runs,
    per optimizer and depth: held-out loss, mean over the seeds (their number in
    parentheses)."""
    import statistics

    from predictopt.study import LMConfig

    if not SCREENS.exists():
        return "(no screening runs in docs/results yet)\n"
    runs = [r for r in (json.loads(x) for x in SCREENS.read_text().splitlines() if x.strip())
            if r.get("group") in (group, *also)] + list(_records())
    lines = ["| setting | " + " | ".join(head) + " |", "|---|" + "---:|" * len(cols)]
    for opt in (optimizer,) if isinstance(optimizer, str) else optimizer:
        for stages in depths:
            cells = []
            for c in cols:
                v = [r["final_loss"] for r in runs
                     if r["method"] == c and LMConfig(**r["config"]) == _cfg(stages, opt)]
                cells.append(f"{statistics.mean(v):.3f} ({len(v)})" if v else "")
            lines.append(f"| {stages} stages, {opt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def study_muon_calibration_screens() -> str:
    """The default with its prediction calibrated on Muon stages too (lm_screens.jsonl, group
    "muon-calibration") beside the study's runs."""
    return _screens(("muon-calibration",),
                    ("pipeoptim-qh-dm-dl", "pipeoptim", "pipedream", "sequential"))


def study_calibration_every_screens() -> str:
    """The default (k = 16) beside its calibration sampled at most once every k = 1 or 8
    updates per horizon (lm_screens.jsonl, group "calibration-every")."""
    return _former_and_now(
        "calibration-every", ("adamw", "sgd"),
        ("pipeoptim-qh-dm-dl-every1", "pipeoptim-qh-dm-dl-every8", "pipeoptim-qh-dm-dl",
         "sequential", "pipedream"),
        ("k = 1 (the default until 2026-12-08)", "k = 8", "`pipeoptim-qh-dm-dl` (k = 16)",
         "`sequential`", "`pipedream`"))


def study_muon_horizon_screens() -> str:
    """The former default's horizon on the Adam parts of Muon stages (lm_screens.jsonl, group
    "muon-horizon"), mean over the seeds beside the same settings' study runs."""
    return _former_and_now(
        "muon-horizon", "muon",
        ("pipeoptim-qh-dm-dl-adam-parts", "pipeoptim-qh-dm-dl", "sequential-qh-dm-dl-adam-parts",
         "sequential-qh-dm-dl", "sequential"),
        ("the horizon on the Adam parts", "`pipeoptim-qh-dm-dl` (now)", "twin of the former",
         "`sequential-qh-dm-dl` (now)", "`sequential`"))


def study_sgd_split_screens() -> str:
    """The former default's momentum SGD update (the whole update at the scaled rate;
    lm_screens.jsonl, group "sgd-split") beside the default of now, per depth."""
    return _former_and_now(
        "sgd-split", "sgd",
        ("pipeoptim-qh-dm-dl-sgd-whole", "pipeoptim-qh-dm-dl-uncalibrated", "pipeoptim-qh-dm-dl",
         "sequential-qh-dm-dl-sgd-whole", "sequential-qh-dm-dl", "sequential", "pipedream"),
        ("the whole update / (1 + D) (first)", "the split, uncalibrated (second)",
         "`pipeoptim-qh-dm-dl` (now)", "twin of the first", "`sequential-qh-dm-dl` (now)",
         "`sequential`", "`pipedream`"), also=("calibration",))


def study_adam_split_screens() -> str:
    """The SGD split applied to Adam without the calibrated prediction (lm_screens.jsonl,
    groups "adam-split" and "adam-depth")."""
    return _screens(("adam-split", "adam-depth"),
                    ("pipeoptim-qh-dm-dl-adam-whole", "pipeoptim-qh-dm-dl", "pipeoptim",
                     "pipedream", "sequential"))


def study_adam_whole_screens() -> str:
    """The former default's Adam update (the whole update at the scaled rate, the prediction
    uncalibrated; lm_screens.jsonl, group "adam-whole") beside the default of now, per
    depth."""
    return _former_and_now(
        "adam-whole", "adamw",
        ("pipeoptim-qh-dm-dl-adam-whole", "pipeoptim-qh-dm-dl", "sequential-qh-dm-dl-adam-whole",
         "sequential-qh-dm-dl", "sequential", "pipedream"),
        ("the whole update / (1 + D) (former)", "`pipeoptim-qh-dm-dl` (now)",
         "twin of the former", "`sequential-qh-dm-dl` (now)", "`sequential`", "`pipedream`"))


def study_prediction_probe() -> str:
    """Per stage, how well the forward weights predicted the weights the gradient met
    (docs/results/prediction_probe.jsonl, ``tools/probe_prediction.py``): one table per
    (stages, optimizer, seed)."""
    path = RESULTS / "prediction_probe.jsonl"
    if not path.exists():
        return "(run `python tools/probe_prediction.py` first)\n"
    every = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    settings = list(dict.fromkeys((r["stages"], r["optimizer"], r["seed"]) for r in every))
    parts = []
    for setting in settings:
        runs = [r for r in every if (r["stages"], r["optimizer"], r["seed"]) == setting]
        head = " | ".join(f"`{r['method']}`" for r in runs)
        lines = [f"| stage (D) | {head} |", "|---|" + "---:|" * len(runs)]
        stages = sorted({(s["stage"], s["delay"]) for r in runs for s in r["per_stage"]})
        for stage, delay in stages:
            cells = []
            for r in runs:
                s = next((x for x in r["per_stage"] if x["stage"] == stage), None)
                cells.append("" if s is None else
                             f"{s['error_ratio']:.2f} / {s['gain']:+.2f} / {s['cosine']:+.2f}")
            lines.append(f"| {stage} ({delay}) | " + " | ".join(cells) + " |")
        lines.append("| held-out loss | "
                     + " | ".join(f"{r['final_loss']:.3f}" for r in runs) + " |")
        stages_n, optimizer, seed = setting
        parts.append(f"{stages_n} stages, {optimizer}, seed {seed}; error ratio / gain / "
                     "cosine, mean over the second half of the run:\n\n" + "\n".join(lines)
                     + "\n")
    return "\n".join(parts)


def study_horizon_screens() -> str:
    """One-seed variants of the delay-scaled momentum horizon (lm_screens.jsonl, group
    "momentum-horizon"; ``tools/screens.py``)."""
    return _screens(("momentum-horizon",),
                    ("pipeoptim", "pipeoptim-qh-dl", "pipeoptim-qh-dm-dl-sgd-whole",
                     "pipeoptim-qh-dm-dl-adam-whole", "pipeoptim-qh-dm-dl", "sequential"))


def study_goal() -> str:
    """The default method against the goal of the study in every setting that has it."""
    from predictopt.pipeline.methods import DEFAULT_METHOD
    from predictopt.study import aggregate

    records = _records()
    lines = [f"The default method, `{DEFAULT_METHOD}`, in every setting of the study (goal: within "
             "0.05 nats of `sequential` and an iso-loss overhead <= 1.10x at 8 stages with AdamW "
             "and momentum SGD; never worse than `pipedream` anywhere):", "",
             "| setting | seeds | gap to `sequential` | iso-loss overhead | gap to `pipedream` "
             "| gap to its staleness-free twin | goal |", "|---|---:|---:|---:|---:|---:|---|"]
    n = 0
    for stages, opt in STUDY_SETTINGS:
        twin = TWINS.get(DEFAULT_METHOD, f"sequential-{DEFAULT_METHOD}")
        s = aggregate(records, _cfg(stages, opt),
                      ["sequential", "pipedream", DEFAULT_METHOD, twin], SEEDS)
        if DEFAULT_METHOD not in s or "sequential" not in s:
            continue
        n += 1
        d, r = s[DEFAULT_METHOD], s["sequential"]
        gap = d.gap_to(r)
        o = d.overhead_mean
        all_reached = o is not None and len(d.reached) == len(d.overhead)
        over = "never" if o is None else f"{o:.2f}x" + ("" if all_reached else "*")
        pd = s.get("pipedream")
        vs_pd = "" if pd is None else f"{d.gap_to(pd):+.3f}"
        checks = []
        if pd is not None:
            checks.append("better than pipedream" if d.gap_to(pd) < 0
                          else "**not better than pipedream**")
        if stages == 8 and opt in ("adamw", "sgd"):
            met = gap <= 0.05 and all_reached and o <= 1.10
            checks.insert(0, "met" if met else "**not met**")
        vs_twin = "" if twin not in s else f"{d.gap_to(s[twin]):+.3f}"
        lines.append(f"| {stages} stages, {opt} | {len(d.seeds)} | {gap:+.3f} | {over} | "
                     f"{vs_pd} | {vs_twin} | {'; '.join(checks)} |")
    return ("\n".join(lines) + "\n") if n else "(no runs of the default method yet)\n"


#: Issue 10's measurements (held-out loss, 2 seeds, an earlier build of this setting):
#: (stages, optimizer) -> (sequential, pipedream, pipeoptim).
ISSUE_ANCHORS: dict[tuple[int, str, float | None], tuple[float, float, float]] = {
    (4, "adamw", None): (1.930, 2.174, 2.090), (8, "adamw", None): (1.971, 2.357, 2.305),
    (4, "adamw", 1e-3): (1.945, 2.043, 1.986), (8, "nadam", None): (1.795, 2.044, 2.044),
    (4, "sgd", None): (2.177, 2.222, 2.197), (8, "sgd", None): (2.172, 2.304, 2.293)}


def study_anchors() -> str:
    """The default and pipeoptim against issue 10's measurements of pipeoptim: the gap to
    sequential and the share of pipedream's gap closed."""
    from predictopt.pipeline.methods import DEFAULT_METHOD
    from predictopt.study import aggregate

    def cell(m: float, ref: float, pd: float) -> str:
        return f"{m - ref:+.3f} / {(pd - m) / (pd - ref):.0%}".replace("%", " %")

    # the former default's runs where it differed (kept as screens): the whole update scaled
    # with Adam, the prediction uncalibrated with momentum SGD; with NAdam it is the same
    former = {"adamw": "pipeoptim-qh-dm-dl-adam-whole", "sgd": "pipeoptim-qh-dm-dl-uncalibrated"}
    screens = ([json.loads(x) for x in SCREENS.read_text().splitlines() if x.strip()]
               if SCREENS.exists() else [])
    lines = ["| setting | issue 10's `pipeoptim` | `pipeoptim` here | the former default here | "
             f"`{DEFAULT_METHOD}` here |", "|---|---:|---:|---:|---:|"]
    for (stages, opt, lr), (ref, pd, po) in ISSUE_ANCHORS.items():
        cfg = _cfg(stages, opt, lr)
        old = former.get(opt, DEFAULT_METHOD)
        s = aggregate(_records() + screens, cfg,
                      ["sequential", "pipedream", "pipeoptim", DEFAULT_METHOD, old], SEEDS)
        if len(s) < 4:
            continue
        r, d = s["sequential"].final_mean, s["pipedream"].final_mean
        was = cell(s[old].final_mean, r, d) if old in s else ""
        lines.append(f"| {stages} stages, {opt} {cfg.learning_rate:g} | {cell(po, ref, pd)} | "
                     f"{cell(s['pipeoptim'].final_mean, r, d)} | {was} | "
                     f"{cell(s[DEFAULT_METHOD].final_mean, r, d)} |")
    return "\n".join(lines) + "\n"


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


# ---------------------------------------------------------------------------------------------
# Schedules (docs/staleness.md): computed from the schedules' own action lists
# ---------------------------------------------------------------------------------------------

#: Ranks and micro-batches of the schedule tables and timelines.
SCHED_P, SCHED_M = 4, 8
#: The paper's setting: T_F = T_B = T_W (a full backward B lasts T_B + T_W).
EQUAL = {"F": 1, "I": 1, "W": 1, "B": 2}


def _papers_figures(p: int, m: int) -> dict[str, tuple[str, str, str]]:
    """The papers' closed forms at T_F = T_B = T_W: (bubble per unit of work, peak activations
    in micro-batches, source), evaluated for ``p`` ranks and ``m`` micro-batches."""
    from fractions import Fraction

    def frac(x: Fraction) -> str:
        return f"{float(x):.3f}"

    return {
        "1F1B": (f"(p-1)/m = {frac(Fraction(p - 1, m))}", f"p = {p}", "ZB paper, Sec. 2"),
        "ZBH1": (f"(p-1)/3m = {frac(Fraction(p - 1, 3 * m))}", f"p = {p}", "ZB paper, Sec. 2.1"),
        "ZBH2": ("0", f"2p-1 = {2 * p - 1}", "ZB paper, Sec. 2.2"),
        "ZBVZeroBubble": ("0", f"p = {p}", "ZB paper, Sec. 6"),
    }


def _schedule_row(name: str, label: str, actions: dict, papers: dict) -> str:
    from predictopt.pipeline.schedules import (
        action_timeline,
        bubble_fraction,
        bubble_rate,
        peak_activations,
    )

    tl_default = action_timeline(actions)
    tl_equal = action_timeline(actions, durations=EQUAL)
    peak = max(peak_activations(actions).values())
    stale = _max_staleness_of(actions)
    paper = papers.get(name, ("-", "-", "-"))
    return (f"| {label} | {bubble_fraction(tl_default):.1%} | {bubble_rate(tl_equal):.3f} | "
            f"{paper[0]} | {peak:g} | {paper[1]} | {stale} | {paper[2]} |")


def _max_staleness_of(actions: dict) -> str:
    """``max_i s(k, i)`` per stage k, from the rank orders (one update per micro-batch)."""
    from predictopt.pipeline.schedules import _staleness_of_orders

    table = _staleness_of_orders(list(actions.values()), 1)
    return " ".join(str(max(v)) for _, v in sorted(table.items()))


def schedule_table() -> str:
    """Bubble, peak activation memory and staleness of every schedule, beside the papers'."""
    from predictopt.pipeline.schedules import schedule_actions

    p, m = SCHED_P, SCHED_M
    papers = _papers_figures(p, m)
    lines = [
        f"{p} ranks, {m} micro-batches. *Bubble of the step*: idle / (ranks x makespan) with "
        "F = 1, B = 2, I = W = 1 (`bubble_fraction`). *Per unit of work*: the Zero Bubble "
        "paper's measure at T_F = T_B = T_W (`bubble_rate`: the longest rank span over the "
        "busiest rank's work, minus 1). *Peak*: micro-batches of activations on the busiest "
        "rank (`peak_activations`). *Max staleness*: per stage, one update per micro-batch.",
        "",
        "| schedule | bubble of the step | per unit of work | paper | peak activations | "
        "paper | max staleness per stage | source |",
        "|---|---:|---:|---|---:|---|---|---|",
    ]
    for name in ("1F1B", "ZBH1", "ZBH2", "InterleavedZeroBubble", "ZBVZeroBubble",
                 "DualPipeV"):
        acts = schedule_actions(name, p, m)
        spr = len({a.stage for a in acts[0]})
        label = name if spr == 1 else f"{name} ({p * spr} stages)"
        lines.append(_schedule_row(name, label, acts, papers))
    lines.append(_bitpipe_row(p, m))
    return "\n".join(lines) + "\n"


def _bitpipe_row(p: int, m: int) -> str:
    """BitPipe: its own timeline (with the eager synchronisation), memory and staleness."""
    from predictopt.pipeline import bitpipe as bp
    from predictopt.pipeline.schedules import bubble_fraction, bubble_rate

    step = bubble_fraction(bp.bitpipe_timeline(p, m))
    work = bubble_rate(bp.bitpipe_timeline(p, m, durations={"F": 1, "B": 2}))
    peak = max(bp.bitpipe_peak_activations(p, m).values())
    table = bp.bitpipe_staleness(p, m)
    stale = " ".join(str(max(max(table[("A", c)]), max(table[("B", c)]))) for c in range(2 * p))
    return (f"| BitPipe ({2 * p} chunks, 2 copies) | {step:.1%} | {work:.3f} | - | {peak:g} "
            f"(weights 2x) | - | {stale} | BitPipe paper |")


#: The authors' figure of BitPipe (4 devices, micro-batches 1, 2 down and 3, 4 up, F = 1 unit,
#: B = 2 units) ends at 28 units (docs/BitPipe_images/BitPipe-v.svg in wuhouming/BitPipe).
BITPIPE_FIGURE_MAKESPAN = 28


def bitpipe_table() -> str:
    """BitPipe's makespan against the authors' figure, and per size with and without waits."""
    from predictopt.pipeline import bitpipe as bp

    def makespan(k: int, m: int, sync: bool = True) -> float:
        return max(e.end for e in bp.bitpipe_timeline(k, m, durations={"F": 1, "B": 2},
                                                       sync=sync))

    lines = [f"The authors' figure (4 ranks, 4 micro-batches, F = 1, B = 2) ends at "
             f"{BITPIPE_FIGURE_MAKESPAN} units; `bitpipe_actions` ends at "
             f"{makespan(4, 4):g}, with device 1's order of the figure.", "",
             "| ranks | micro-batches | makespan | without the synchronisation waits | "
             "bubble of the step |", "|---:|---:|---:|---:|---:|"]
    from predictopt.pipeline.schedules import bubble_fraction

    for k, m in ((2, 4), (4, 4), (4, 8), (4, 16), (8, 16)):
        frac = bubble_fraction(bp.bitpipe_timeline(k, m, durations={"F": 1, "B": 2}))
        lines.append(f"| {k} | {m} | {makespan(k, m):g} | {makespan(k, m, False):g} | "
                     f"{frac:.1%} |")
    return "\n".join(lines) + "\n"


#: The cost settings of the automatic scheduler's table: (label, T_F, T_B, T_W, T_comm).
AUTO_SETTINGS = [("T_F = T_B = T_W = 1", 1.0, 1.0, 1.0, 0.0),
                 ("T_F = 1, T_B = 1.5, T_W = 0.5, T_comm = 0.25", 1.0, 1.5, 0.5, 0.25)]


def auto_table() -> str:
    """The automatic scheduler's bubble for each memory limit, beside the handcrafted ones."""
    from predictopt.pipeline import zero_bubble as zb
    from predictopt.pipeline.schedules import action_timeline, bubble_rate, peak_activations

    p, m = SCHED_P, SCHED_M

    def rate(acts, tf, tb, tw, comm) -> str:
        durations = {"F": tf, "I": tb, "W": tw, "B": tb + tw}
        return f"{bubble_rate(action_timeline(acts, durations=durations, comm=comm)):.3f}"

    head = " | ".join(label for label, *_ in AUTO_SETTINGS)
    lines = [f"Bubble per unit of work, {p} ranks, {m} micro-batches:", "",
             f"| schedule | peak activations | {head} |",
             "|---|---:|" + "---:|" * len(AUTO_SETTINGS)]
    fixed = [("1F1B (I then W)", zb.one_f_one_b(p, m)), ("ZB-H1", zb.zb_h1(p, m)),
             ("ZB-H2", zb.zb_h2(p, m))]
    for label, acts in fixed:
        cells = " | ".join(rate(acts, *cfg) for _, *cfg in AUTO_SETTINGS)
        lines.append(f"| {label} | {max(peak_activations(acts).values()):g} | {cells} |")
    for mem in range(2, 2 * p):
        cells = []
        for _, tf, tb, tw, comm in AUTO_SETTINGS:
            acts = zb.auto_schedule(p, m, t_f=tf, t_b=tb, t_w=tw, t_comm=comm, mem_limit=mem)
            cells.append(rate(acts, tf, tb, tw, comm))
        lines.append(f"| `auto_schedule(mem_limit={mem})` | {mem} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


#: Timelines drawn into docs/img (timeline_<name>.png) by `schedule_plots`.
TIMELINES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble",
             "DualPipeV", "ZBH1", "ZBH2")


def schedule_plots() -> None:
    """The schedules' timelines (F = 1, B = 2, I = W = 1)."""
    from predictopt.pipeline.bitpipe import bitpipe_timeline
    from predictopt.pipeline.schedules import render_timeline, timeline

    for name in TIMELINES:
        tl = timeline(name, SCHED_P, SCHED_M)
        render_timeline(tl, DOCS / "img" / f"timeline_{name}.png",
                        title=f"{name}, {SCHED_P} ranks, {SCHED_M} micro-batches")
    render_timeline(bitpipe_timeline(SCHED_P, SCHED_M), DOCS / "img" / "timeline_BitPipe.png",
                    title=f"BitPipe, {SCHED_P} ranks, {SCHED_M} micro-batches")


# ---------------------------------------------------------------------------------------------
# docs/benchmarks.md: every table from a file under benchmarks/results/
# ---------------------------------------------------------------------------------------------

BENCH = ROOT / "benchmarks" / "results"


def _bench(name: str) -> dict | None:
    """``benchmarks/results/NAME``, or None when it does not exist yet."""
    path = BENCH / name
    return json.loads(path.read_text()) if path.exists() else None


def _not_measured(name: str, command: str) -> str:
    return (f"(not measured yet: run `{command}`, which writes `benchmarks/results/{name}`, "
            "then `python tools/gen_docs.py`)\n")


def _from_result(name: str, command: str) -> Callable[[Callable[[dict, str], str]],
                                                      Callable[[], str]]:
    """A generator rendering ``benchmarks/results/NAME`` with ``fn(data, name)``, or saying
    that it is not measured yet (and the ``command`` that measures it)."""
    def wrap(fn: Callable[[dict, str], str]) -> Callable[[], str]:
        def gen() -> str:
            d = _bench(name)
            return _not_measured(name, command) if d is None else fn(d, name)

        gen.__doc__ = fn.__doc__
        return gen

    return wrap


def _machine_of(m: dict) -> str:
    """One line: date, CPU (or GPU), cores, torch threads, torch, load average."""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    load = m.get("load_average_at_start", m.get("load_average_start"))
    threads = f", torch threads {m['torch_threads']}" if "torch_threads" in m else ""
    return (f"{m.get('date', '?')}: {m.get('cpu', '?')} ({m.get('cores', '?')} cores"
            f"{threads}){gpu}, torch {m.get('torch', '?')}, {m.get('platform', '?')}, load "
            f"average {load} at start")


def _predict_table(d: dict, name: str) -> str:
    """predict_+restore_ against the optimizer steps (benchmarks/bench_predict.py output)."""
    c, r0 = d["config"], d["results"][0]
    m0 = r0["median_ms"]
    fused = "fused_step" in m0
    sq = "sqrt" in m0
    lines = [f"`benchmarks/results/{name}` ({_machine_of(d['machine'])}; {r0['tensors']} "
             f"tensors, {r0['params'] / 1e6:.1f}M fp32 parameters, s = {c['steps']}, median of "
             f"{c['repeats']} round-robin repeats):", "",
             "| case | step ms" + (" | fused AdamW step ms" if fused else "")
             + (" | sqrt(v) ms | copy(v) ms | sqrt(v) / fused AdamW step" if sq else "")
             + " | wrapped step ms | predict_ ms | restore_ ms | predict+restore ms "
             "| (p+r) / step" + (" | (p+r) / fused AdamW step" if fused else "")
             + " | loop ms | loop / (p+r) | peak extra in predict_ / params |",
             "|---" + "|---:" * (9 + 2 * fused + 3 * sq) + "|"]
    for r in d["results"]:
        m = r["median_ms"]
        pr = m["predict_restore"]
        peak = r["memory"]["peak_extra_over_params"]
        lines.append(
            f"| {r['case']} | {m['step']:.1f}" + (f" | {m['fused_step']:.1f}" if fused else "")
            + (f" | {m['sqrt']:.1f} | {m['copy_v']:.1f} | {m['sqrt'] / m['fused_step']:.2f}"
               if sq else "")
            + f" | {m['wrapped_step']:.1f} | {m['predict']:.1f} | {m['restore']:.1f} | "
            f"{pr:.1f} | {pr / m['step']:.2f}"
            + (f" | {pr / m['fused_step']:.2f}" if fused else "")
            + f" | {m['loop']:.1f} | {m['loop'] / pr:.2f} | "
            + ("n/a" if peak is None else f"{peak:.2f}") + " |")
    return "\n".join(lines) + "\n"


#: The cost of predict_+restore_ with the one-pass engine.
bench_predict_cost = _from_result("predict_cost_cpu.json",
                                  "python -m benchmarks.bench_predict")(_predict_table)
#: The same benchmark before the one-pass engine and the chunking.
bench_predict_previous = _from_result(
    "predict_cpu.json",
    "python -m benchmarks.bench_predict --out benchmarks/results/predict_cpu.json")(_predict_table)


@_from_result("predict_memory_cpu.json", "python -m benchmarks.bench_predict_memory")
def bench_predict_memory(d: dict, name: str) -> str:
    """Peak memory and time of the chunked engine against one chunk per bucket."""
    lines = [f"`benchmarks/results/{name}` ({_machine_of(d['machine'])}; median of "
             f"{d['config']['rounds']} rounds, min-max in parentheses):", "",
             "| model | optimizer | variant | peak / params | peak / bucket | predict+restore ms "
             "median (min-max) | time / bucket |", "|---|---|---|---:|---:|---:|---:|"]
    for r in d["results"]:
        for v in r["median_ms"]:
            lines.append(f"| {r['model']} | {r['optimizer']} | {v} | "
                         f"{r['median_peak_over_params'][v]:.3f} | "
                         f"{r['peak_vs_baseline'][v]:.2f} | {r['median_ms'][v]:.1f} "
                         f"({r['min_ms'][v]:.1f}-{r['max_ms'][v]:.1f}) | "
                         f"{r['time_vs_baseline'][v]:.2f} |")
    return "\n".join(lines) + "\n"


@_from_result("predict_calibrated_cpu.json", "python -m benchmarks.bench_predict --cases "
              "adamw sgd-momentum sgd-plain --out benchmarks/results/predict_calibrated_cpu.json")
def bench_predict_calibrated(d: dict, name: str) -> str:
    """The cost of calibration at step() (predict_calibrated_cpu.json)."""
    adamw = next((r["median_ms"]["step"] for r in d["results"] if r["case"] == "adamw"), None)
    lines = [f"`benchmarks/results/{name}` ({_machine_of(d['machine'])}; median of "
             f"{d['config']['repeats']} round-robin repeats):", "",
             "| case | step ms | wrapped step ms (`calibrate=False`) | calibrated step ms | "
             "calibration ms | in AdamW steps |", "|---|---:|---:|---:|---:|---:|"]
    for r in d["results"]:
        m = r["median_ms"]
        cal = m["calibrated_step"] - m["wrapped_step"]
        lines.append(f"| {r['case']} | {m['step']:.1f} | {m['wrapped_step']:.1f} | "
                     f"{m['calibrated_step']:.1f} | {cal:.1f} | "
                     + ("n/a" if not adamw else f"{cal / adamw:.2f}") + " |")
    return "\n".join(lines) + "\n"


@_from_result("fidelity.json", "python -m benchmarks.bench_fidelity")
def bench_fidelity(d: dict, name: str) -> str:
    """Fidelity ratios of every optimizer's rule (fidelity.json)."""
    steps = d["config"]["steps"]
    lines = [f"`benchmarks/results/{name}` ({_machine_of(d['machine'])}; seeds "
             f"{', '.join(map(str, d['config']['seeds']))}, {d['config']['updates']} "
             "updates):", "",
             "| optimizer | rule | " + " | ".join(f"s={s} mean (max)" for s in steps)
             + " | any seed >= 1 |", "|---|---|" + "---|" * (len(steps) + 1)]
    for r in d["results"]:
        rule = r["rule"]  # names the calibration already ("... + calibrate")
        cells = " | ".join(f"{r['ratios'][str(s)]['mean']:.3f} ({r['ratios'][str(s)]['max']:.3f})"
                           for s in steps)
        lines.append(f"| {r['label']} | {rule} | {cells} | "
                     f"{'**YES**' if r['any_ge_1'] else 'no'} |")
    return "\n".join(lines) + "\n"


@_from_result("pipeline_overhead.json", "python -m benchmarks.bench_pipeline")
def bench_pipeline_cost(d: dict, name: str) -> str:
    """PredictiveStage against a plain PipelineStage, per stage and optimizer, with the spread
    over rounds (pipeline_overhead.json)."""
    from predictopt.pipeline import DEFAULT_METHOD

    out = []
    for run in d["runs"]:
        opt = "`AdamW(..., fused=True)`" if run["optimizer"] == "fused" else "`AdamW(...)`"
        out += [f"**{run['stage']}** ({run['description']}), {opt}, {run.get('ranks', 2)} "
                f"ranks, {run['microbatches']} micro-batches, {run['rounds']} rounds of "
                f"{run['warmup']} + {run['steps']} steps; {_machine_of(run['machine'])}:", "",
                "| stage | CPU ms per micro-batch, median (min-max) | CPU ratio to plain, "
                "median (min-max) | wall ratio |", "|---|---:|---:|---:|"]
        for r in run["results"]:
            v = f"`{r['variant']}`" + (" (default)" if r["variant"] == DEFAULT_METHOD else "")
            out.append(f"| {v} | {r['cpu_ms_per_microbatch']:.2f} ({r['cpu_ms_min']:.2f}-"
                       f"{r['cpu_ms_max']:.2f}) | {r['cpu_ratio']:.2f} "
                       f"({r['cpu_ratio_min']:.2f}-{r['cpu_ratio_max']:.2f}) | "
                       f"{r['wall_ratio']:.2f} |")
        out.append("")
    return "\n".join(out)


@_from_result("gpu/predict_cost.json", "bash benchmarks/gpu.sh")
def bench_gpu(d: dict, name: str) -> str:
    """benchmarks/gpu.sh: prediction cost at 124M parameters against the bandwidth limit."""
    from benchmarks.bench_gpu import HEADER, rows

    return "\n".join([f"`benchmarks/results/{name}` ({_machine_of(d['machine'])}; copy "
                      f"bandwidth {d['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s):", "", *HEADER,
                      *rows(d["results"])]) + "\n"


def _study_generators() -> dict[str, Callable[[], str]]:
    gens: dict[str, Callable[[], str]] = {"methods-table": methods_table,
                                          "study-summary": study_summary,
                                          "stability-table": stability_table,
                                          "digits-table": digits_table,
                                          "pb-results": pb_results,
                                          "study-twins": study_twins,
                                          "study-goal": study_goal,
                                          "study-anchors": study_anchors,
                                          "study-sgd-screens": study_sgd_screens,
                                          "study-ef-screens": study_ef_screens,
                                          "study-horizon-screens": study_horizon_screens,
                                          "study-sgd-twin-screens": study_sgd_twin_screens,
                                          "study-rate-screens": study_rate_screens,
                                          "study-muon-horizon-screens":
                                              study_muon_horizon_screens,
                                          "study-sgd-split-screens": study_sgd_split_screens,
                                          "study-adam-split-screens": study_adam_split_screens,
                                          "study-adam-whole-screens": study_adam_whole_screens,
                                          "study-muon-calibration-screens":
                                              study_muon_calibration_screens,
                                          "study-calibration-every-screens":
                                              study_calibration_every_screens,
                                          "study-prediction-probe": study_prediction_probe,
                                          "pipeline-overhead": pipeline_overhead,
                                          "pipeline-throughput": pipeline_throughput,
                                          "example-lm-output": example_lm_output,
                                          "memory-table": memory_table,
                                          "schedule-table": schedule_table,
                                          "auto-schedule-table": auto_table,
                                          "bitpipe-table": bitpipe_table,
                                          "bench-predict-cost": bench_predict_cost,
                                          "bench-predict-previous": bench_predict_previous,
                                          "bench-predict-memory": bench_predict_memory,
                                          "bench-predict-calibrated": bench_predict_calibrated,
                                          "bench-fidelity": bench_fidelity,
                                          "bench-pipeline-cost": bench_pipeline_cost,
                                          "bench-gpu": bench_gpu}
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
    schedule_plots()
    print("rewrote " + (", ".join(stale) if stale else "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
