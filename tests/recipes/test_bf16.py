"""``--bf16``: bfloat16 autocast over float32 weights (training.Run.autocast), through the real CLI on
the tiny model.

Tolerance of the loss curves: bfloat16 keeps 8 significant bits, so each matmul output is rounded
by up to 2^-9 ≈ 0.2% of its value; the loss averages many such errors, but a few steps at a high
learning rate (chosen so that the curve moves) carry them into the weights and compound them. Each
step's loss is asked to be within 1% of float32's plus 2e-3 (for losses near 0). Measured on this
model: sft 0.27% (6 steps), dpo 0.65%, ppo 0.04% (its rollouts sampled the same tokens). The
curves are also asked to differ somewhere: the bf16 path really ran.
"""

from __future__ import annotations

import math

import pytest
import torch

from core_helpers import read_metrics, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL, ATOL = 1e-2, 2e-3


def losses_fp32_and_bf16(run_cli, tmp_path, *args) -> tuple[list[float], list[float]]:
    curves = []
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        result = run_cli(*args, "--output", tmp_path / name, "--no-progress", *extra)
        assert result.code == 0, result.err
        curves.append([r["loss"] for r in read_metrics(tmp_path / name)])
    return curves[0], curves[1]


def assert_close_curves(fp32: list[float], bf16: list[float]) -> None:
    assert len(fp32) == len(bf16) > 1
    for step, (a, b) in enumerate(zip(fp32, bf16), 1):
        assert abs(a - b) <= ATOL + RTOL * abs(a), (step, fp32, bf16)
    assert fp32 != bf16  # bfloat16 rounding changed something: autocast was on


def test_sft_loss_curve_and_float32_master_weights_and_optimizer_state(run_cli, tiny_lm, sft_toy, tmp_path):
    from safetensors.torch import load_file

    fp32, bf16 = losses_fp32_and_bf16(run_cli, tmp_path, "sft", "--model", tiny_lm, "--data", sft_toy,
                                      "--max-steps", 6, "--batch-size", 4, "--lr", 3e-2)
    assert_close_curves(fp32, bf16)
    assert fp32[-1] < fp32[0] - 1 and bf16[-1] < bf16[0] - 1  # both learn
    # the weights trained and saved are float32, and so are both Adam moments (checkpoint-6/, accelerate's files)
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}
    optimizer = torch.load(tmp_path / "bf16" / "checkpoint-6" / "optimizer.bin", weights_only=False)
    moments = [v for state in optimizer["state"].values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(weights) and {m.dtype for m in moments} == {torch.float32}


def test_dpo_loss_curve(run_cli, tiny_lm, pairs_train, tmp_path):
    fp32, bf16 = losses_fp32_and_bf16(run_cli, tmp_path, "dpo", "--model", tiny_lm, "--data", pairs_train,
                                      "--max-steps", 6, "--batch-size", 4, "--lr", 3e-2)
    assert_close_curves(fp32, bf16)
    # the reference's log-probs ran under the same autocast as the policy's: the first loss is exactly log 2
    assert bf16[0] == pytest.approx(math.log(2), abs=1e-6)
    assert sorted(p.name.endswith("-bf16.pt") for p in tmp_path.glob("*/ref-logps-*.pt")) == [False, True]


def test_ppo_loss_curve(run_cli, tiny_lm, reward_fn, prompts, tmp_path):
    fp32, bf16 = losses_fp32_and_bf16(run_cli, tmp_path, "ppo", "--model", tiny_lm, "--reward", reward_fn,
                                      "--prompts", prompts, "--max-new-tokens", 8, "--max-steps", 3, "--batch-size", 8,
                                      "--minibatch-size", 4, "--ppo-epochs", 2, "--lr", 3e-3)
    rows = {name: read_metrics(tmp_path / name) for name in ("fp32", "bf16")}
    # the curves compare like with like only if the rollouts sampled the same tokens (so the same scores)
    assert [r["objective/scores"] for r in rows["fp32"]] == [r["objective/scores"] for r in rows["bf16"]]
    assert_close_curves(fp32, bf16)
    assert rows["bf16"][0]["objective/kl"] == 0  # policy and reference computed alike under autocast


def test_ppo_ratio_is_1_on_the_first_minibatch(tiny_lm):
    """Under autocast the rollout recomputes its log-probs with the update's forward pass, so the
    ratio π/π_old of a minibatch (other rows, so other padding, than the rollout's batches) is 1
    within 1e-3 before any update (measured: 5e-4 at most per token). The float32 forward of the same
    minibatch gives other log-probs: the rollout's ran in bfloat16."""
    import copy

    from rlhfkit.generation.decoding import SamplingParams
    from rlhfkit.models.loading import load_policy
    from rlhfkit.rl.rollout import forward_response, rollout
    from rlhfkit.rl.value import ActorCritic, ValueHead

    policy, tokenizer = load_policy(tiny_lm)
    head = ValueHead(policy.config.hidden_size)
    torch.manual_seed(1)
    torch.nn.init.normal_(head.summary.weight, std=0.5)
    model, reference = ActorCritic(policy, head).eval(), copy.deepcopy(policy).requires_grad_(False)
    prompts = ["Hello there", "What is the capital of France? Tell me about it.", "hi"]
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = rollout(model, reference, tokenizer, prompts, SamplingParams(max_new_tokens=12, temperature=0.9, n=2))
        mb = batch.select([4, 1])
        out = forward_response(model, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask, 0.9)
    fp32 = forward_response(model, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask, 0.9)
    real = mb.response_mask
    assert out.logprobs.dtype == out.values.dtype == torch.float32
    ratio = (out.logprobs.detach() - mb.logprobs).exp()[real]
    assert (ratio - 1).abs().max() < 1e-3 and abs(float(ratio.mean()) - 1) < 1e-3
    assert (out.values.detach() - mb.values)[real].abs().max() < 1e-2
    assert (fp32.logprobs.detach() - mb.logprobs)[real].abs().max() > 1e-5
    assert torch.equal(batch.logprobs, batch.ref_logprobs)  # policy == reference, computed alike: KL exactly 0


KTO_DATA = [{"prompt": f"question {i}", "completion": f"{'good' if i % 2 else 'bad'} answer {i}", "label": bool(i % 2)}
            for i in range(8)]
OFFLINE_DATA = [{"prompt": f"question {i}", "completion": f"{'good' if i % 2 else 'bad'} answer {i}",
                 "reward": 1.0 if i % 2 else -1.0} for i in range(8)]


@pytest.mark.parametrize("command,data", [("rm", "pairs"), ("kto", KTO_DATA), ("prm", "stepwise"),
                                          ("offline-rl", OFFLINE_DATA)])
def test_the_other_step_based_recipes(run_cli, tiny_lm, pairs_train, stepwise_train, tmp_path, command, data):
    if isinstance(data, list):
        data = write_jsonl(tmp_path / "data.jsonl", data)
    data = {"pairs": pairs_train, "stepwise": stepwise_train}.get(data, data)
    fp32, bf16 = losses_fp32_and_bf16(run_cli, tmp_path, command, "--model", tiny_lm, "--data", data,
                                      "--max-steps", 4, "--batch-size", 4, "--lr", 1e-2)
    assert_close_curves(fp32, bf16)


def test_online_dpo_runs(run_cli, tiny_lm, reward_fn, prompts, tmp_path):
    result = run_cli("dpo", "--online", "--model", tiny_lm, "--prompts", prompts, "--reward", reward_fn,
                     "--output", tmp_path, "--max-new-tokens", 8, "--max-steps", 2, "--batch-size", 4, "--bf16",
                     "--no-progress")
    assert result.code == 0, result.err
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["objective/kl"] == 0  # the policy and its reference computed alike under autocast


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "kto", "ppo", "prm", "offline-rl", "rejection-sampling"])
def test_bf16_with_dtype_bfloat16_exits_2_before_loading_a_model(run_cli, no_model_loading, tmp_path, command):
    result = run_cli(command, "--bf16", "--dtype", "bfloat16", "--output", tmp_path)
    assert result.code == 2
    assert any("--bf16" in e and "--dtype bfloat16" in e and "exclude each other" in e for e in result.errors), \
        result.err
    assert no_model_loading == []
