"""`rlhfkit kto` on a tiny random model through the real CLI: the metrics rows, the loss at
step 0 worked by hand, the reference options, preference pairs as input, exact resume, and
bad records refused with file:line:field."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from core_helpers import read_metrics
from rlhfkit.cli import main as cli
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.tiny import make_tiny_causal_lm

RECORDS = [
    {"prompt": "Say something nice.", "completion": "You are wonderful.", "label": True},
    {"prompt": "How are you?", "completion": "Bad.", "label": False},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "completion": [{"role": "assistant", "content": "Hello there!"}], "label": True},
    {"prompt": "Name a colour", "completion": "no idea at all", "label": False},
    {"prompt": "Count to three", "completion": "one two three", "label": True},
    {"prompt": "Tell me a joke", "completion": "No.", "label": False},
]
ROW_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_s", "kl", "rewards/chosen",
            "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return Path(make_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", seed=0))


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("data") / "kto.jsonl", RECORDS)


def run_kto(tiny, data, out, *extra) -> list[dict]:
    code = cli(["kto", "--model", str(tiny), "--data", str(data), "--output", str(out), "--batch-size", "3",
                "--lr", "1e-3", "--no-progress", *extra])
    assert code == 0
    return read_metrics(out)


def test_trains_and_logs_trl_metrics(tiny, data, tmp_path):
    """At step 1 π = π_ref: every log-ratio is 0, z_ref = 0, each loss is λ·(1 − σ(0)) = λ/2.
    With λ_D = 2, λ_U = 1 and all 6 examples (3 of each) in the step: (3·1 + 3·0.5) / 6 = 0.75."""
    out = tmp_path / "out"
    rows = run_kto(tiny, data, out, "--max-steps", "3", "--batch-size", "3", "--grad-accum", "2",
                   "--desirable-weight", "2", "--eval-data", str(data))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ROW_KEYS:
        assert all(math.isfinite(r[key]) for r in rows), key
    first, last = rows[0], rows[-1]
    assert first["loss"] == pytest.approx(0.75, abs=1e-6)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-6), key
    assert last["rewards/margins"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], abs=1e-9)
    assert last["rewards/margins"] > 0 and last["loss"] < first["loss"]  # it learns the labels
    assert {"eval/loss", "eval/kl", "eval/rewards/margins", "eval/logps/chosen"} <= set(last)
    assert load_causal_lm(str(out)).config.model_type == "llama"
    assert (out / "checkpoint-3").is_dir() and (out / "config.yaml").exists()


def test_reference_options_and_pairs_as_input(tiny, data, tmp_path):
    # LoRA: the reference is the base with the adapters disabled, so step 1 is again λ/2 = 0.5.
    rows = run_kto(tiny, data, tmp_path / "lora", "--max-steps", "2", "--lora-r", "4", "--lr", "1e-2",
                   "--batch-size", "6")
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert rows[1]["loss"] != pytest.approx(0.5, abs=1e-4)
    # Another reference: log-ratios are not 0 at step 1.
    other = make_tiny_causal_lm(tmp_path / "ref", seed=1)
    rows = run_kto(tiny, data, tmp_path / "other", "--max-steps", "1", "--ref-model", other)
    assert abs(rows[0]["rewards/chosen"]) > 1e-4
    # A preference pair gives both sides; a step holding only desirable examples logs no rejected metrics.
    pairs = write(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    rows = run_kto(tiny, pairs, tmp_path / "pairs", "--max-steps", "1", "--batch-size", "2")
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and "rewards/margins" in rows[0]
    only = write(tmp_path / "only.jsonl", [r for r in RECORDS if r["label"]])
    rows = run_kto(tiny, only, tmp_path / "only", "--max-steps", "1", "--loss", "apo_zero_unpaired")
    assert "rewards/chosen" in rows[0] and "rewards/rejected" not in rows[0] and rows[0]["kl"] == 0.0


def test_resume_equals_uninterrupted(tiny, data, tmp_path):
    args = ("--max-steps", "4", "--save-steps", "2", "--save-total-limit", "0", "--batch-size", "2")
    full = run_kto(tiny, data, tmp_path / "full", *args)
    out = tmp_path / "resumed"
    run_kto(tiny, data, out, *args)
    # Pretend the run died after step 2: drop what came later.
    shutil.rmtree(out / "checkpoint-4")
    (out / "model.safetensors").unlink()
    resumed = run_kto(tiny, data, out, *args, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert a.keys() == b.keys()  # a step with one label only logs that label's metrics, in both runs
        for key in set(a) - {"elapsed_s", "tokens_per_second"}:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    a = load_causal_lm(str(tmp_path / "full")).state_dict()
    b = load_causal_lm(str(out)).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_bad_records_exit_2_naming_file_line_field(tiny, tmp_path, run_cli):
    bad = write(tmp_path / "bad.jsonl", [
        RECORDS[0],
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": "Hi", "completion": "Hello", "label": "yes"},
        {"prompt": "Hi", "label": True},
        {"prompt": "Hi", "completions": ["a", "b"], "ranking": [0, 1]},
    ])
    result = run_cli("kto", "--model", str(tiny), "--data", str(bad), "--output", str(tmp_path / "o"))
    assert result.code == 2
    assert result.errors == [
        f"error: {bad}:2: field 'label': missing field (true: a desirable completion, false: an undesirable one)",
        f"error: {bad}:3: field 'label': expected true or false, got 'yes'",
        f"error: {bad}:4: field 'completion': missing field",
        f"error: {bad}:5: field 'completions': a ranking is not unpaired feedback: expected "
        "{prompt, completion, label} or {prompt, chosen, rejected}",
    ]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_flags_validated_before_loading(tiny, tmp_path, run_cli):
    result = run_cli("kto", "--model", str(tiny), "--data", str(tmp_path / "x.jsonl"), "--output",
                     str(tmp_path / "o"), "--batch-size", "1", "--beta", "0", "--undesirable-weight", "-1")
    assert result.code == 2
    joined = "\n".join(result.errors)
    for message in ("--beta must be > 0", "--undesirable-weight must be > 0", "--batch-size and --eval-batch-size "
                    "must be >= 2", "--data: no such file"):
        assert message in joined, message
