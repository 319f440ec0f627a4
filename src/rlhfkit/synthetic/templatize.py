"""``rlhfkit templatize``: FLAN-style instruction records from a labelled dataset.

    rlhfkit templatize --data reviews.csv --task classification --text-column review --label-column stars \\
        --output flan/
    rlhfkit templatize --data squad.jsonl --task qa --context-column context --output flan/

Each record of ``--data`` (JSONL, JSON, CSV/TSV, Parquet, a dataset id: docs/data.md) becomes one
``{prompt, completion}`` record through one of several phrasings of its task (:data:`TEMPLATES`,
at least three per task, as FLAN words each task several ways); which phrasing is drawn per
record from ``--seed``, so the same seed gives the same output. The columns each task reads:

- classification: the text (``--text-column``) and its label (``--label-column``, the completion);
  the options listed in every prompt are ``--labels`` or else the data's distinct labels, sorted;
- extraction: the text (``--text-column``) and the extracted text (``--answer-column``, the
  completion); ``--extraction-target`` says what to extract ("the date of the meeting");
- qa: the question (``--question-column``) and the answer (``--answer-column``, the completion),
  with the passage from ``--context-column`` when that is given;
- summarization: the text (``--text-column``) and its summary (``--summary-column``, the completion).

Every classification template lists the options (FLAN's ``OPTIONS:`` style in some, inline in
others). A record without a column its task reads (or with an empty value) is a problem named
``file:line: field 'x'``; all of them are reported at once with exit code 2 and nothing written.

Outputs in ``--output``: ``sft.jsonl`` (``{prompt, completion, task, template}``: ``rlhfkit sft``
trains on it as it is, on chat and base models alike) and ``stats.json`` (records, records per
template, and for classification records per label).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhfkit.config import DATA_CONFIG_HELP, arg, check_data_flag

Task = Literal["classification", "extraction", "qa", "summarization"]


@dataclass(frozen=True)
class Template:
    name: str
    prompt: str        # str.format fields: text, options (one "- x" per line), options_inline, target,
    completion: str    # question, context, label, answer, summary


TEMPLATES: dict[str, tuple[Template, ...]] = {
    "classification": (
        Template("cls-options-after", "{text}\n\nWhich label best describes the text above?\nOPTIONS:\n{options}",
                 "{label}"),
        Template("cls-inline", "Classify the following text as {options_inline}.\n\nText: {text}\nLabel:", "{label}"),
        Template("cls-options-before", "Choose the category that fits the text best.\n\nCategories:\n{options}\n\n"
                 "Text: {text}\nCategory:", "{label}"),
        Template("cls-question", "{text}\n\nIs the text above {options_inline}? Answer with one of the options.",
                 "{label}"),
    ),
    "extraction": (
        Template("ext-instruction-first", "Extract {target} from the following text.\n\n{text}", "{answer}"),
        Template("ext-text-first", "{text}\n\nFrom the text above, write down {target}, exactly as it appears.",
                 "{answer}"),
        Template("ext-passage", "Read the passage and answer with {target} only.\n\nPassage: {text}\nAnswer:",
                 "{answer}"),
    ),
    "qa": (
        Template("qa-plain", "{question}", "{answer}"),
        Template("qa-instruction", "Answer the following question.\n\n{question}", "{answer}"),
        Template("qa-q-a", "Question: {question}\nAnswer:", "{answer}"),
    ),
    "qa-context": (
        Template("qa-ctx-passage-first", "{context}\n\nAnswer the question using the passage above: {question}",
                 "{answer}"),
        Template("qa-ctx-read", "Read the passage and answer the question.\n\nPassage: {context}\n"
                 "Question: {question}\nAnswer:", "{answer}"),
        Template("qa-ctx-question-first", "Question: {question}\n\nUse this text to answer it:\n{context}",
                 "{answer}"),
    ),
    "summarization": (
        Template("sum-instruction-first", "Summarise the following text.\n\n{text}", "{summary}"),
        Template("sum-text-first", "{text}\n\nWrite a short summary of the text above.", "{summary}"),
        Template("sum-article", "Article: {text}\n\nWhat is a brief summary of this article?", "{summary}"),
        Template("sum-tldr", "{text}\n\nTL;DR:", "{summary}"),
    ),
}


@dataclass
class Config:
    """Convert a labelled dataset into instruction records with FLAN-style templates."""

    data: str = arg("", "Labelled records: a .jsonl/.json/.csv/.tsv/.parquet file, a saved `datasets` folder or "
                    "a Hugging Face dataset id (docs/data.md).")
    data_config: str = arg("", DATA_CONFIG_HELP)
    task: Task = arg("classification", "Task type: which columns are read and which templates phrase them.")
    output: str = arg("", "Output folder: sft.jsonl, stats.json, config.yaml.")
    text_column: str = arg("text", "The text to classify, extract from or summarise (classification, "
                           "extraction, summarization).")
    label_column: str = arg("label", "The label (classification).")
    labels: list[str] = arg(default_factory=list, help="The label set listed as options, in this order "
                            "(classification; default: the data's distinct labels, sorted). A record with "
                            "another label is a problem. Comma-separated or several values.")
    question_column: str = arg("question", "The question (qa).")
    context_column: str = arg("", "The passage a question is answered from (qa; empty: questions alone).")
    answer_column: str = arg("answer", "The answer (qa) or the extracted text (extraction; a list is joined "
                             "with ', ').")
    summary_column: str = arg("summary", "The reference summary (summarization).")
    extraction_target: str = arg("", "What is extracted, as the prompt names it, e.g. 'the date of the meeting' "
                                 "(extraction; required).")
    seed: int = arg(42, "Random seed of the template drawn for each record.")

    def validate(self) -> list[str]:
        problems = check_data_flag("data", self.data)
        if not self.output:
            problems.append("--output is required")
        if self.task == "extraction" and not self.extraction_target.strip():
            problems.append("--task extraction needs --extraction-target (what to extract, e.g. 'the date')")
        if self.labels and self.task != "classification":
            problems.append("--labels is for --task classification")
        if len(set(self.label_set())) != len(self.label_set()):
            problems.append("--labels: a label is listed twice")
        for name, _ in self.columns():
            if not getattr(self, name).strip():
                problems.append(f"--{name.replace('_', '-')} must not be empty for --task {self.task}")
        return problems

    def label_set(self) -> list[str]:
        return [label.strip() for value in self.labels for label in value.split(",") if label.strip()]

    def columns(self) -> list[tuple[str, str]]:
        """(config field naming a column, template field it fills) for this task."""
        return {
            "classification": [("text_column", "text"), ("label_column", "label")],
            "extraction": [("text_column", "text"), ("answer_column", "answer")],
            "qa": [("question_column", "question"), ("answer_column", "answer")]
            + ([("context_column", "context")] if self.context_column else []),
            "summarization": [("text_column", "text"), ("summary_column", "summary")],
        }[self.task]

    def templates(self) -> tuple[Template, ...]:
        return TEMPLATES["qa-context" if self.task == "qa" and self.context_column else self.task]


def _as_text(value) -> str | None:
    """A cell as text: strings stripped, numbers and booleans as written, lists of those joined with
    ', '; None for anything else (a nested record)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(str(v).strip() for v in value)
    return None


def read_fields(records, cfg: Config) -> list[dict[str, str]]:
    """Each record's template fields, by the task's columns; InputError lists every missing, empty
    or unusable value as file:line: field 'column'."""
    from rlhfkit.errors import InputError

    rows, problems = [], []
    for rec in records:
        row = {}
        for option, name in cfg.columns():
            column = getattr(cfg, option)
            text, problem = _cell(rec.data.get(column), name, option, cfg.label_set())
            if problem:
                problems.append(rec.problem(column, problem))
            row[name] = text
        rows.append(row)
    if problems:
        raise InputError(problems)
    return rows


def _cell(value, name: str, option: str, labels: list[str]) -> tuple[str, str | None]:
    """A column's value as text, or what is wrong with it."""
    if value is None:
        return "", f"missing (the {name} column, --{option.replace('_', '-')})"
    text = _as_text(value)
    if text is None:
        return "", f"expected text, a number or a list of them, got {type(value).__name__}"
    if not text:
        return "", "empty"
    if name == "label" and labels and text not in labels:
        return text, f"label {text!r} is not one of --labels {', '.join(labels)}"
    return text, None


def render(template: Template, fields: dict[str, str]) -> dict[str, str]:
    """One instruction record: the template's prompt and completion filled with ``fields``."""
    return {"prompt": template.prompt.format(**fields), "completion": template.completion.format(**fields)}


def option_fields(labels: list[str]) -> dict[str, str]:
    """How templates list the options: one ``- label`` per line, and inline (``a, b or c``)."""
    inline = labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} or {labels[-1]}"
    return {"options": "\n".join(f"- {label}" for label in labels), "options_inline": inline}


def templatize(rows: list[dict[str, str]], cfg: Config) -> list[dict]:
    """The instruction record of each row, its template drawn with ``cfg.seed``."""
    templates = cfg.templates()
    extra = {"target": cfg.extraction_target.strip()}
    if cfg.task == "classification":
        extra.update(option_fields(cfg.label_set() or sorted({row["label"] for row in rows})))
    rng = random.Random(f"rlhfkit-templatize:{cfg.seed}")
    out = []
    for row in rows:
        template = templates[rng.randrange(len(templates))]
        out.append({**render(template, {**extra, **row}), "task": cfg.task, "template": template.name})
    return out


def main(cfg: Config) -> int:
    from rlhfkit.config import save_config, validated
    from rlhfkit.data.io import read_records, write_jsonl
    from rlhfkit.evaluation.report import write_json

    validated(cfg)
    t0 = time.time()
    rows = read_fields(read_records(cfg.data, config=cfg.data_config, seed=cfg.seed), cfg)
    records = templatize(rows, cfg)
    out = Path(cfg.output)
    save_config(cfg, out)
    write_jsonl(out / "sft.jsonl", records)
    per_template = Counter(r["template"] for r in records)
    stats = {"task": cfg.task, "records": len(records),
             "per_template": {t.name: per_template[t.name] for t in cfg.templates()}}
    if cfg.task == "classification":
        stats["per_label"] = dict(sorted(Counter(row["label"] for row in rows).items()))
    write_json(out / "stats.json", stats)
    used = sum(1 for count in per_template.values() if count)
    print(f"templatize: {len(records)} {cfg.task} records through {used} of {len(cfg.templates())} templates in "
          f"{time.time() - t0:.1f} s -> {out / 'sft.jsonl'}", flush=True)
    return 0
