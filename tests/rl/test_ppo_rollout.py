"""The rollout record and its masks: only real response tokens (through the first EOS) count.

Padding on either side and whatever follows EOS change no log-prob, value, KL, reward or
advantage of a real token; the reference of a LoRA policy is the base model (adapters disabled);
the log-probs of the update's forward pass equal the rollout's (the PPO ratio starts at 1).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rlhfkit.generation.decoding import SamplingParams
from rlhfkit.recipes.ppo import Config, compute_advantages, iteration_metrics, shape_rewards
from rlhfkit.rl.rollout import Rollout, forward_response, reference_logprobs, response_mask, rollout, score
from rlhfkit.rl.value import ActorCritic, ValueHead, load_critic

T = torch.tensor
PROMPTS = ["hello there", "a much longer prompt than the first one, to force left padding", "count: 1 2 3"]


def test_response_mask_stops_after_the_first_eos():
    ids = T([[5, 6, 2, 0, 0], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask, has_eos = response_mask(ids, eos_token_id=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, True, False, True]


def test_response_mask_when_pad_equals_eos_and_a_pad_id_is_sampled():
    # pad == eos: the first EOS is real, the rest is padding
    mask, has_eos = response_mask(T([[5, 0, 0, 0]]), eos_token_id=0)
    assert mask.tolist() == [[1, 1, 0, 0]] and has_eos.tolist() == [True]
    # a sampled pad id (0) before the EOS (2) is a real token; several EOS ids are accepted
    mask, _ = response_mask(T([[5, 0, 7, 3, 9]]), eos_token_id=[2, 3])
    assert mask.tolist() == [[1, 1, 1, 1, 0]]


@pytest.fixture(scope="module")
def models(tiny_lm):
    """A policy with a random (non-zero) value head, and a frozen reference copy."""
    from rlhfkit.models.loading import load_policy

    policy, tokenizer = load_policy(tiny_lm)
    head = ValueHead(policy.config.hidden_size)
    torch.manual_seed(1)
    torch.nn.init.normal_(head.summary.weight, std=0.5)
    model = ActorCritic(policy, head).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    return model, reference, tokenizer


@pytest.fixture(scope="module")
def batch(models) -> Rollout:
    model, reference, tokenizer = models
    torch.manual_seed(0)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, n=2)
    out = rollout(model, reference, tokenizer, PROMPTS, params)
    return score(out, lambda prompts, completions: [float(len(c)) for c in completions])


def test_rollout_record_shapes_and_masks(batch, models):
    _, _, tokenizer = models
    n, r = batch.response_ids.shape
    assert n == 6 and r <= 12
    assert batch.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.prompts == tuple(p for p in PROMPTS for _ in range(2))
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        value = getattr(batch, name)
        assert value.shape == (n, r)
        assert (value[~batch.response_mask] == 0).all(), name  # nothing off the mask
    assert (batch.logprobs[batch.response_mask] < 0).all()
    assert (batch.values[batch.response_mask] != 0).any()
    # policy == reference: the KL is exactly 0 on every token
    torch.testing.assert_close(batch.logprobs, batch.ref_logprobs)
    # the mask is what response_mask computes; EOS rows end on EOS
    mask, has_eos = response_mask(batch.response_ids, tokenizer.eos_token_id)
    assert torch.equal(mask, batch.response_mask) and torch.equal(has_eos, batch.has_eos)
    last = batch.lengths - 1
    ends = batch.response_ids[torch.arange(n), last]
    assert ((ends == tokenizer.eos_token_id) == batch.has_eos).all()
    assert batch.scores.tolist() == [float(len(c)) for c in batch.completions]
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.scores = None


def test_logprobs_and_values_from_generation_equal_a_fresh_forward_pass(batch, models):
    """The rollout reads the policy's log-probs, entropy and value-head values off ``generate``'s
    logits and hidden states; ``recompute=True`` runs a separate pass: same samples, same numbers."""
    model, reference, tokenizer = models
    torch.manual_seed(0)
    again = rollout(model, reference, tokenizer, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.9, n=2),
                    recompute=True)
    assert torch.equal(again.response_ids, batch.response_ids)
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        torch.testing.assert_close(getattr(again, name), getattr(batch, name), atol=1e-5, rtol=0)


def _padded(batch: Rollout, tokenizer, left: int = 3, right: int = 4) -> Rollout:
    """The same samples with extra left padding on the prompts, extra columns after the
    responses, and every non-real response position overwritten with random token ids."""
    g = torch.Generator().manual_seed(7)
    n = batch.num_samples
    pad = tokenizer.pad_token_id
    prompt_ids = torch.cat([torch.full((n, left), pad), batch.prompt_ids], dim=1)
    prompt_mask = torch.cat([torch.zeros(n, left, dtype=torch.bool), batch.prompt_mask], dim=1)
    noise = torch.randint(3, 200, (n, batch.response_ids.shape[1] + right), generator=g)
    mask = torch.cat([batch.response_mask, torch.zeros(n, right, dtype=torch.bool)], dim=1)
    response_ids = torch.where(mask, torch.cat([batch.response_ids, noise[:, -right:]], dim=1), noise)
    garbage = lambda x: torch.cat([torch.where(batch.response_mask, x, torch.full_like(x, float("nan"))),  # noqa: E731
                                   torch.full((n, right), float("inf"))], dim=1)
    return dataclasses.replace(batch, prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                               response_mask=mask, logprobs=garbage(batch.logprobs),
                               ref_logprobs=garbage(batch.ref_logprobs), values=garbage(batch.values),
                               entropy=garbage(batch.entropy))


def test_padding_and_post_eos_tokens_change_no_logprob_or_value(batch, models):
    model, reference, tokenizer = models
    padded = _padded(batch, tokenizer)
    r = batch.response_ids.shape[1]
    with torch.no_grad():
        a = forward_response(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
                             0.9, with_entropy=True)
        b = forward_response(model, padded.prompt_ids, padded.prompt_mask, padded.response_ids,
                             padded.response_mask, 0.9, with_entropy=True)
        ref_b = reference_logprobs(model, reference, padded.prompt_ids, padded.prompt_mask, padded.response_ids,
                                   padded.response_mask, 0.9)
    for x, y in ((a.logprobs, b.logprobs), (a.values, b.values), (a.entropy, b.entropy)):
        torch.testing.assert_close(y[:, :r], x, atol=1e-5, rtol=0)
        assert (y[:, r:] == 0).all() and (y[~padded.response_mask] == 0).all()
    # the rollout's own numbers (computed on the whole batch) agree too
    torch.testing.assert_close(a.logprobs, batch.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_b[:, :r], batch.ref_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("algo,kl_in,estimator", [("ppo", "reward", "k1"), ("ppo", "loss", "k3"),
                                                  ("rloo", "reward", "k2"), ("grpo", "loss", "k3")])
def test_padding_changes_no_reward_advantage_or_kl(batch, models, algo, kl_in, estimator):
    """Shaping, advantages and the logged KL read only the real tokens: the padded record with
    nan/inf off the mask gives the same numbers, and the KL penalty is spread over exactly the
    real tokens."""
    _, _, tokenizer = models
    # a policy that differs from the reference, so that the KL is not 0
    shift = torch.linspace(-0.3, 0.2, batch.logprobs.numel()).view_as(batch.logprobs)
    moved = dataclasses.replace(batch, logprobs=torch.where(batch.response_mask, batch.logprobs + shift, 0.0))
    padded = _padded(moved, tokenizer)
    r = batch.response_ids.shape[1]
    cfg = Config(prompts="x", output="y", reward="f.py:f", algo=algo, kl_in=kl_in, kl_estimator=estimator,
                 samples_per_prompt=2, whiten_rewards=True, missing_eos_penalty=1.0)
    s_a, s_b = shape_rewards(moved, cfg, 0.1), shape_rewards(padded, cfg, 0.1)
    torch.testing.assert_close(s_b.kl[:, :r], s_a.kl)
    assert (s_b.kl[~padded.response_mask] == 0).all() and (s_a.kl != 0).any()
    torch.testing.assert_close(s_b.token_rewards[:, :r], s_a.token_rewards)
    assert (s_b.token_rewards[~padded.response_mask] == 0).all()
    torch.testing.assert_close(s_b.sequence_rewards, s_a.sequence_rewards)
    adv_a, ret_a = compute_advantages(moved, s_a, cfg)
    adv_b, ret_b = compute_advantages(padded, s_b, cfg)
    if algo == "ppo":
        torch.testing.assert_close(adv_b[:, :r], adv_a)
        torch.testing.assert_close(ret_b[:, :r], ret_a)
        assert (adv_b[~padded.response_mask] == 0).all()
    else:
        torch.testing.assert_close(adv_b, adv_a)
    m_a, m_b = iteration_metrics(moved, s_a, cfg), iteration_metrics(padded, s_b, cfg)
    m_b.pop("objective/entropy"), m_a.pop("objective/entropy")  # entropy is nan-padded above on purpose
    assert m_a == pytest.approx(m_b)
    assert m_a["objective/kl_k3"] >= 0 and m_a["objective/kl"] == m_a[f"objective/kl_{estimator}"]


def test_missing_eos_penalty_and_score_clip(batch):
    cfg = Config(prompts="x", output="y", reward="f.py:f", missing_eos_penalty=2.0, score_clip=5.0, kl_coef=0.0)
    shaped = shape_rewards(batch, cfg, 0.0)
    expected = batch.scores - 2.0 * (~batch.has_eos).float()
    torch.testing.assert_close(shaped.scores, expected.clamp(-5, 5))
    last = batch.lengths - 1
    rows = torch.arange(batch.num_samples)
    torch.testing.assert_close(shaped.token_rewards[rows, last], shaped.scores)


def test_update_forward_matches_rollout_logprobs_on_any_minibatch(batch, models):
    """A minibatch has other padding than the rollout batch; its log-probs (the numerator of
    the PPO ratio before any update) are the rollout's."""
    model, _, _ = models
    mb = batch.select([4, 1])
    out = forward_response(model, mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask, 0.9)
    torch.testing.assert_close(out.logprobs.detach(), mb.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.values.detach(), mb.values, atol=1e-5, rtol=0)
    assert out.logprobs.requires_grad


def test_a_bfloat16_sampler_samples_and_the_policy_measures(models):
    """``rollout(..., sampler=copy)``: the tokens are the bfloat16 copy's samples, the log-probs and
    values the float32 policy's own on them (the ratio of the first update starts at 1)."""
    from rlhfkit.generation.decoding import DecodingCopy, generate_rows

    model, reference, tokenizer = models
    sampler = DecodingCopy(model.policy, "bfloat16").current()
    params = SamplingParams(max_new_tokens=12, temperature=0.9, n=2)
    torch.manual_seed(0)
    batch = rollout(model, reference, tokenizer, PROMPTS, params, sampler=sampler)
    torch.manual_seed(0)
    own = generate_rows(sampler, tokenizer, batch.prompt_ids[::2], batch.prompt_mask[::2], params)  # n = 2 each
    assert torch.equal(batch.response_ids, own.ids)
    out = forward_response(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, 0.9)
    torch.testing.assert_close(out.logprobs.detach(), batch.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.values.detach(), batch.values, atol=1e-5, rtol=0)


def test_lora_reference_is_the_base_model_with_adapters_disabled(tiny_lm):
    from rlhfkit.models.loading import apply_lora, load_policy

    base, tokenizer = load_policy(tiny_lm)
    frozen = copy.deepcopy(base)
    policy = apply_lora(base, r=4, alpha=8)
    for name, p in policy.named_parameters():  # move the adapters away from their zero init
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model = ActorCritic(policy).eval()
    torch.manual_seed(0)
    out = rollout(model, None, tokenizer, PROMPTS, SamplingParams(max_new_tokens=8))
    with torch.no_grad():
        expected = reference_logprobs(model, frozen, out.prompt_ids, out.prompt_mask, out.response_ids,
                                      out.response_mask)
    torch.testing.assert_close(out.ref_logprobs, expected, atol=1e-5, rtol=0)
    assert (out.logprobs - out.ref_logprobs).abs().max() > 1e-3  # the adapters are active outside
    with pytest.raises(ValueError, match="reference"):
        reference_logprobs(ActorCritic(frozen), None, out.prompt_ids, out.prompt_mask, out.response_ids,
                           out.response_mask)


def test_separate_critic_from_a_causal_lm(tiny_lm, models):
    _, _, tokenizer = models
    from rlhfkit.models.loading import load_policy

    policy, _ = load_policy(tiny_lm)
    critic = load_critic(tiny_lm, tokenizer)
    model = ActorCritic(policy, critic=critic).eval()
    torch.manual_seed(0)
    out = rollout(model, copy.deepcopy(policy), tokenizer, PROMPTS[:2], SamplingParams(max_new_tokens=6))
    assert out.values is not None and (out.values == 0).all()  # a fresh critic head starts at V = 0
    assert set(n.split(".")[0] for n, _ in model.named_parameters()) == {"policy", "critic"}
