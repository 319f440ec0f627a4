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

from core_helpers import assert_same_params, read_metrics, run_distributed
from rlhfkit.cli import main as cli
from rlhfkit.data.schema import load_unpaired
from rlhfkit.losses import kto_loss
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.models.packed import completion_logps
from rlhfkit.models.tiny import make_tiny_causal_lm
from rlhfkit.recipes import kto
from rlhfkit.training import StepPlan

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


def expected_two_process_step(model, ref, data, batch_size: int, beta: float) -> tuple[float, float]:
    """Step 1 of a 2-process kto run worked out in one process: rank r's micro-batch is the r-th
    slice of the global batch; each rank's mismatched pairs stay inside its micro-batch; z_ref is
    max(0, the mean of the two ranks' mean log-ratios), shared; the loss is the mean over all examples."""
    tokenizer = load_tokenizer(model)
    examples = kto.encode_examples(tokenizer, load_unpaired(str(data)), str(data), 512)
    plan = StepPlan(len(examples), batch_size, 1, 2, seed=42, total_steps=1)
    policy, reference = load_causal_lm(model), load_causal_lm(ref)
    logps = []
    with torch.no_grad():
        for rank in range(2):
            (mb,) = plan.local_microbatches(0, rank)
            batch = [examples[i] for i in mb]
            groups = kto.kl_groups(batch, 512, mismatched=True)
            logps.append((completion_logps(policy, groups).logps.view(-1, 2),
                          completion_logps(reference, groups).logps.view(-1, 2),
                          torch.tensor([ex.desirable for ex in batch])))
    means = torch.stack([(p[:, 1] - r[:, 1]).mean() for p, r, _ in logps])
    z = means.mean().clamp(min=0)
    losses = torch.cat([kto_loss(p[:, 0], r[:, 0], d, z, beta=beta)[0] for p, r, d in logps])
    # each rank with its own z_ref (no gather) would give another loss: the comparison can fail
    alone = torch.cat([kto_loss(p[:, 0], r[:, 0], d, m.clamp(min=0), beta=beta)[0]
                       for (p, r, d), m in zip(logps, means)])
    assert abs(float(alone.mean() - losses.mean())) > 1e-5
    return float(losses.mean()), float(z)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_share_the_reference_point(tiny, data, tmp_path):
    """kto under 2 processes: z_ref is averaged over the processes (TRL's gather), checked against
    step 1 worked out in one process. apo_zero_unpaired (no reference point) under 2 processes
    equals one process with the same global batch."""
    # seeds chosen so that the mean log-ratio of the mismatched pairs is positive
    policy, ref = make_tiny_causal_lm(tmp_path / "policy", seed=1), str(tiny)
    common = ["kto", "--model", policy, "--data", data, "--lr", "1e-3", "--no-progress", "--batch-size", "3"]
    launched = run_distributed([*common, "--max-steps", "1", "--ref-model", ref, "--output", tmp_path / "two"])
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]
    (row,) = read_metrics(tmp_path / "two")
    loss, z = expected_two_process_step(policy, ref, data, batch_size=3, beta=0.1)
    assert z > 1e-4  # a real reference point, not the clamp
    assert row["kl"] == pytest.approx(z, abs=1e-6)
    assert row["loss"] == pytest.approx(loss, abs=1e-6)

    apo = [*common, "--max-steps", "2", "--loss", "apo_zero_unpaired"]
    launched = run_distributed([*apo, "--output", tmp_path / "apo2"])
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]
    assert cli([*map(str, apo), "--grad-accum", "2", "--output", str(tmp_path / "apo1")]) == 0
    assert_same_params(tmp_path / "apo1", tmp_path / "apo2", atol=1e-5)
    for a, b in zip(read_metrics(tmp_path / "apo1"), read_metrics(tmp_path / "apo2")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-6)


def test_deployment_feedback_export_trains(tiny, tmp_path):
    """serve's feedback log → `rlhfkit feedback export --format kto` → `rlhfkit kto` (issue 13 §3-4)."""
    from types import SimpleNamespace

    from rlhfkit.serve.feedback import FeedbackStore

    store = FeedbackStore(str(tmp_path / "fb.db"))
    chats = [("Say something nice.", "You are wonderful.", "up"), ("How are you?", "Bad.", "down"),
             ("Name a colour", "blue", "up"), ("Tell me a joke", "No.", "down")]
    for k, (prompt, reply, rating) in enumerate(chats):
        store.log_chat(f"chatcmpl-{k}", "tiny", [{"role": "user", "content": prompt}], {},
                       [SimpleNamespace(text=reply, finish_reason="stop")])
        assert store.rate(f"chatcmpl-{k}", 0, rating, None).rating == rating
    store.dispose()
    records = tmp_path / "kto.jsonl"
    assert cli(["feedback", "export", "--db", str(tmp_path / "fb.db"), "--output", str(records)]) == 0
    assert [ex.desirable for ex in load_unpaired(str(records))] == [True, False, True, False]
    rows = run_kto(tiny, records, tmp_path / "out", "--max-steps", "2", "--batch-size", "4")
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # π = π_ref at step 1: λ/2 for every example
    assert rows[1]["rewards/margins"] > 0
