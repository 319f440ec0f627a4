"""``rlhfkit prm`` through the real CLI on a tiny Llama: metrics, the saved model and
``rlhfkit.load_prm``, resume, LoRA, outcome-only training and bad input."""

from __future__ import annotations

import math
import shutil

import pytest

from core_helpers import STEPWISE_EVAL, STEPWISE_TRAIN, assert_same_params, read_metrics, write_jsonl
from rlhfkit.recipes.prm import Chain, Config, trained_labels

pytestmark = pytest.mark.usefixtures("one_thread")


def run_prm(run_cli, model, data, out, *extra):
    result = run_cli("prm", "--model", model, "--data", data, "--output", out, "--batch-size", "8", "--lr", "1e-2",
                     "--no-progress", *extra)
    assert result.code == 0, result.err
    return result


def test_metrics_and_a_final_evaluation_that_beats_always_correct(tiny_prm, run_cli, tiny_lm, stepwise_train,
                                                                  stepwise_eval, tmp_path):
    out = tmp_path / "run"
    result = run_prm(run_cli, tiny_lm, stepwise_train, out, "--max-steps", "40", "--eval-data", stepwise_eval,
                     "--logging-steps", "10")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    for r in rows:
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "train/step_accuracy"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert 0 <= r["train/step_accuracy"] <= 1
    assert all(not k.startswith("eval/") for r in rows[:-1] for k in r)
    last = rows[-1]
    labels = [x for r in STEPWISE_EVAL for x in r["labels"]]
    assert last["eval/always_correct_accuracy"] == pytest.approx(sum(labels) / len(labels))
    assert last["eval/step_accuracy"] == 1.0 and last["eval/first_error_accuracy"] == 1.0
    assert last["eval/loss"] < 0.2 and rows[0]["loss"] > last["loss"]
    assert "eval step accuracy 1.000" in result.out
    # the run and the fixture's (same flags, no eval) trained the same weights
    assert_same_params(out, tiny_prm, atol=1e-6)


def test_saved_folder_is_a_token_classifier_with_its_separator(tiny_prm):
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tiny_prm)
    assert type(model).__name__ == "LlamaForTokenClassification"
    assert model.config.num_labels == 2 and model.config.id2label == {0: "wrong", 1: "correct"}
    assert model.config.rlhfkit_step_separator == "\n"


def test_load_prm_scores_every_step_with_a_probability(tiny_prm):
    import rlhfkit

    prm = rlhfkit.load_prm(tiny_prm)
    prompts = [r["prompt"] for r in STEPWISE_EVAL]
    steps = [r["completions"] for r in STEPWISE_EVAL]
    scores = prm.score_steps(prompts, steps)
    assert [len(s) for s in scores] == [len(s) for s in steps]
    assert all(type(p) is float and 0 < p < 1 for row in scores for p in row)
    for row, record in zip(scores, STEPWISE_EVAL):
        assert [p >= 0.5 for p in row] == record["labels"]
    # batching does not change a score (padding is ignored)
    assert prm.score_steps(prompts, steps, batch_size=3) == [pytest.approx(row, abs=1e-5) for row in scores]
    assert prm.score_steps([], []) == []
    with pytest.raises(ValueError, match="one list per prompt"):
        prm.score_steps(prompts, steps[:-1])


def test_score_reduces_the_steps_of_a_completion(tiny_prm):
    import rlhfkit

    prm = rlhfkit.load_prm(tiny_prm)
    completion = "good step 0\nbad step 1\n\ngood step 2\n"  # the empty piece is not a step
    (probs,) = prm.score_steps(["task 7"], [["good step 0", "bad step 1", "good step 2"]])
    assert prm.score(["task 7"], [completion], "min") == pytest.approx([min(probs)])
    assert prm.score(["task 7"], [completion], "prod") == pytest.approx([math.prod(probs)])
    assert prm.score(["task 7"], [completion], "last") == pytest.approx([probs[-1]])
    assert prm.score(["task 7"], ["  \n"]) == [0.0]  # no step at all: the lowest score


def test_resumed_run_equals_uninterrupted_run(run_cli, tiny_lm, stepwise_train, tmp_path):
    args = ("--max-steps", "4", "--save-steps", "2", "--save-total-limit", "0", "--lora-r", "2")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_prm(run_cli, tiny_lm, stepwise_train, whole, *args)
    run_prm(run_cli, tiny_lm, stepwise_train, resumed, *args)
    shutil.rmtree(resumed / "checkpoint-4")  # as if the run died after its step-2 checkpoint
    (resumed / "model.safetensors").unlink()
    result = run_prm(run_cli, tiny_lm, stepwise_train, resumed, *args, "--resume")
    assert f"resumed from {resumed / 'checkpoint-2'} (step 2)" in result.out
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    for a, b in zip(read_metrics(whole), read_metrics(resumed)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert_same_params(whole, resumed, atol=1e-6)
    assert not (whole / "adapter_model.safetensors").exists()  # LoRA merged: a plain token classifier


def test_last_step_only_trains_on_the_outcome(tmp_path):
    chain = Chain(encoding=None, labels=[True, False, False])
    assert trained_labels(chain, last_step_only=False) == [True, False, False]
    assert trained_labels(chain, last_step_only=True) == [None, None, False]


def test_outcome_model_loss_counts_one_step_per_chain(run_cli, tiny_lm, stepwise_train, tmp_path):
    """With --train-on-last-step-only a fresh head's first loss is the cross-entropy of the last
    steps alone (about log 2 for a near-uniform head), and evaluation still reads every step."""
    out = tmp_path / "orm"
    run_prm(run_cli, tiny_lm, stepwise_train, out, "--max-steps", "1", "--train-on-last-step-only",
            "--eval-data", stepwise_train)
    (row,) = read_metrics(out)
    assert row["loss"] == pytest.approx(math.log(2), abs=0.1)
    labels = [x for r in STEPWISE_TRAIN for x in r["labels"]]
    assert row["eval/always_correct_accuracy"] == pytest.approx(sum(labels) / len(labels))


def test_bad_records_exit_2_with_file_line_and_field(run_cli, tiny_lm, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        STEPWISE_TRAIN[0],
        {"prompt": "p", "completions": ["a", "b"], "labels": [True]},
        {"prompt": "p", "completions": ["a", ""], "labels": [True, "yes"]},
        {"prompt": "p", "completions": [], "labels": []},
    ])
    result = run_cli("prm", "--model", tiny_lm, "--data", data, "--output", tmp_path / "o")
    assert result.code == 2
    assert result.errors == [
        f"error: {data}:2: field 'labels': 1 label(s) for 2 step(s): expected one per step",
        f"error: {data}:3: field 'completions[1]': expected a non-empty string",
        f"error: {data}:3: field 'labels[1]': expected true or false, got 'yes'",
        f"error: {data}:4: field 'completions': expected a non-empty list of steps (strings)",
    ]
    assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("flags, message", [
    (["--step-separator", ""], "--step-separator must not be empty"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
])
def test_bad_flags_exit_2_before_any_model_is_loaded(run_cli, no_model_loading, tiny_lm, stepwise_train, tmp_path,
                                                     flags, message):
    result = run_cli("prm", "--model", tiny_lm, "--data", stepwise_train, "--output", tmp_path / "o", *flags)
    assert result.code == 2
    assert any(message in line for line in result.errors), result.err
    assert no_model_loading == []


def test_separator_escapes_are_understood():
    assert Config(data="d", output="o", step_separator="\\n").separator == "\n"
    assert Config(data="d", output="o", step_separator=" ki\\t").separator == " ki\t"
    assert Config(data="d", output="o").separator == "\n"


def test_the_length_policy_cuts_or_drops_long_chains(run_cli, tiny_lm, tmp_path):
    """The tiny tokenizer has one token per byte: "task 0" + separator = 7 tokens, a step and its
    separator 11-12. At --max-length 30 the 2-step chain fits exactly (30 tokens) and the 4-step one (54)
    keeps its prompt's end and its first steps (truncate) or is dropped (drop); at 10 no step of any
    chain fits: every one is dropped, or an error of the record when truncating."""
    long = {"prompt": "task 0", "completions": ["good step 0", "good step 1", "bad step 2", "good step 3"],
            "labels": [True, True, False, False]}
    data = write_jsonl(tmp_path / "d.jsonl", [long, STEPWISE_TRAIN[0]])
    result = run_prm(run_cli, tiny_lm, data, tmp_path / "t", "--max-steps", "1", "--max-length", "30")
    assert f"{data}: 1 example(s) truncated and 0 dropped at --max-length 30 (policy: truncate)" in result.out
    result = run_prm(run_cli, tiny_lm, data, tmp_path / "d", "--max-steps", "1", "--max-length", "30",
                     "--truncation", "drop")
    assert f"{data}: 0 example(s) truncated and 1 dropped at --max-length 30 (policy: drop)" in result.out
    result = run_cli("prm", "--model", tiny_lm, "--data", data, "--output", tmp_path / "n", "--max-length", "10",
                     "--truncation", "drop")
    assert result.code == 2 and "every example is longer than --max-length 10" in result.err
    result = run_cli("prm", "--model", tiny_lm, "--data", data, "--output", tmp_path / "n", "--max-length", "10")
    assert result.code == 2
    assert f"{data}:1: field 'completions': not even the first step fits in --max-length 10" in result.err


def test_truncated_chains_keep_the_labels_of_the_steps_they_keep(tiny_lm):
    from rlhfkit.data.schema import StepwiseExample
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.recipes.prm import encode_chains

    tok = load_tokenizer(tiny_lm)
    example = StepwiseExample("task 0", ["good step 0", "good step 1", "bad step 2"], [True, True, False])
    (chain,) = encode_chains(tok, [example], Config(data="d", output="o", max_length=30), "d")
    assert chain.labels == [True, True] and len(chain.encoding.step_ends) == 2
