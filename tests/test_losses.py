"""Hand-worked checks of every loss in rlhfkit.losses (the arithmetic is in each docstring).

Notation: σ(x) = 1/(1+e^−x), −log σ(x) = log(1 + e^−x), and −log σ(−x) = −log σ(x) + x.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import math
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.losses import (
    DPO_LOSSES,
    KL_ESTIMATORS,
    OFFLINE_LOSSES,
    alol_loss,
    alol_token_loss,
    awr_loss,
    bradley_terry_loss,
    causal_logps,
    dpo_loss,
    entropy_from_logits,
    kl_k1,
    kl_k2,
    kl_k3,
    listwise_loss,
    masked_mean,
    masked_var,
    masked_whiten,
    offline_loss,
    plackett_luce_loss,
    ppo_policy_loss,
    process_reward_loss,
    sft_loss,
    token_logps,
    value_loss,
)

T = torch.tensor


def close(actual, expected, atol=1e-6):
    as64 = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(as64(actual), as64(expected), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------- masking


def test_masked_mean_hand_worked():
    """x = [1, 2, 100], mask = [T, T, F] → (1 + 2)/2 = 1.5; per row (dim=-1) of
    [[1, 2, 100], [4, inf, nan]] with masks [[T,T,F],[T,F,F]] → [1.5, 4]; empty mask → 0."""
    close(masked_mean(T([1.0, 2.0, 100.0]), T([True, True, False])), 1.5)
    x = T([[1.0, 2.0, 100.0], [4.0, float("inf"), float("nan")]])
    m = T([[True, True, False], [True, False, False]])
    close(masked_mean(x, m, dim=-1), [1.5, 4.0])
    empty = torch.zeros(3, requires_grad=True)
    out = masked_mean(empty, torch.zeros(3, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.equal(empty.grad, torch.zeros(3))


def test_masked_var_and_whiten_hand_worked():
    """x = [1, 2, 3, 4] (+ a masked 1000): mean 2.5, Σ(x−μ)² = 2.25+0.25+0.25+2.25 = 5,
    biased var 5/4 = 1.25, unbiased 5/3 = 1.666667 (TRL's Bessel correction n/(n−1)).
    whiten: (x − 2.5)/sqrt(5/3) = [−1.161895, −0.387298, 0.387298, 1.161895], masked → 0;
    shift_mean=False adds 2.5 back."""
    x = T([1.0, 2.0, 3.0, 4.0, 1000.0])
    m = T([True, True, True, True, False])
    close(masked_var(x, m, unbiased=False), 1.25)
    close(masked_var(x, m), 5 / 3)
    s = math.sqrt(5 / 3)
    expected = [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0.0]
    close(masked_whiten(x, m), expected, atol=1e-5)
    close(masked_whiten(x, m, shift_mean=False), [e + 2.5 for e in expected[:4]] + [0.0], atol=1e-5)
    with pytest.raises(ValueError):
        masked_var(x, T([True, False, False, False, False]))


# ------------------------------------------------------------------------ token log-probs


def _two_step_logits():
    # position 0: logits [0, 0] → softmax [0.5, 0.5]; position 1: [ln 3, 0] → [0.75, 0.25]
    return T([[[0.0, 0.0], [math.log(3.0), 0.0], [7.0, -7.0]]])


def test_token_logps_hand_worked():
    """Aligned rows (no shift). Row [0, 0] → softmax [0.5, 0.5]: log p(1) = −0.693147. Row [ln 3, 0]
    → [0.75, 0.25]: log p(0) = log 0.75 = −0.287682. At τ = 0.5 the row is [2 ln 3, 0] = [ln 9, 0]
    → [0.9, 0.1]: log p(0) = log 0.9 = −0.105361, log p(1) = log 0.1 = −2.302585."""
    logits = T([[0.0, 0.0], [math.log(3.0), 0.0]])
    close(token_logps(logits, T([1, 0])), [-0.693147, -0.287682])
    close(token_logps(logits[1:], T([0]), temperature=0.5), [-0.105361])
    close(token_logps(logits[None, 1:], T([[1]]), temperature=0.5), [[-2.302585]])  # any leading shape
    with pytest.raises(ValueError, match="token_logps"):
        token_logps(logits, T([1]))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_value_and_one_buffer_gradient(temperature, monkeypatch):
    """Random logits: equal to log_softmax(logits / τ).gather(...), gradients included (float64
    gradcheck of the custom backward); chunking the rows changes nothing."""
    import rlhfkit.losses as losses

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.randint(0, 50, (2, 7), generator=g)
    expected = torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
    got = token_logps(logits, targets, temperature)
    torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(lambda x: token_logps(x, targets, temperature), (logits,))
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 120)  # 2 rows per chunk
    with torch.no_grad():
        assert torch.equal(token_logps(logits, targets, temperature), got.detach())


def test_token_logps_half_precision_keeps_float32_normaliser():
    """bf16 logits: the log-probs (float32) and the gradient (bf16) agree with the float32 ones
    to bf16 precision."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 40, generator=g) * 4
    targets = torch.randint(0, 40, (9,), generator=g)
    full = logits.clone().requires_grad_(True)
    half = logits.bfloat16().requires_grad_(True)
    a, b = token_logps(full, targets, 0.8), token_logps(half, targets, 0.8)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=0.1, rtol=0.02)
    a.sum().backward()
    b.sum().backward()
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad.float(), full.grad, atol=0.02, rtol=0.02)


def test_causal_logps_hand_worked():
    """labels [9, 1, 0] (label 0 is never predicted: no logit precedes it).
    logp[1] = log softmax([0, 0])[1] = log 0.5 = −0.693147;
    logp[2] = log softmax([ln 3, 0])[0] = log 0.75 = −0.287682; the last logit row is unused.
    sequence log-prob = −0.980829. With labels [9, −100, 0] only position 2 counts."""
    logps, mask = causal_logps(_two_step_logits(), T([[9, 1, 0]]).clamp(max=1))
    close(logps, [[0.0, -0.693147, -0.287682]])
    assert mask.tolist() == [[False, True, True]]
    close(causal_logps(_two_step_logits(), T([[0, 1, 0]]))[0].sum(-1), [-0.980829])
    logps, mask = causal_logps(_two_step_logits(), T([[0, -100, 0]]))
    close(logps, [[0.0, 0.0, -0.287682]])
    assert mask.tolist() == [[False, False, True]]


def test_causal_logps_matches_log_softmax_and_bf16():
    """Random logits: equal to log_softmax(...).gather(...) on shifted positions; bf16 logits
    agree with the float32 result to bf16 precision (normaliser computed in float32)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[1, 4:] = -100
    logps, mask = causal_logps(logits, labels)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = torch.where(labels[:, 1:] != -100, ref, 0.0)
    torch.testing.assert_close(logps[:, 1:], ref)
    leaf = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(causal_logps(leaf, labels)[0].sum(), leaf)
    leaf_ref = logits.clone().requires_grad_(True)
    ref_sum = torch.log_softmax(leaf_ref[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (grad_ref,) = torch.autograd.grad(torch.where(labels[:, 1:] != -100, ref_sum, 0.0).sum(), leaf_ref)
    torch.testing.assert_close(grad, grad_ref)
    assert (logps[:, 0] == 0).all() and not mask[:, 0].any()
    assert mask[:, 1:].tolist() == (labels[:, 1:] != -100).tolist()
    bf16_logps, _ = causal_logps(logits.bfloat16(), labels)
    torch.testing.assert_close(bf16_logps, logps, atol=0.1, rtol=0.02)


def test_sft_loss_hand_worked_and_cross_entropy():
    """Same logits as above, labels [0, 1, 0]: sum = 0.693147 + 0.287682 = 0.980829 over 2
    tokens, mean 0.490415. Random inputs: equal to F.cross_entropy on the shifted logits."""
    loss, n = sft_loss(_two_step_logits(), T([[0, 1, 0]]), reduction="sum")
    close(loss, 0.980829)
    assert n.item() == 2
    loss, n = sft_loss(_two_step_logits(), T([[0, 1, 0]]))
    close(loss, 0.490415)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :3] = -100
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(sft_loss(logits, labels)[0], expected)
    zero, n = sft_loss(logits, torch.full_like(labels, -100))
    assert zero.item() == 0.0 and n.item() == 0


def test_entropy_hand_worked():
    """H(softmax([0, 0])) = ln 2 = 0.693147; H([0.75, 0.25]) = 0.75·0.287682 + 0.25·1.386294
    = 0.562335; a near one-hot row ≈ 0. Random: equal to −Σ p log p."""
    close(entropy_from_logits(_two_step_logits())[0, :2], [0.693147, 0.562335])
    logits = torch.randn(4, 3, 9)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=5), -(p * p.log()).sum(-1))


# ------------------------------------------------------------------- reward-model losses


def test_bradley_terry_hand_worked():
    """r_c − r_r = 1 → −log σ(1) = log(1 + e^−1) = 0.313262;
    with margin m = 1 → −log σ(0) = ln 2 = 0.693147; r_c − r_r = −2 → log(1 + e²) = 2.126928."""
    close(bradley_terry_loss(T([1.0, 0.0]), T([0.0, 2.0])), [0.313262, 2.126928])
    close(bradley_terry_loss(T([1.0]), T([0.0]), margin=T([1.0])), [0.693147])


def test_listwise_hand_worked():
    """r = [1, 0, −1]: log Σ e^r = log(e + 1 + e^−1) = log 4.086161 = 1.407606.
    best = 0 → 1.407606 − 1 = 0.407606; best = 2 → 1.407606 + 1 = 2.407606.
    Masking out candidate 2 leaves a pair: −log σ(1 − 0) = 0.313262 (= Bradley–Terry)."""
    r = T([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0]])
    close(listwise_loss(r, T([0, 2])), [0.407606, 2.407606])
    mask = T([[True, True, False]])
    close(listwise_loss(r[:1], T([0]), mask=mask), bradley_terry_loss(T([1.0]), T([0.0])))


def test_plackett_luce_hand_worked():
    """r = [1, 0, −1]. Ranking 0 > 1 > 2: step 1: 0.407606 (as listwise); step 2 over {1, 2}:
    −0 + log(1 + e^−1) = 0.313262; step 3: 0 → 0.720868.
    Ranking 2 > 1 > 0: 2.407606 + (−0 + log(e + 1) = 1.313262) + 0 = 3.720868.
    Only the top one given ([0, −1, −1]) equals listwise_loss: 0.407606."""
    r = T([[1.0, 0.0, -1.0]] * 3)
    ranking = T([[0, 1, 2], [2, 1, 0], [0, -1, -1]])
    close(plackett_luce_loss(r, ranking), [0.720868, 3.720868, 0.407606])
    pair = T([[0.3, -0.4]], requires_grad=True)
    loss = plackett_luce_loss(pair, T([[0, 1]]))
    close(loss, bradley_terry_loss(T([0.3]), T([-0.4])))
    loss.sum().backward()
    assert torch.isfinite(pair.grad).all()



def test_process_reward_loss_hand_worked():
    """Two chains of T = 4 positions, logits (wrong, correct); -100 marks positions without a step.
    Chain 0: a step at t = 1 with z = (0, ln 3), p(correct) = 3/4, label correct → −ln 3/4 = 0.287682;
    a step at t = 3 with z = (0, 0), label wrong → ln 2 = 0.693147; sum 0.980829.
    Chain 1: one step at t = 0 with z = (ln 3, 0), p(correct) = 1/4, label correct → ln 4 = 1.386294.
    Unlabelled positions hold nan/inf logits: selected away, they change nothing.
    ∂L/∂z_correct at chain 0, t = 1 is p − 1 = −1/4."""
    ln3, nan, inf = math.log(3), float("nan"), float("inf")
    logits = T([[[nan, inf], [0.0, ln3], [inf, -inf], [0.0, 0.0]],
                [[ln3, 0.0], [nan, nan], [1.0, 2.0], [0.0, 0.0]]], requires_grad=True)
    labels = T([[-100, 1, -100, 0], [1, -100, -100, -100]])
    loss = process_reward_loss(logits, labels)
    close(loss, [0.980829, 1.386294])
    loss.sum().backward()
    close(logits.grad[0, 1], [0.25, -0.25])
    close(logits.grad[1, 2], [0.0, 0.0])
    # equals torch's cross-entropy summed over the labelled positions
    clean = torch.where(labels.unsqueeze(-1) == -100, torch.zeros(()), logits.detach())
    close(loss.sum(), F.cross_entropy(clean.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))


# ---------------------------------------------------------------------------------- DPO
#
# One pair throughout: log π(y_c) = −10, log π(y_r) = −14, log π_ref(y_c) = −11,
# log π_ref(y_r) = −13, so the chosen log-ratio is +1, the rejected −1, and Δ = 2.

PAIR = dict(
    policy_chosen_logps=T([-10.0]),
    policy_rejected_logps=T([-14.0]),
    ref_chosen_logps=T([-11.0]),
    ref_rejected_logps=T([-13.0]),
)


def test_dpo_sigmoid_hand_worked():
    """β = 0.1, Δ = 2 → βΔ = 0.2: loss = −log σ(0.2) = log(1 + e^−0.2) = 0.598139.
    Rewards β·(±1) = 0.1 and −0.1.
    cDPO, ε = 0.1: 0.9·(−log σ(0.2)) + 0.1·(−log σ(−0.2)) = 0.9·0.598139 + 0.1·0.798139
    = 0.618139 (= −log σ(βΔ) + εβΔ)."""
    losses, rc, rr = dpo_loss(**PAIR, beta=0.1)
    close(losses, [0.598139])
    close(rc, [0.1])
    close(rr, [-0.1])
    close(dpo_loss(**PAIR, beta=0.1, label_smoothing=0.1)[0], [0.618139])


def test_dpo_robust_hand_worked():
    """β = 0.1, ε = 0.1: (0.9·0.598139 − 0.1·0.798139)/(1 − 0.2) = 0.458511/0.8 = 0.573139
    (= −log σ(βΔ) − εβΔ/(1 − 2ε)). ε = 0 is plain DPO; ε ≥ 0.5 is rejected."""
    close(dpo_loss(**PAIR, beta=0.1, loss_type="robust", label_smoothing=0.1)[0], [0.573139])
    close(dpo_loss(**PAIR, beta=0.1, loss_type="robust")[0], [0.598139])
    with pytest.raises(ValueError):
        dpo_loss(**PAIR, beta=0.1, loss_type="robust", label_smoothing=0.5)


def test_dpo_hinge_hand_worked():
    """β = 0.1: relu(1 − 0.2) = 0.8; β = 1: relu(1 − 2) = 0 (margin met, no gradient)."""
    close(dpo_loss(**PAIR, beta=0.1, loss_type="hinge")[0], [0.8])
    close(dpo_loss(**PAIR, beta=1.0, loss_type="hinge")[0], [0.0])


def test_dpo_ipo_hand_worked():
    """|y_c| = 4, |y_r| = 2: Δ_avg = 1/4 − (−1)/2 = 0.75; β = 0.1 → 1/(2β) = 5:
    (0.75 − 5)² = 18.0625. Lengths are required."""
    losses, _, _ = dpo_loss(**PAIR, beta=0.1, loss_type="ipo", chosen_lengths=T([4]), rejected_lengths=T([2]))
    close(losses, [18.0625])
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(**PAIR, beta=0.1, loss_type="ipo")


def test_dpo_simpo_hand_worked():
    """β = 2, γ = 0.5, |y_c| = 4, |y_r| = 7: β·(−10/4) − β·(−14/7) = −5 + 4 = −1;
    −log σ(−1 − 0.5) = log(1 + e^1.5) = 1.701413. Rewards −5 and −4. The reference log-probs
    are ignored (None allowed); missing lengths raise ValueError."""
    kwargs = dict(PAIR, ref_chosen_logps=None, ref_rejected_logps=None)
    losses, rc, rr = dpo_loss(
        **kwargs, beta=2.0, loss_type="simpo", gamma=0.5, chosen_lengths=T([4]), rejected_lengths=T([7])
    )
    close(losses, [1.701413])
    close(rc, [-5.0])
    close(rr, [-4.0])
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(**kwargs, beta=2.0, loss_type="simpo", gamma=0.5)


def test_dpo_apo_zero_and_bco_pair_hand_worked():
    """β = 0.1. APO-zero: (1 − σ(0.1)) + σ(−0.1) = 2σ(−0.1) = 2·0.475021 = 0.950042.
    BCO pair: −log σ(0.1·1) − log σ(−0.1·(−1)) = 2·0.644397 = 1.288793."""
    close(dpo_loss(**PAIR, beta=0.1, loss_type="apo_zero")[0], [0.950042])
    close(dpo_loss(**PAIR, beta=0.1, loss_type="bco_pair")[0], [1.288793])


def test_dpo_dispatch_rejects_unused_hyperparameters_and_unknown_names():
    """label_smoothing only for sigmoid/robust, gamma only for simpo; lengths pass through;
    an unknown loss_type names the known ones; reference-based losses need ref log-probs."""
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(**PAIR, beta=0.1, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="gamma"):
        dpo_loss(**PAIR, beta=0.1, loss_type="sigmoid", gamma=0.5)
    close(dpo_loss(**PAIR, beta=0.1, chosen_lengths=T([3]), rejected_lengths=T([3]))[0], [0.598139])
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(**PAIR, beta=0.1, loss_type="nope")
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(**dict(PAIR, ref_chosen_logps=None), beta=0.1)
    assert {"sigmoid", "robust", "hinge", "ipo", "simpo", "apo_zero", "bco_pair"} <= set(DPO_LOSSES)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_every_dpo_variant_shapes_and_detached_rewards(loss_type):
    """Every registered variant: losses [B] carrying a gradient, rewards [B] detached."""
    pc = torch.randn(3, requires_grad=True)
    extra = {"chosen_lengths": T([2, 3, 4]), "rejected_lengths": T([5, 1, 2])}
    others = torch.randn(3, 3)
    losses, rc, rr = dpo_loss(pc, *others, beta=0.3, loss_type=loss_type, **extra)
    assert losses.shape == rc.shape == rr.shape == (3,)
    assert losses.requires_grad and not rc.requires_grad and not rr.requires_grad
    assert torch.isfinite(losses).all()


def test_dpo_gradient_direction():
    """The sigmoid loss raises the chosen and lowers the rejected log-prob:
    ∂L/∂log π(y_c) = −β σ(−βΔ) < 0 = −0.1·σ(−0.2) = −0.045017, ∂L/∂log π(y_r) = +0.045017."""
    pc, pr = T([-10.0], requires_grad=True), T([-14.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, T([-11.0]), T([-13.0]), beta=0.1)
    losses.sum().backward()
    close(pc.grad, [-0.045017])
    close(pr.grad, [0.045017])


# ----------------------------------------------------------- DPO against TRL's own code
#
# TRL 1.16 computes its losses inside `DPOTrainer._compute_loss`, not in a callable
# function, and importing `trl.trainer.dpo_trainer` costs ~10 s (transformers). We read that
# method from the installed source, compile it alone, and call it with a stand-in trainer and
# model whose per-token log-probs sum to the chosen/rejected log-probs: TRL's own arithmetic,
# without TRL's import cost.


def _trl_method(relative_path: str, class_name: str, method: str):
    """Compile one method of an installed TRL class from its source, without importing TRL."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative_path
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method)
    namespace = {"torch": torch, "F": F, "math": math, "warnings": warnings}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[method]


def _trl_compute_loss():
    return _trl_method("trainer/dpo_trainer.py", "DPOTrainer", "_compute_loss")


def _trl_dpo(loss_type, beta, label_smoothing, pc, pr, rc, rr, len_c, len_r):
    """TRL's (loss, rewards/chosen, rewards/rejected) for one pair."""
    compute = _trl_compute_loss()
    length = max(len_c, len_r) + 1
    completion_mask = torch.zeros(2, length, dtype=torch.long)
    completion_mask[0, 1 : 1 + len_c] = 1
    completion_mask[1, 1 : 1 + len_r] = 1
    log_probs = torch.zeros(2, length - 1)
    log_probs[:, 0] = T([pc, pr])  # TRL sums the per-token log-probs of each row
    outputs = SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
    )
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2, length, dtype=torch.long),
        "attention_mask": torch.ones(2, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": T([rc]),
        "ref_rejected_logps": T([rr]),
    }
    loss = compute(trainer, lambda **kwargs: outputs, inputs, False)
    metrics = trainer._metrics["train"]
    return loss.item(), metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


@pytest.mark.parametrize(
    "loss_type,beta,label_smoothing",
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.0),
        ("robust", 0.1, 0.2),
        ("hinge", 0.3, 0.0),
        ("ipo", 0.1, 0.0),
        ("ipo", 1.0, 0.0),
        ("apo_zero", 0.2, 0.0),
        ("bco_pair", 0.2, 0.0),
    ],
)
def test_dpo_matches_trl(loss_type, beta, label_smoothing):
    """Five random pairs with random completion lengths: loss and implicit rewards equal to
    TRL 1.16's `_compute_loss` for the same loss_type, β and ε."""
    g = torch.Generator().manual_seed(sum(map(ord, loss_type)) + int(100 * beta))
    for _ in range(5):
        pc, pr, rc, rr = (-torch.rand(4, generator=g) * 30).tolist()
        len_c, len_r = torch.randint(1, 9, (2,), generator=g).tolist()
        trl_loss, trl_rc, trl_rr = _trl_dpo(loss_type, beta, label_smoothing, pc, pr, rc, rr, len_c, len_r)
        losses, ours_rc, ours_rr = dpo_loss(
            T([pc]), T([pr]), T([rc]), T([rr]),
            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
            chosen_lengths=T([len_c]), rejected_lengths=T([len_r]),
        )
        close(losses, [trl_loss], atol=1e-5)
        close(ours_rc, [trl_rc], atol=1e-5)
        close(ours_rr, [trl_rr], atol=1e-5)


def test_trl_harness_hand_worked_and_label_smoothing_difference():
    """The stand-in harness reproduces the hand-worked DPO value: β = 0.1, Δ = 2 → 0.598139,
    rewards ±0.1. TRL 1.16's "sigmoid" ignores label_smoothing (still 0.598139 at ε = 0.1),
    where ours is the cDPO form 0.618139 (Mitchell's repo, TRL < 1.0): a documented difference."""
    loss, rc, rr = _trl_dpo("sigmoid", 0.1, 0.0, -10.0, -14.0, -11.0, -13.0, 3, 5)
    close(loss, 0.598139)
    close([rc, rr], [0.1, -0.1])
    close(_trl_dpo("sigmoid", 0.1, 0.1, -10.0, -14.0, -11.0, -13.0, 3, 5)[0], 0.598139)
    close(dpo_loss(**PAIR, beta=0.1, label_smoothing=0.1)[0], [0.618139])


def test_simpo_matches_trl_cpo():
    """SimPO against TRL's `CPOTrainer.cpo_loss(loss_type="simpo")`, which takes the
    length-averaged log-probs: same losses and rewards (β·log π/|y|) for random pairs."""
    cpo_loss = _trl_method("experimental/cpo/cpo_trainer.py", "CPOTrainer", "cpo_loss")
    g = torch.Generator().manual_seed(5)
    pc, pr = -torch.rand(6, generator=g) * 40, -torch.rand(6, generator=g) * 40
    len_c, len_r = torch.randint(1, 20, (6,), generator=g), torch.randint(1, 20, (6,), generator=g)
    for beta, gamma in ((2.0, 0.5), (2.5, 1.4)):
        trainer = SimpleNamespace(
            alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0,
            accelerator=SimpleNamespace(device=torch.device("cpu")),
        )
        expected = cpo_loss(trainer, pc / len_c, pr / len_r)
        ours = dpo_loss(
            pc, pr, None, None, beta=beta, loss_type="simpo", gamma=gamma, chosen_lengths=len_c, rejected_lengths=len_r
        )
        for a, b in zip(ours, expected):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------- PPO


def _ppo_tokens():
    # advantages, ratios: beyond the clip on each side, for both signs of the advantage,
    # plus a fifth, masked-out token with an absurd ratio.
    adv = T([[1.0, 1.0, -1.0, -1.0, 5.0]])
    ratio = T([[1.5, 0.5, 1.5, 0.5, 100.0]])
    old = torch.zeros_like(ratio)
    mask = T([[True, True, True, True, False]])
    return adv, ratio.log(), old, mask


def test_ppo_policy_loss_beyond_clip_hand_worked():
    """ε = 0.2. Per token max(−A·ρ, −A·clip(ρ, 0.8, 1.2)):
    A=+1, ρ=1.5: max(−1.5, −1.2) = −1.2 (clipped: no gradient)
    A=+1, ρ=0.5: max(−0.5, −0.8) = −0.5 (unclipped: gradient −A·ρ = −0.5)
    A=−1, ρ=1.5: max( 1.5,  1.2) =  1.5 (unclipped: gradient −A·ρ = 1.5)
    A=−1, ρ=0.5: max( 0.5,  0.8) =  0.8 (clipped: no gradient)
    mean = (−1.2 − 0.5 + 1.5 + 0.8)/4 = 0.15; clipfrac = 2/4 = 0.5;
    approxkl = ½·mean(log²1.5, log²0.5, log²1.5, log²0.5) = ½·(2·0.164402 + 2·0.480453)/4
    = 0.161214. The masked fifth token changes nothing. Gradient wrt log π = (−A·ρ)/4 on the
    unclipped tokens (dρ/dlog π = ρ), 0 on the clipped ones: [0, −0.5/4, 1.5/4, 0]
    = [0, −0.125, 0.375, 0]."""
    adv, logp, old, mask = _ppo_tokens()
    logp.requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2)
    close(loss, 0.15)
    close(stats["clipfrac"], 0.5)
    close(stats["approxkl"], 0.161214)
    loss.backward()
    close(logp.grad, [[0.0, -0.125, 0.375, 0.0, 0.0]])


def test_ppo_policy_loss_at_clip_boundary():
    """ρ exactly at 1 ± ε: both terms equal, loss = −A·ρ. A=+1, ρ=1.2 → −1.2; A=−1, ρ=0.8 →
    0.8; mean −0.2. Inside the clip (ρ = 1, A = 2) the loss is −2 with gradient −A·ρ = −2."""
    logp = T([[math.log(1.2), math.log(0.8)]])
    everywhere = torch.ones_like(logp, dtype=torch.bool)
    loss, _ = ppo_policy_loss(logp, torch.zeros_like(logp), T([[1.0, -1.0]]), everywhere, 0.2)
    close(loss, -0.2, atol=1e-6)
    inside = torch.zeros(1, 1, requires_grad=True)
    loss, stats = ppo_policy_loss(inside, torch.zeros(1, 1), T([[2.0]]), torch.ones(1, 1, dtype=torch.bool), 0.2)
    loss.backward()
    close(loss, -2.0)
    close(inside.grad, [[-2.0]])
    close(stats["clipfrac"], 0.0)
    close(stats["approxkl"], 0.0)


def test_ppo_sequence_level_advantages_broadcast():
    """Advantages [B, 1] (GRPO/RLOO) broadcast over the tokens: ρ = 1 everywhere, A = [2, −1]
    with 3 and 1 real tokens → per token −A: (−2·3 + 1·1)/4 = −1.25."""
    logp = torch.zeros(2, 3)
    mask = T([[True, True, True], [True, False, False]])
    loss, _ = ppo_policy_loss(logp, logp, T([[2.0], [-1.0]]), mask, 0.2)
    close(loss, -1.25)
    loss, _ = ppo_policy_loss(logp, logp, T([2.0, -1.0]), mask, 0.2)  # [B] works too
    close(loss, -1.25)


def test_value_loss_hand_worked():
    """ε = 0.2, V_old = 0.5, R = 1, V_clip = clip(V, 0.3, 0.7):
    V = 1.0: (1 − 1)² = 0, (0.7 − 1)² = 0.09 → 0.09 (clipped term larger)
    V = 0.6: (0.6 − 1)² = 0.16 both → 0.16
    V = 0.0: (0 − 1)² = 1, (0.3 − 1)² = 0.49 → 1
    loss = ½·(0.09 + 0.16 + 1)/3 = 0.208333; clipfrac = 1/3. A masked fourth token with a
    huge error changes nothing. Gradient at V = 1.0 is 0 (the clipped branch is constant)."""
    values = T([[1.0, 0.6, 0.0, 50.0]], requires_grad=True)
    old = torch.full((1, 4), 0.5)
    returns = torch.ones(1, 4)
    mask = T([[True, True, True, False]])
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    close(loss, 0.208333)
    close(clipfrac, 1 / 3)
    loss.backward()
    # d/dV ½·mean: V=0.6 → (0.6 − 1)/3 = −0.133333; V=0 → (0 − 1)/3 = −0.333333
    close(values.grad, [[0.0, -0.133333, -0.333333, 0.0]])


# ------------------------------------------------------------------------ offline RL (A-LoL, AWR)


def _offline_batch():
    """Three completions, their token log-probs under π and π_ref (padding set to garbage that must
    not leak) and advantages A = [0.5, −0.2, 0]:
    example 0: log π = [−1, −2], log π_ref = [−1 − ln 1.5, −2 − ln 0.5]: per-token ratios 1.5 and 0.5,
               sequence ratio 1.5·0.5 = 0.75; log π(y|x) = −3
    example 1: one token, log π = −0.5 = log π_ref (A < 0)
    example 2: three tokens of −1, ratio 1 (A = 0)"""
    pad = 123.0
    logps = T([[-1.0, -2.0, pad], [-0.5, pad, pad], [-1.0, -1.0, -1.0]], requires_grad=True)
    ref = T([[-1.0 - math.log(1.5), -2.0 - math.log(0.5), -pad], [-0.5, pad, pad], [-1.0, -1.0, -1.0]])
    mask = T([[True, True, False], [True, False, False], [True, True, True]])
    return logps, ref, mask, T([0.5, -0.2, 0.0])


def test_alol_sequence_weight_hand_worked():
    """A-LoL: L = −A⁺·clip(π/π_ref, 1 − ε, 1 + ε)·log π(y|x).
    ε = 0.9: w₀ = clip(0.75, 0.1, 1.9) = 0.75 → L₀ = −0.5·0.75·(−3) = 1.125, not clipped.
    ε = 0.2: w₀ = clip(0.75, 0.8, 1.2) = 0.8 → L₀ = −0.5·0.8·(−3) = 1.2, clipped.
    A ≤ 0 drops examples 1 and 2: loss 0 and no gradient, whatever their ratio.
    ∇ wrt each token log-prob of example 0: −A·w = −0.4 (ε = 0.2); the weight is a constant."""
    logps, ref, mask, adv = _offline_batch()
    losses, stats = alol_loss(logps, ref, mask, adv, clip=0.9)
    close(losses, [1.125, 0.0, 0.0])
    close(stats["importance_weight"], [0.75, 1.0, 1.0])
    close(stats["clipfrac"], [0.0, 0.0, 0.0])
    losses, stats = alol_loss(logps, ref, mask, adv, clip=0.2)
    close(losses, [1.2, 0.0, 0.0])
    close(stats["clipfrac"], [1.0, 0.0, 0.0])
    losses.sum().backward()
    close(logps.grad, [[-0.4, -0.4, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_alol_token_weights_hand_worked():
    """A-LoL seq.: L = −A⁺·Σ_t clip(π_t/π_ref,t, 1 − ε, 1 + ε)·log π_t.
    ε = 0.9: w = [1.5, 0.5] (inside [0.1, 1.9]) → L₀ = −0.5·(1.5·(−1) + 0.5·(−2)) = 1.25.
    ε = 0.2: w = [1.2, 0.8] (both clipped) → L₀ = −0.5·(−1.2 − 1.6) = 1.4, where the sequence
    weight gave 1.2: each token keeps its own weight. ∇ = −A·w_t = [−0.6, −0.4]."""
    logps, ref, mask, adv = _offline_batch()
    losses, stats = alol_token_loss(logps, ref, mask, adv, clip=0.9)
    close(losses, [1.25, 0.0, 0.0])
    close(stats["importance_weight"], [1.0, 1.0, 1.0])  # (1.5 + 0.5)/2; the others are exactly 1
    close(stats["clipfrac"], [0.0, 0.0, 0.0])
    losses, stats = alol_token_loss(logps, ref, mask, adv, clip=0.2)
    close(losses, [1.4, 0.0, 0.0])
    close(stats["clipfrac"], [1.0, 0.0, 0.0])
    losses.sum().backward()
    close(logps.grad, [[-0.6, -0.4, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_alol_at_the_clip_boundary():
    """A ratio at 1 + ε keeps its value (w = 1.2); one above it is clipped to the same weight, and
    one below 1 − ε is raised to 0.8: the weight is clamped, the gradient never cut."""
    logp = T([[0.0]])
    ones = torch.ones(1, 1, dtype=torch.bool)
    _, at = alol_loss(logp, T([[-math.log(1.2)]]), ones, T([1.0]), clip=0.2)
    _, above = alol_loss(logp, T([[-math.log(1.3)]]), ones, T([1.0]), clip=0.2)
    close(at["importance_weight"], [1.2])
    close(above["importance_weight"], [1.2])
    assert above["clipfrac"].item() == 1.0
    logp = torch.zeros(1, 1, requires_grad=True)
    losses, below = alol_loss(logp, T([[-math.log(0.5)]]), ones, T([1.0]), clip=0.2)
    close(below["importance_weight"], [0.8])
    losses.sum().backward()
    close(logp.grad, [[-0.8]])


def test_awr_weights_hand_worked():
    """AWR: L = −min(exp(A/β), w_max)·log π(y|x), β = 0.5, w_max = 20:
    A = 0.5 → e¹ = 2.718282 → L₀ = 2.718282·3 = 8.154845;
    A = −0.2 → e^−0.4 = 0.670320 → L₁ = 0.670320·0.5 = 0.335160 (trains, less);
    A = 0 → 1 → L₂ = 3. With A₂ = 3: e⁶ = 403.4 is clipped to 20 → L₂ = 60."""
    logps, ref, mask, adv = _offline_batch()
    losses, stats = awr_loss(logps, ref, mask, adv, beta=0.5, max_weight=20.0)
    close(losses, [8.154845, 0.335160, 3.0])
    close(stats["awr_weight"], [2.718282, 0.670320, 1.0])
    losses, stats = awr_loss(logps, ref, mask, T([0.5, -0.2, 3.0]), beta=0.5, max_weight=20.0)
    close(losses[2], 60.0)
    close(stats["clipfrac"], [0.0, 0.0, 1.0])


def test_offline_dispatch_and_registry():
    logps, ref, mask, adv = _offline_batch()
    every = {"clip": 0.2, "beta": 0.5, "max_weight": 20.0}
    for name, spec in OFFLINE_LOSSES.items():
        direct = spec.fn(logps, ref, mask, adv, **{k: v for k, v in every.items()
                                                    if k in inspect.signature(spec.fn).parameters})
        close(offline_loss(logps, ref, mask, adv, algo=name, **every)[0], direct[0])
        assert spec.weight_stat in direct[1]
    assert {n for n, s in OFFLINE_LOSSES.items() if s.positive_only} == {"alol", "alol-seq"}
    with pytest.raises(ValueError, match="unknown offline-RL algo 'ppo'"):
        offline_loss(logps, ref, mask, adv, algo="ppo")


# ------------------------------------------------------------------------ KL estimators


def test_kl_estimators_hand_worked():
    """π(x) = 0.5, π_ref(x) = 0.25: k1 = log 2 = 0.693147; k2 = ½·log²2 = 0.240227;
    r = 0.25/0.5 = 0.5: k3 = (0.5 − 1) − log 0.5 = 0.193147."""
    lp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    close(kl_k1(lp, ref), [0.693147])
    close(kl_k2(lp, ref), [0.240227])
    close(kl_k3(lp, ref), [0.193147])
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


P = T([0.5, 0.3, 0.2], dtype=torch.float64)
Q = T([0.2, 0.3, 0.5], dtype=torch.float64)


def test_kl_estimators_expectations_are_exact():
    """Exact expectations under π = [0.5, 0.3, 0.2], π_ref = [0.2, 0.3, 0.5]:
    KL(π‖π_ref) = 0.5·ln 2.5 + 0.3·ln 1 + 0.2·ln 0.4 = 0.3·ln 2.5 = 0.274887;
    E_π[k1] = KL exactly; E_π[k3] = Σ π_ref − 1 + KL = KL exactly; E_π[k2] ≠ KL (biased)."""
    kl = (P * (P / Q).log()).sum()
    close(kl, 0.274887)
    close((P * kl_k1(P.log(), Q.log())).sum(), kl, atol=1e-12)
    close((P * kl_k3(P.log(), Q.log())).sum(), kl, atol=1e-12)
    assert abs((P * kl_k2(P.log(), Q.log())).sum() - kl) > 1e-3


def test_kl_estimators_sampled_unbiased_and_k3_nonnegative():
    """200 000 tokens sampled from π (seed 0): the sample means of k1 and k3 are within 5
    standard errors of the exact KL 0.274887, and k3's variance is below k1's; k2 and k3 are
    never negative, here and on random log-prob pairs."""
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(P, 200_000, replacement=True, generator=g)
    logp, ref = P.log()[x], Q.log()[x]
    kl = (P * (P / Q).log()).sum()
    for est in (kl_k1, kl_k3):
        samples = est(logp, ref)
        se = samples.std() / math.sqrt(samples.numel())
        assert abs(samples.mean() - kl) < 5 * se, est.__name__
    assert kl_k3(logp, ref).var() < kl_k1(logp, ref).var()
    a, b = torch.randn(10_000, generator=g) * 5, torch.randn(10_000, generator=g) * 5
    assert (kl_k3(a, b) >= 0).all() and (kl_k2(a, b) >= 0).all()
    assert (kl_k1(a, b) < 0).any()
