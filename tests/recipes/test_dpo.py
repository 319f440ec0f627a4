"""`rlhfkit dpo` on a tiny random model: every loss through the real CLI, the packed forward
against the padded one, margins, the reference options, and exact resume."""

from __future__ import annotations

import json
import math
import shutil
import typing
from pathlib import Path

import pytest
import torch

from core_helpers import read_metrics
from rlhfkit.cli import main as cli
from rlhfkit.data.schema import PreferenceExample
from rlhfkit.losses import DPO_LOSSES
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.models.packed import Group, packed_forward, padded_forward, supports_packing
from rlhfkit.models.tiny import make_tiny_causal_lm
from rlhfkit.recipes import dpo

PAIRS = [
    {"prompt": "Say something nice.", "chosen": "You are wonderful.", "rejected": "Go away."},
    {"prompt": "How are you?", "chosen": "Great, thanks for asking!", "rejected": "Bad."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello there!"}],
     "rejected": [{"role": "assistant", "content": "What do you want"}]},
    {"prompt": "Name a colour", "completions": ["blue", "a colour", "no"], "ranking": [0, 1, 2]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return Path(make_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def run_dpo(tiny, data, out, *extra) -> list[dict]:
    code = cli(["dpo", "--model", str(tiny), "--data", str(data), "--output", str(out), "--batch-size", "2",
                "--lr", "1e-3", "--no-progress", *extra])
    assert code == 0
    return read_metrics(out)


def test_loss_flag_lists_every_registered_loss():
    hints = typing.get_type_hints(dpo.Config)
    assert set(typing.get_args(hints["loss"])) == set(DPO_LOSSES)


@pytest.mark.parametrize("loss", sorted(DPO_LOSSES))
def test_cli_smoke_every_loss(tiny, pairs_file, tmp_path, loss):
    extra = ["--label-smoothing", "0.1"] if loss == "robust" else []
    rows = run_dpo(tiny, pairs_file, tmp_path / "out", "--loss", loss, "--max-steps", "2", *extra)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_s", *dpo.METRIC_KEYS):
        assert all(math.isfinite(r[key]) for r in rows), key
    if loss == "sigmoid":  # π = π_ref at step 0: every pair's loss is log 2
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    model = load_causal_lm(str(tmp_path / "out"))
    assert model.config.model_type == "llama"
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert (tmp_path / "out" / "config.yaml").exists()
    assert list((tmp_path / "out").glob("ref-logps-*.pt")) or loss == "simpo"


def test_margin_is_an_offset_inside_the_sigmoid(tiny, tmp_path):
    # At step 0 π = π_ref, so Δ = 0 and the loss is −log σ(−m) = log(1 + e^m).
    data = tmp_path / "margin.jsonl"
    data.write_text(json.dumps({**PAIRS[0], "margin": 1.5}) + "\n")
    rows = run_dpo(tiny, data, tmp_path / "out", "--max-steps", "1", "--batch-size", "1")
    assert rows[0]["loss"] == pytest.approx(math.log1p(math.exp(1.5)), abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # rewards stay β·log-ratios
    rows = run_dpo(tiny, data, tmp_path / "out2", "--max-steps", "1", "--batch-size", "1", "--no-use-margin")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_packed_forward_equals_padded_rows(tiny):
    model = load_causal_lm(str(tiny))
    assert supports_packing(model)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 200, (n,), generator=g).tolist()

    groups = [Group(ids(5), [ids(7), ids(3)]), Group(ids(1), [ids(4), ids(9), ids(2)]),
              Group(ids(8), [ids(6), ids(6)], [[True] * 6, [False, False, True, True, True, True]])]
    packed, padded = packed_forward(model, groups), padded_forward(model, groups)
    torch.testing.assert_close(packed.logps, padded.logps, atol=1e-5, rtol=1e-5)
    assert packed.lengths.tolist() == padded.lengths.tolist() == [7, 3, 4, 9, 2, 6, 4]
    assert packed.tokens == 5 + 10 + 1 + 15 + 8 + 12 < padded.tokens
    packed.logps.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    padded.logps.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)


def test_encode_pair_shares_the_prompt_and_truncates_both(tiny):
    tokenizer = load_tokenizer(str(tiny))
    ex = PreferenceExample("a fairly long prompt " * 3, "short", "a much longer rejected answer here")
    full = dpo.encode_pair(tokenizer, ex, 10_000)
    assert not full.truncated
    prompt_len = len(full.group.prompt)
    cut = dpo.encode_pair(tokenizer, ex, prompt_len + 10)
    assert cut.truncated
    assert all(len(cut.group.prompt) + len(c) <= prompt_len + 10 for c in cut.group.completions)
    assert cut.group.prompt == full.group.prompt[-len(cut.group.prompt):]  # cut from the left
    assert dpo.encode_pair(tokenizer, ex, prompt_len + 10, "drop") is None


def test_reference_options(tiny, pairs_file, tmp_path):
    base = run_dpo(tiny, pairs_file, tmp_path / "pre", "--max-steps", "2")
    fly = run_dpo(tiny, pairs_file, tmp_path / "fly", "--max-steps", "2", "--no-precompute-ref")
    for a, b in zip(base, fly):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert not list((tmp_path / "fly").glob("ref-logps-*.pt"))
    # LoRA: the reference is the base with the adapters disabled, precomputed or on the fly.
    lora_pre = run_dpo(tiny, pairs_file, tmp_path / "lora", "--max-steps", "2", "--lora-r", "4", "--lr", "1e-2")
    lora_fly = run_dpo(tiny, pairs_file, tmp_path / "lora_fly", "--max-steps", "2", "--lora-r", "4", "--lr", "1e-2",
                       "--no-precompute-ref")
    assert lora_pre[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert lora_pre[1]["loss"] == pytest.approx(lora_fly[1]["loss"], abs=1e-5)
    # Another reference model: the log-ratios are not 0 at step 0.
    other = make_tiny_causal_lm(tmp_path / "ref", seed=1)
    rows = run_dpo(tiny, pairs_file, tmp_path / "other", "--max-steps", "1", "--ref-model", other)
    assert abs(rows[0]["rewards/margins"]) > 1e-4


def test_resume_equals_uninterrupted_and_reuses_the_reference_cache(tiny, pairs_file, tmp_path, capsys):
    args = ("--max-steps", "4", "--save-steps", "2", "--save-total-limit", "0")
    full = run_dpo(tiny, pairs_file, tmp_path / "full", *args)
    out = tmp_path / "resumed"
    run_dpo(tiny, pairs_file, out, *args)
    # Pretend the run died after step 2: drop what came later.
    shutil.rmtree(out / "checkpoint-4")
    (out / "model.safetensors").unlink()
    capsys.readouterr()
    resumed = run_dpo(tiny, pairs_file, out, *args, "--resume")
    assert "reusing ref-logps-" in capsys.readouterr().out
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    a = load_causal_lm(str(tmp_path / "full")).state_dict()
    b = load_causal_lm(str(out)).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("argv, message", [
    (["--loss", "hinge", "--label-smoothing", "0.1"], "--label-smoothing is used only by"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--loss", "simpo", "--ref-model", "x"], "reference-free"),
])
def test_inconsistent_flags_exit_2(tiny, pairs_file, tmp_path, capsys, argv, message):
    code = cli(["dpo", "--model", str(tiny), "--data", str(pairs_file), "--output", str(tmp_path / "o"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
