"""The parts of ``report.md`` and of the plots that every judge mode shares.

A report is a header (judge, questions, candidates), the mode's own sections (each mode's
summary renders them), the judge's reliability and a footer naming the raw files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.evaluation.judging.calls import Judged, JudgeHealth
from rlhfkit.evaluation.report import fmt_pct, md_code_block, md_escape, new_figure, save_figure

MALFORMED_EXAMPLES = 3  # raw malformed judgments quoted in the report


def desc(x: float | None) -> float:
    """Sort key: larger first, missing/NaN last."""
    return -x if x is not None and x == x else float("inf")


def render_report(results: dict[str, Any], mode_sections: list[str], health: JudgeHealth,
                  judged: Sequence[Judged]) -> str:
    """``report.md``: the header from ``results`` (results.json's contents), the mode's sections,
    the judge's reliability with a few malformed judgments verbatim."""
    judge = results["judge"]
    q = results["questions"]
    lines = [f"# Judge report: {results['mode']}", "",
             f"- judge: {md_escape(judge['model'])}"
             + (f" at {md_escape(judge['url'])}" if judge.get("url") else " (local)"),
             f"- questions: {q['count']} from {md_escape(q['source'])} "
             f"({', '.join(md_escape(c) for c in q['categories'])})",
             f"- candidates: {', '.join(md_escape(m) for m in results['models'])}",
             ""]
    lines += mode_sections
    examples = [j for j in judged if not j.parsed.ok][:MALFORMED_EXAMPLES]
    lines += health_section(health, examples)
    lines += ["", "Raw judgments with their prompts: `judgments.jsonl`; numbers: `results.json`.", ""]
    return "\n".join(lines)


def health_section(health: JudgeHealth, examples: Sequence[Judged]) -> list[str]:
    lines = ["## Judge reliability", "",
             f"- judgments: {health.judgments}",
             f"- malformed verdicts (no verdict could be read; excluded): {health.malformed}"
             + (f" ({fmt_pct(health.malformed_rate)})" if health.malformed_rate is not None else ""),
             f"- lenient parses (verdict not in the requested `[[...]]` form but readable): "
             f"{health.lenient_parses}"]
    for reason, count in sorted(health.malformed_reasons.items()):
        lines.append(f"  - {md_escape(reason)}: {count}")
    if examples:
        lines += ["", "Examples of malformed judgments (raw judge output, truncated):", ""]
        for j in examples:
            meta = j.call.meta
            who = meta.get("model") or f"{meta.get('model_a')} vs {meta.get('model_b')}"
            lines.append(f"- question {md_escape(meta['question_id'])}, turn {meta['turn']}, "
                         f"{md_escape(who)}: {md_escape(j.parsed.problem)}")
            text = j.text if len(j.text) <= 600 else j.text[:600] + " …"
            lines += ["", md_code_block(text)]
    return lines


def bar_plot(path: Path, groups: Sequence[str], series: dict[str, Sequence[float | None]],
             ylabel: str, title: str, ylim: tuple[float, float] | None = None,
             errors: dict[str, Sequence[float | None]] | None = None) -> None:
    """Grouped bars, one colour per series (None drawn as 0), optional error bars per series."""
    import numpy as np

    fig = new_figure(min(11.0, max(6.0, 0.6 * len(groups) * max(1, len(series)) ** 0.5 + 2)), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        vals = np.array([v if v is not None else np.nan for v in values], dtype=float)
        err = None
        if errors and name in errors:
            err = np.array([e if e is not None else 0.0 for e in errors[name]], dtype=float)
            err = np.nan_to_num(err)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.nan_to_num(vals), width, yerr=err,
               capsize=3 if err is not None else 0, label=name if len(name) <= 30 else name[:29] + "…")
    ax.set_xticks(x)
    ax.set_xticklabels([g if len(g) <= 18 else g[:17] + "…" for g in groups], rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1 or errors:
        ax.legend(fontsize=8)
    save_figure(fig, path)
