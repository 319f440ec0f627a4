"""Our DPO losses equal TRL's DPOTrainer on the same tiny model, reference and batch.

Runs when trl is importable (a dev dependency). The whole dataset is one batch, so the mean loss
does not depend on the order TRL's sampler draws the pairs in. The reference is a *different*
tiny model, so the log-ratios are not zero and the comparison is not trivially log 2.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from rlhfkit.data.schema import PreferenceExample  # noqa: E402
from rlhfkit.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from rlhfkit.models.packed import completion_logps  # noqa: E402
from rlhfkit.models.tiny import make_tiny_causal_lm  # noqa: E402
from rlhfkit.recipes import dpo  # noqa: E402

CONVERSATIONS = [
    ("Say something nice.", "You are wonderful.", "Go away."),
    ("How are you?", "Great, thanks for asking!", "Bad."),
    ("Name a colour", "blue", "no idea at all, sorry"),
    ("Count to three", "one two three", "four"),
]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    return make_tiny_causal_lm(root / "policy", seed=0), make_tiny_causal_lm(root / "ref", seed=1)


def trl_loss(policy_path, ref_path, loss_type, beta, label_smoothing, out):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_list([{"prompt": user(p), "chosen": assistant(c), "rejected": assistant(r)}
                                 for p, c, r in CONVERSATIONS])
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=len(CONVERSATIONS), beta=beta,
                     loss_type=[loss_type], label_smoothing=label_smoothing, max_length=512, report_to="none",
                     use_cpu=True, bf16=False, precompute_ref_log_probs=False, gradient_checkpointing=False,
                     disable_dropout=True, save_strategy="no", logging_steps=1, seed=0)
    tokenizer = load_tokenizer(policy_path)
    trainer = DPOTrainer(model=load_causal_lm(policy_path), ref_model=load_causal_lm(ref_path), args=args,
                         train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), metrics


def our_loss(policy_path, ref_path, loss_type, beta, label_smoothing):
    cfg = dpo.Config(data="-", output="-", loss=loss_type, beta=beta, label_smoothing=label_smoothing)
    tokenizer = load_tokenizer(policy_path)
    pairs = [dpo.encode_pair(tokenizer, PreferenceExample(user(p), assistant(c), assistant(r)), 512)
             for p, c, r in CONVERSATIONS]
    groups = [p.group for p in pairs]
    policy = completion_logps(load_causal_lm(policy_path), groups)
    with torch.no_grad():
        ref = completion_logps(load_causal_lm(ref_path), groups)
    losses, chosen_rewards, rejected_rewards = dpo.preference_losses(
        cfg, policy.logps.view(-1, 2), ref.logps.view(-1, 2), policy.lengths.view(-1, 2))
    stats = dpo.pair_stats(policy.logps.view(-1, 2), chosen_rewards, rejected_rewards)
    return float(losses.mean()), {k: float(v) / len(pairs) for k, v in stats.items()}


@pytest.mark.parametrize("loss_type, label_smoothing", [
    ("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1), ("apo_zero", 0.0), ("bco_pair", 0.0),
])
def test_loss_and_metrics_equal_trl(models, tmp_path, loss_type, label_smoothing):
    policy_path, ref_path = models
    beta = 0.3
    theirs, their_metrics = trl_loss(policy_path, ref_path, loss_type, beta, label_smoothing, tmp_path)
    ours, our_metrics = our_loss(policy_path, ref_path, loss_type, beta, label_smoothing)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert abs(ours - 0.6931) > 1e-3 or loss_type != "sigmoid"  # a real comparison, not log 2 twice
    for key in dpo.METRIC_KEYS:
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=1e-4, abs=1e-5), key
