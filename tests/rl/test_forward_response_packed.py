"""The update's and the rollout's forward on one packed row equals the padded batch.

``forward_response`` packs the rows of a batch (consecutive rows with the same prompt share it,
no padding) for a Llama-family model: log-probs, values, entropy and the gradients of a PPO
minibatch loss are those of the padded forward, for rows with prompts of different lengths,
groups of mixed sizes, a response that is EOS then padding, a LoRA policy and its reference
(adapters disabled), and a separate critic.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlhfkit.models.loading import apply_lora, load_policy
from rlhfkit.recipes.ppo import Config, minibatch_loss
from rlhfkit.rl import rollout as rollout_module
from rlhfkit.rl.rollout import (
    Rollout,
    critic_values,
    forward_response,
    reference_logprobs,
    response_groups,
    response_mask,
)
from rlhfkit.rl.value import ActorCritic, ValueHead, load_critic

R = 10
# (prompt, response length, ends with EOS): prompt 0 three times, then 1 alone, 2 twice, 0 again (apart from
# its siblings, as in a shuffled minibatch); the third row is EOS then padding
ROWS = [(0, 5, True), (0, R, False), (0, 1, True), (1, 7, True), (2, 3, True), (2, R, False), (0, 4, True)]
PROMPTS = [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23], [31, 32, 33, 34, 35]]


def _batch(tokenizer, seed: int = 0) -> Rollout:
    """A hand-made record over ROWS (left-padded prompts, right-padded responses), with
    "old" log-probs and values to be filled in by the caller."""
    g = torch.Generator().manual_seed(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(len(p) for p in PROMPTS)
    prompt_ids = torch.full((len(ROWS), width), pad)
    response_ids = torch.full((len(ROWS), R), pad)
    for i, (p, length, ends) in enumerate(ROWS):
        prompt_ids[i, width - len(PROMPTS[p]):] = torch.tensor(PROMPTS[p])
        tokens = torch.randint(40, 120, (length,), generator=g)
        if ends:
            tokens[-1] = eos
        response_ids[i, :length] = tokens
    prompt_mask = torch.arange(width) >= width - torch.tensor([len(PROMPTS[p]) for p, _, _ in ROWS])[:, None]
    mask, has_eos = response_mask(response_ids, eos)
    zeros = torch.zeros(len(ROWS), R)
    return Rollout(prompts=tuple(str(p) for p, _, _ in ROWS), completions=("",) * len(ROWS), prompt_ids=prompt_ids,
                   prompt_mask=prompt_mask, response_ids=response_ids, response_mask=mask, logprobs=zeros,
                   ref_logprobs=zeros, values=zeros, entropy=zeros, has_eos=has_eos,
                   group=torch.tensor([p for p, _, _ in ROWS]), scores=torch.zeros(len(ROWS)))


def _args(batch: Rollout):
    return batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask


@pytest.fixture(scope="module")
def policy_and_tokenizer(tiny_lm):
    return load_policy(tiny_lm)


def _with_value_head(policy) -> ActorCritic:
    head = ValueHead(policy.config.hidden_size)
    torch.manual_seed(1)
    torch.nn.init.normal_(head.summary.weight, std=0.5)
    torch.nn.init.normal_(head.summary.bias, std=0.5)
    return ActorCritic(copy.deepcopy(policy), head).eval()


def test_the_hand_made_batch_has_what_the_tests_claim(policy_and_tokenizer):
    _, tokenizer = policy_and_tokenizer
    batch = _batch(tokenizer)
    assert batch.lengths.tolist() == [length for _, length, _ in ROWS]
    assert batch.has_eos.tolist() == [ends for _, _, ends in ROWS]
    assert batch.response_ids[2, 0] == tokenizer.eos_token_id and not batch.response_mask[2, 1:].any()
    groups, order = response_groups(*_args(batch)[:3], batch.lengths)
    # the last row's prompt is the first rows': it joins their group
    assert [len(g.completions) for g in groups] == [4, 1, 2] and order == [0, 1, 2, 6, 3, 4, 5]
    assert [g.prompt for g in groups] == PROMPTS
    assert [c for g in groups for c in g.completions] == [batch.response_ids[i, :batch.lengths[i]].tolist()
                                                          for i in order]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_logprobs_values_and_entropy_equal_the_padded_forward(policy_and_tokenizer, temperature):
    policy, tokenizer = policy_and_tokenizer
    model = _with_value_head(policy)
    batch = _batch(tokenizer)
    assert rollout_module._packable(model, batch.prompt_mask, batch.response_mask, True)
    with torch.no_grad():
        packed = forward_response(model, *_args(batch), temperature, with_entropy=True)
        padded = forward_response(model, *_args(batch), temperature, with_entropy=True, packed=False)
    real = batch.response_mask
    for name in ("logprobs", "values", "entropy"):
        a, b = getattr(packed, name), getattr(padded, name)
        assert a.shape == b.shape == (len(ROWS), R) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
        assert (a[~real] == 0).all() and (a[real] != 0).all(), name
    assert (packed.logprobs[real] < 0).all()


def test_ppo_minibatch_loss_and_gradients_equal_the_padded_forward(policy_and_tokenizer, monkeypatch):
    """minibatch_loss (policy clip, value clip, KL in the loss) on the packed row: the same loss and
    the same gradients for every policy weight and the value head as on the padded batch."""
    policy, tokenizer = policy_and_tokenizer
    model = _with_value_head(policy)
    batch = _batch(tokenizer)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        now = forward_response(model, *_args(batch), 0.9, packed=False)

    def near(x):  # old numbers near the current ones, so that some ratios clip and some do not
        return torch.where(batch.response_mask, x + 0.3 * torch.randn(x.shape, generator=g), 0.0)

    batch = Rollout(**{**batch.__dict__, "logprobs": near(now.logprobs), "ref_logprobs": near(now.logprobs),
                       "values": near(now.values)})
    advantages, returns = torch.randn(len(ROWS), R, generator=g), torch.randn(len(ROWS), R, generator=g)
    cfg = Config(prompts="x", output="y", reward="f.py:f", temperature=0.9, kl_in="loss", kl_estimator="k3")

    def loss_and_grads(packed: bool):
        monkeypatch.setattr(rollout_module, "_packable", lambda *args: packed)
        model.zero_grad()
        loss, stats = minibatch_loss(model, batch, advantages, returns, cfg, kl_coef=0.1)
        loss.backward()
        return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss, stats, grads), (loss_padded, stats_padded, grads_padded) = loss_and_grads(True), loss_and_grads(False)
    torch.testing.assert_close(loss, loss_padded, atol=1e-5, rtol=1e-6)
    assert 0 < float(stats["pg_clipfrac"]) < float(stats["tokens"])  # some tokens clip, some do not
    for k in stats:
        torch.testing.assert_close(stats[k], stats_padded[k], atol=1e-5, rtol=1e-6)
    assert sorted(grads) == sorted(grads_padded) and "value_head.summary.weight" in grads
    assert "policy.lm_head.weight" in grads or "policy.model.embed_tokens.weight" in grads
    for name, grad in grads.items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(grad, grads_padded[name], atol=1e-5, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_lora_policy_and_its_reference_with_adapters_disabled(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    frozen = copy.deepcopy(policy)
    torch.manual_seed(0)
    lora = apply_lora(copy.deepcopy(policy), r=4, alpha=8)
    for name, p in lora.named_parameters():  # move the adapters away from their zero init
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model = ActorCritic(lora).eval()
    batch = _batch(tokenizer, seed=1)
    with torch.no_grad():
        packed = forward_response(model, *_args(batch), 0.8, with_values=False)
        padded = forward_response(model, *_args(batch), 0.8, with_values=False, packed=False)
        reference = reference_logprobs(model, None, *_args(batch), 0.8)
        base = forward_response(ActorCritic(frozen), *_args(batch), 0.8, with_values=False, packed=False)
    torch.testing.assert_close(packed.logprobs, padded.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference, base.logprobs, atol=1e-5, rtol=0)
    assert (packed.logprobs - reference).abs().max() > 1e-3  # the adapters are active outside the context


def test_separate_critic_values(tiny_lm, policy_and_tokenizer, monkeypatch):
    policy, tokenizer = policy_and_tokenizer
    critic = load_critic(tiny_lm, tokenizer)
    torch.manual_seed(2)
    torch.nn.init.normal_(critic.head.weight, std=0.5)
    model = ActorCritic(copy.deepcopy(policy), critic=critic).eval()
    batch = _batch(tokenizer, seed=2)
    packed = forward_response(model, *_args(batch))
    padded = forward_response(model, *_args(batch), packed=False)
    torch.testing.assert_close(packed.values, padded.values, atol=1e-5, rtol=0)
    assert (packed.values[batch.response_mask] != 0).all() and (packed.values[~batch.response_mask] == 0).all()
    (packed.values.sum() + packed.logprobs.sum()).backward()
    assert critic.head.weight.grad.abs().max() > 0 and model.policy.lm_head.weight.grad.abs().max() > 0
    # the rollout's own critic pass (critic_values) packs the same way
    torch.testing.assert_close(critic_values(critic, *_args(batch)), padded.values, atol=1e-5, rtol=0)
    monkeypatch.setattr(rollout_module, "_rows_pack", lambda *args: False)
    torch.testing.assert_close(critic_values(critic, *_args(batch)), padded.values, atol=1e-5, rtol=0)


def test_a_mask_that_is_not_a_prefix_takes_the_padded_path(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    model = _with_value_head(policy)
    batch = _batch(tokenizer)
    holed = batch.response_mask.clone()
    holed[1, 3] = False
    assert rollout_module._packable(model, batch.prompt_mask, batch.response_mask, True)
    assert not rollout_module._packable(model, batch.prompt_mask, holed, True)
