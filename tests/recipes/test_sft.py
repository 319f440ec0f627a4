"""``rlhfkit sft`` through the real CLI on a tiny model: metrics, learning, checkpoints, the final
folder, and the pieces of the recipe (packing, collation, token normalisation)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from core_helpers import read_metrics
from rlhfkit.data.chat import Encoded

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LR = 12, 3e-2
REQUIRED = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_s")


@pytest.fixture(scope="module")
def sft_run(one_thread, tiny_lm, sft_toy, tmp_path_factory):
    from rlhfkit.cli import main

    out = tmp_path_factory.mktemp("sft") / "run"
    code = main(["sft", "--model", tiny_lm, "--data", sft_toy, "--eval-data", sft_toy, "--output", str(out),
                 "--max-steps", str(STEPS), "--batch-size", "4", "--lr", str(LR), "--save-steps", "5",
                 "--save-total-limit", "2", "--no-progress"])
    assert code == 0
    return out


def test_one_metrics_row_per_step_with_the_common_vocabulary(sft_run):
    rows = read_metrics(sft_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in REQUIRED:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r)
        assert r["grad_norm"] > 0 and r["tokens_per_second"] > 0 and r["elapsed_s"] > 0
        assert r["epoch"] == pytest.approx(r["step"])  # a batch of 4 is the whole toy set
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(rows, rows[1:]))
    # linear decay without warmup: the rate after step k is LR * (1 - k / STEPS)
    assert [r["learning_rate"] for r in rows] == pytest.approx([LR * (1 - k / STEPS) for k in range(1, STEPS + 1)])
    assert all("eval/loss" not in r for r in rows[:-1])


def _token_mean_nll(folder, data) -> float:
    """Σ NLL of the trained tokens / their count, with plain transformers and the encoder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.data.chat import encode
    from rlhfkit.data.schema import load_sft

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    total, count = 0.0, 0
    for ex in load_sft(data):
        enc = encode(tokenizer, ex.prompt, ex.completion)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        for t in range(1, len(enc.input_ids)):
            if enc.trained[t]:
                total -= float(logp[t - 1, enc.input_ids[t]])
                count += 1
    return total / count


def test_first_loss_is_the_token_mean_over_the_global_batch(sft_run, tiny_lm, sft_toy):
    """Step 1 sees all four examples: its loss is Σ NLL(trained tokens) / #trained tokens of the batch,
    computed here independently from the initial model."""
    assert read_metrics(sft_run)[0]["loss"] == pytest.approx(_token_mean_nll(tiny_lm, sft_toy), rel=1e-5)


def test_loss_falls_on_a_memorisable_set(sft_run):
    rows = read_metrics(sft_run)
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.5 * losses[0]
    assert losses[0] > 4.0  # a random model over ~260 tokens starts near log(260) = 5.6
    last = rows[-1]
    # eval on the same set after the last update: below the last training loss, and exp() of it
    assert last["eval/loss"] < losses[-1]
    assert last["eval/perplexity"] == pytest.approx(math.exp(last["eval/loss"]), rel=1e-5)


def test_final_folder_loads_with_transformers(sft_run, tiny_lm, sft_toy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = AutoModelForCausalLM.from_pretrained(sft_run)
    initial = AutoModelForCausalLM.from_pretrained(tiny_lm)
    tokenizer = AutoTokenizer.from_pretrained(sft_run)
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id
    moved = [n for (n, a), (_, b) in zip(trained.named_parameters(), initial.named_parameters())
             if not torch.equal(a, b)]
    assert len(moved) == len(list(initial.parameters()))
    # the saved folder is the model that was evaluated at the end
    assert _token_mean_nll(sft_run, sft_toy) == pytest.approx(read_metrics(sft_run)[-1]["eval/loss"], rel=1e-5)


def test_config_and_checkpoints_are_written(sft_run):
    cfg = yaml.safe_load((sft_run / "config.yaml").read_text())
    assert cfg["max_steps"] == STEPS and cfg["lr"] == LR and cfg["save_steps"] == 5
    names = sorted(p.name for p in sft_run.iterdir() if p.name.startswith(("checkpoint-", ".tmp")))
    assert names == ["checkpoint-10", "checkpoint-12"]  # checkpoint-5 rotated out (limit 2)
    state = yaml.safe_load((sft_run / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["step"] == 10
    files = {p.name for p in (sft_run / "checkpoint-10").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= files


def test_base_model_logging_steps_and_cosine_warmup(run_cli, tiny_base_lm, tmp_path):
    """A model without chat template trains on raw text; rows every --logging-steps plus the last."""
    from core_helpers import write_jsonl

    data = write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "The sky is", "completion": " blue."},
                                                {"prompt": "Grass is", "completion": " green."}])
    result = run_cli("sft", "--model", tiny_base_lm, "--data", data, "--output", tmp_path / "o", "--max-steps", "7",
                     "--batch-size", "2", "--logging-steps", "3", "--lr", "1e-2", "--lr-schedule", "cosine",
                     "--warmup-ratio", "0.3", "--no-progress")
    assert result.code == 0, result.err
    rows = read_metrics(tmp_path / "o")
    assert [r["step"] for r in rows] == [3, 6, 7]
    # warmup over round(0.3 * 7) = 2 steps, then cosine decay to 0 at step 7
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 5)) for k in (3, 6, 7)]
    assert [r["learning_rate"] for r in rows] == pytest.approx(expected, abs=1e-9)
    assert "sft done" in result.out


# ------------------------------------------------------------------ recipe pieces


def _enc(ids, trained):
    return Encoded(list(ids), list(trained))


def test_collate_pads_right_and_masks_labels():
    from rlhfkit.data.collate import collate
    from rlhfkit.recipes.sft import trained_tokens

    a = _enc([5, 6, 7, 8], [False, False, True, True])
    b = _enc([9, 10], [False, True])
    batch = collate([[a], [b]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert trained_tokens([[a], [b]]) == 3


def test_packing_fills_rows_and_restarts_positions():
    from rlhfkit.data.collate import collate
    from rlhfkit.recipes.sft import pack

    examples = [_enc(range(1, 7), [False] * 3 + [True] * 3), _enc(range(10, 14), [False, True, True, True]),
                _enc(range(20, 23), [False, True, True]), _enc(range(30, 33), [False, False, True])]
    rows = pack(examples, max_length=8)
    assert all(sum(len(e.input_ids) for e in row) <= 8 for row in rows)
    assert sorted(len(e.input_ids) for row in rows for e in row) == [3, 3, 4, 6]  # nothing lost or split
    assert len(rows) == 3  # 6 | 4+3 | 3  (first fit, longest first)
    batch = collate(rows, pad_id=0)
    row = [r for r in rows if len(r) == 2][0]
    i = rows.index(row)
    assert batch["position_ids"][i].tolist()[:7] == [0, 1, 2, 3, 0, 1, 2]
    assert batch["attention_mask"][i].sum() == 7


def test_bfloat16_and_tensorboard(run_cli, tiny_lm, sft_toy, tmp_path):
    import json

    out = tmp_path / "bf16"
    result = run_cli("sft", "--model", tiny_lm, "--data", sft_toy, "--output", out, "--max-steps", "2",
                     "--batch-size", "2", "--lr", "1e-2", "--dtype", "bfloat16", "--report-to", "tensorboard",
                     "--no-progress")
    assert result.code == 0, result.err
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
