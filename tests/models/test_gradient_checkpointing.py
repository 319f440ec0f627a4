"""--gradient-checkpointing: the same loss and the same gradients as without it, for every recipe
that trains (sft, rm, dpo on both its packed and padded paths, ppo with a value head or a separate
critic), with the model built by the recipe's own builder; and it really recomputes (each decoder
layer's MLP runs twice per forward-and-backward instead of once)."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhfkit.data.schema import load_preferences, load_sft
from rlhfkit.generation.decoding import SamplingParams
from rlhfkit.recipes import dpo, ppo, rm, sft
from rlhfkit.rl.rollout import rollout, score

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp_calls(model) -> list[int]:
    """A counter of the decoder layers' MLP calls (they run again when a checkpointed layer is recomputed;
    a pre-hook, because the recomputation stops early, inside the MLP, once it has what the backward needs)."""
    calls = [0]
    for name, module in model.named_modules():
        if name.endswith(".mlp"):
            module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _sft(cfg, data):
    from rlhfkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    rows = [[e] for e in sft.encode_examples(tokenizer, load_sft(data), cfg)]
    model = sft.build_model(cfg)
    return model, lambda: sft.batch_loss(model, sft.collate(rows, tokenizer.pad_token_id))[0]


def _rm(cfg, data):
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.models.reward import forward_rewards

    tokenizer = load_tokenizer(cfg.model)
    comparisons = rm.load_comparisons(data, "pairs")[:4]
    model = rm.build_model(cfg, tokenizer)

    def loss():
        rewards = forward_rewards(model, rm.comparison_inputs(tokenizer, comparisons, cfg.max_length))
        return rm.comparison_losses(rm.split_rewards(rewards, comparisons), comparisons, cfg).sum()

    return model, loss


def _dpo(cfg, data, packed: bool):
    from rlhfkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    pairs = dpo.encode_pairs(tokenizer, load_preferences(data)[:4], data, cfg.max_length, cfg.truncation)
    model = sft.build_model(cfg)
    dpo.disable_dropout(model)
    reference = dpo.Reference(model=copy.deepcopy(model).eval().requires_grad_(False))
    indices = list(range(len(pairs)))
    return model, lambda: dpo.batch_loss(model, pairs, indices, reference, cfg, packed, tokenizer.pad_token_id)[0]


@pytest.fixture(scope="module")
def ppo_rollout(one_thread, tiny_lm):
    """One scored rollout (it is data: both models are then measured on the same samples)."""
    cfg = ppo.Config(model=tiny_lm, prompts="unused", reward="unused", output="unused")
    tokenizer, model, reference = ppo.build_models(cfg)
    torch.manual_seed(0)
    batch = rollout(model, reference, tokenizer, ["Say hi.", "Name a colour."],
                    SamplingParams(strategy="sample", max_new_tokens=8, n=2))
    return score(batch, lambda prompts, completions: [float(len(c)) for c in completions])


def _ppo(cfg, batch):
    tokenizer, model, reference = ppo.build_models(cfg)
    shaped = ppo.shape_rewards(batch, cfg, cfg.kl_coef)
    advantages, returns = ppo.compute_advantages(batch, shaped, cfg)
    # the mode ppo.update trains in (dropout is off in every module either way)
    model.train(cfg.gradient_checkpointing)
    if cfg.value_model != "head":  # a fresh critic's zero head would give its trunk no gradient
        torch.nn.init.normal_(model.critic.head.weight, std=0.1)
    return model, lambda: ppo.minibatch_loss(model, batch, advantages, returns, cfg, cfg.kl_coef)[0]


CASES = ["sft", "sft-lora", "rm", "dpo-packed", "dpo-padded", "ppo", "ppo-critic"]


def _build(case: str, checkpointing: bool, tiny_lm, sft_toy, pairs_train, ppo_rollout, tmp_path):
    torch.manual_seed(0)  # the same LoRA initialisation for both builds
    common = dict(model=tiny_lm, output=str(tmp_path), gradient_checkpointing=checkpointing, seed=0)
    if case.startswith("sft"):
        return _sft(sft.Config(data=sft_toy, lora_r=4 if case == "sft-lora" else 0, **common), sft_toy)
    if case == "rm":
        return _rm(rm.Config(data=pairs_train, **common), pairs_train)
    if case.startswith("dpo"):
        return _dpo(dpo.Config(data=pairs_train, **common), pairs_train, packed=case == "dpo-packed")
    value_model = tiny_lm if case == "ppo-critic" else "head"
    cfg = ppo.Config(model=tiny_lm, prompts=sft_toy, reward="unused", output=str(tmp_path), value_model=value_model,
                     gradient_checkpointing=checkpointing, kl_coef=0.1)
    return _ppo(cfg, ppo_rollout)


@pytest.mark.parametrize("case", CASES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(case, tiny_lm, sft_toy, pairs_train, ppo_rollout,
                                                                  tmp_path):
    results = {}
    for checkpointing in (False, True):
        model, loss_fn = _build(case, checkpointing, tiny_lm, sft_toy, pairs_train, ppo_rollout, tmp_path)
        calls = _mlp_calls(model)
        loss = loss_fn()
        forward_calls = calls[0]
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[checkpointing] = (float(loss.detach()), grads, forward_calls, calls[0])

    (loss, grads, fwd, total), (loss_ckpt, grads_ckpt, fwd_ckpt, total_ckpt) = results[False], results[True]
    # checkpointing engaged: each layer ran once forward and once more in the backward
    assert fwd_ckpt == fwd > 0
    assert total == fwd and total_ckpt == 2 * fwd
    assert loss_ckpt == pytest.approx(loss, abs=1e-5)
    assert sorted(grads_ckpt) == sorted(grads)
    assert any(float(g.abs().max()) > 0 for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
