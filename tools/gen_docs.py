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
STUDY_SETTINGS: list[tuple[int, str]] = [(8, "adamw"), (8, "sgd"), (4, "adamw"), (4, "sgd"),
                                         (16, "adamw"), (16, "sgd")]
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
    head = (f"{stages} stages, {optimizer} lr {cfg.learning_rate:g}, seeds "
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


def _study_generators() -> dict[str, Callable[[], str]]:
    gens: dict[str, Callable[[], str]] = {"methods-table": methods_table,
                                          "study-summary": study_summary}
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
