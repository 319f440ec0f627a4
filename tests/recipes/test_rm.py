"""``rlhfkit rm`` through the real CLI: Bradley–Terry on a tiny Llama and on the embedded MiniLM,
the margin term, ranking losses, normalisation, and the saved model used from Python."""

from __future__ import annotations

import math

import pytest
import torch

from core_helpers import PAIRS_EVAL, PAIRS_TRAIN, RANKINGS, read_metrics, write_jsonl
from rlhfkit.recipes.rm import Comparison, Config, comparison_losses, load_comparisons

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10


@pytest.fixture(scope="module")
def rm_run(one_thread, tiny_lm, pairs_train, pairs_eval, tmp_path_factory):
    from rlhfkit.cli import main

    out = tmp_path_factory.mktemp("rm") / "run"
    code = main(["rm", "--model", tiny_lm, "--data", pairs_train, "--eval-data", pairs_eval, "--output", str(out),
                 "--max-steps", str(STEPS), "--batch-size", "8", "--lr", "1e-2", "--no-progress"])
    assert code == 0
    return out


def test_metrics_rows_and_eval_accuracy(rm_run):
    rows = read_metrics(rm_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_s", "train/accuracy",
                    "train/margin"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert 0.0 <= r["train/accuracy"] <= 1.0
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # a fresh head scores both sides alike
    assert rows[-1]["loss"] < 0.3
    last = rows[-1]
    assert last["eval/accuracy"] == 1.0 and last["eval/margin"] > 0.5
    assert last["eval/reward_std"] > 0
    assert all(not k.startswith("eval/") for r in rows[:-1] for k in r)


def test_saved_folder_loads_with_transformers(rm_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_run)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(rm_run)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert isinstance(model.config.rlhfkit_reward_offset, float)  # the normalisation travels with the model


def test_load_reward_model_scores_and_prefers_chosen(rm_run):
    import rlhfkit

    rm = rlhfkit.load_reward_model(str(rm_run))
    prompts = [p["prompt"] for p in PAIRS_EVAL]
    chosen = rm.score(prompts, [p["chosen"] for p in PAIRS_EVAL])
    rejected = rm.score(prompts, [p["rejected"] for p in PAIRS_EVAL])
    assert len(chosen) == len(PAIRS_EVAL) and all(type(x) is float for x in chosen)
    assert all(c > r for c, r in zip(chosen, rejected))
    # the offset-free scores are what transformers computes, minus the stored offset
    from rlhfkit.models.reward import reward_inputs

    batch = reward_inputs(rm.tokenizer, prompts, [p["chosen"] for p in PAIRS_EVAL])
    with torch.no_grad():
        raw = rm.model(**batch).logits.squeeze(-1)
    assert [x + rm.offset for x in chosen] == pytest.approx(raw.tolist(), abs=1e-5)
    # batch size does not change a score (padding is ignored)
    assert rm.score(prompts, [p["chosen"] for p in PAIRS_EVAL], batch_size=3) == pytest.approx(chosen, abs=1e-5)


def test_normalisation_makes_the_mean_training_reward_zero(rm_run):
    import rlhfkit

    rm = rlhfkit.load_reward_model(str(rm_run))
    prompts = [p["prompt"] for p in PAIRS_TRAIN]
    scores = (rm.score(prompts, [p["chosen"] for p in PAIRS_TRAIN])
              + rm.score(prompts, [p["rejected"] for p in PAIRS_TRAIN]))
    assert abs(rm.offset) > 1e-3  # there was something to remove
    assert sum(scores) / len(scores) == pytest.approx(0.0, abs=1e-4)


def test_eval_rm_on_the_trained_folder_agrees(rm_run, pairs_eval, run_cli, tmp_path):
    import json

    result = run_cli("eval-rm", "--reward", rm_run, "--data", pairs_eval, "--output", tmp_path / "e")
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "e" / "results.json").read_text())
    last = read_metrics(rm_run)[-1]
    assert report["accuracy"] == last["eval/accuracy"] == 1.0
    assert report["margin"] == pytest.approx(last["eval/margin"], abs=1e-4)


def test_no_normalize_stores_no_offset(run_cli, tiny_lm, pairs_train, tmp_path):
    from transformers import AutoConfig

    result = run_cli("rm", "--model", tiny_lm, "--data", pairs_train, "--output", tmp_path / "o", "--max-steps", "1",
                     "--batch-size", "4", "--no-normalize", "--no-progress")
    assert result.code == 0, result.err
    assert not hasattr(AutoConfig.from_pretrained(tmp_path / "o"), "rlhfkit_reward_offset")
    assert "rm done: loss" in result.out


# ------------------------------------------------------------------ margin and ranking losses


def test_comparison_losses_hand_worked():
    """BT: −log σ(1 − 0) = log(1 + e^−1) = 0.31326; with margin 0.5: log(1 + e^−0.5) = 0.47408.
    Listwise best-of-3 on r = (2, 1, 0): log(1 + e^−1 + e^−2) = 0.40761.
    Plackett–Luce adds the second choice among (1, 0): log(1 + e^−1) = 0.31326 → 0.72087."""
    pair = Comparison("p", ("a", "b"), margin=0.5)
    triple = Comparison("p", ("a", "b", "c"))
    r2, r3 = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0, 0.0])
    cfg = Config(data="x", output="y")
    assert comparison_losses([r2], [pair], cfg).tolist() == pytest.approx([0.47408], abs=1e-5)
    cfg.use_margin = False
    assert comparison_losses([r2], [pair], cfg).tolist() == pytest.approx([0.31326], abs=1e-5)
    cfg.ranking_loss = "listwise"
    assert comparison_losses([r3], [triple], cfg).tolist() == pytest.approx([0.40761], abs=1e-5)
    cfg.ranking_loss = "plackett-luce"
    assert comparison_losses([r3, r2], [triple, pair], cfg).tolist() == pytest.approx([0.72087, 0.31326], abs=1e-5)


def test_rankings_load_best_first_or_as_pairs(rankings):
    lists = load_comparisons(rankings, "listwise")
    assert len(lists) == len(RANKINGS)
    assert lists[0].completions == ("good 0", "ok 0", "bad 0")
    pairs = load_comparisons(rankings, "pairs")
    assert len(pairs) == 3 * len(RANKINGS)
    assert [c.completions for c in pairs[:3]] == [("good 0", "ok 0"), ("good 0", "bad 0"), ("ok 0", "bad 0")]


@pytest.mark.parametrize("loss, start, epoch", [
    ("pairs", math.log(2), 6 / 18),                  # 18 expanded pairs, −log σ(0) each
    ("listwise", math.log(3), 1.0),                  # −log softmax over 3 equal scores
    ("plackett-luce", math.log(3) + math.log(2), 1.0),
])
def test_ranking_losses_run_through_the_cli(loss, start, epoch, run_cli, tiny_lm, rankings, tmp_path):
    result = run_cli("rm", "--model", tiny_lm, "--data", rankings, "--output", tmp_path / "o", "--max-steps", "2",
                     "--batch-size", "6", "--ranking-loss", loss, "--lr", "1e-2", "--no-progress")
    assert result.code == 0, result.err
    rows = read_metrics(tmp_path / "o")
    assert rows[0]["loss"] == pytest.approx(start, abs=0.03)
    assert rows[0]["epoch"] == pytest.approx(epoch)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_margin_term_raises_the_loss_by_the_demanded_gap(run_cli, tiny_lm, tmp_path):
    """At initialisation r_c ≈ r_r, so −log σ(0 − 2) = log(1 + e²) = 2.1269 with the margin, log 2 without."""
    data = write_jsonl(tmp_path / "m.jsonl", [dict(p, margin=2.0) for p in PAIRS_TRAIN[:4]])
    losses = {}
    for flag in ("--use-margin", "--no-use-margin"):
        out = tmp_path / flag.strip("-")
        result = run_cli("rm", "--model", tiny_lm, "--data", data, "--output", out, "--max-steps", "1",
                         "--batch-size", "4", flag, "--no-progress", "--no-normalize")
        assert result.code == 0, result.err
        losses[flag] = read_metrics(out)[0]["loss"]
    assert losses["--use-margin"] == pytest.approx(math.log(1 + math.e ** 2), abs=0.03)
    assert losses["--no-use-margin"] == pytest.approx(math.log(2), abs=0.03)


# ------------------------------------------------------------------ other backbones, LoRA


def test_lora_reward_model_is_saved_merged(run_cli, tiny_lm, pairs_train, tmp_path):
    from transformers import AutoModelForSequenceClassification

    import rlhfkit

    out = tmp_path / "lora"
    result = run_cli("rm", "--model", tiny_lm, "--data", pairs_train, "--output", out, "--max-steps", "6",
                     "--batch-size", "8", "--lr", "2e-2", "--lora-r", "4", "--no-progress")
    assert result.code == 0, result.err
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    rows = read_metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05  # adapters and the head learn
    scores = rlhfkit.load_reward_model(str(out)).score(["question 1"], ["good answer 1"])
    assert len(scores) == 1 and math.isfinite(scores[0])


@pytest.mark.slow
def test_minilm_encoder_backbone(run_cli, pairs_train, pairs_eval, tmp_path):
    """The embedded default backbone: ``rlhfkit rm --model minilm-l6 ... --eval-data`` reports eval/accuracy."""
    from transformers import AutoModelForSequenceClassification

    import rlhfkit

    out = tmp_path / "minilm"
    result = run_cli("rm", "--model", "minilm-l6", "--data", pairs_train, "--eval-data", pairs_eval, "--output", out,
                     "--max-steps", "4", "--batch-size", "4", "--lr", "1e-4", "--max-length", "64", "--no-progress")
    assert result.code == 0, result.err
    last = read_metrics(out)[-1]
    assert 0.0 <= last["eval/accuracy"] <= 1.0 and "eval/margin" in last
    assert "rm done: eval accuracy" in result.out
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 1
    rm = rlhfkit.load_reward_model(str(out))
    scores = rm.score([p["prompt"] for p in PAIRS_TRAIN], [p["chosen"] for p in PAIRS_TRAIN])
    rejected = rm.score([p["prompt"] for p in PAIRS_TRAIN], [p["rejected"] for p in PAIRS_TRAIN])
    assert sum(scores + rejected) / (2 * len(scores)) == pytest.approx(0.0, abs=1e-4)
