"""Our KTO loss and metrics equal TRL 1.16's KTOTrainer on the same tiny model, reference and batch.

Runs when trl is importable (a dev dependency). The whole dataset is one batch, read in order
(TRL's KTO samples sequentially), so TRL's mismatched pairs -- built over chunks of the
dataset -- are the ones our recipe builds inside the micro-batch. The reference is a *different*
tiny model, so the log-ratios and the reference point z_ref are not zero.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from rlhfkit.data.schema import UnpairedExample  # noqa: E402
from rlhfkit.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from rlhfkit.models.packed import completion_logps  # noqa: E402
from rlhfkit.models.tiny import make_tiny_causal_lm  # noqa: E402
from rlhfkit.recipes import kto  # noqa: E402

RECORDS = [
    ("Say something nice.", "You are wonderful.", True),
    ("How are you?", "Bad.", False),
    ("Name a colour", "blue", True),
    ("Count to three", "four five six seven eight", False),
    ("Greet me", "Hello, nice to meet you!", True),
]
METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    # seeds chosen so that the mismatched pairs' mean log-ratio is positive (z_ref is not clamped at 0)
    return make_tiny_causal_lm(root / "policy", seed=1), make_tiny_causal_lm(root / "ref", seed=0)


def trl_loss(policy_path, ref_path, cfg: kto.Config, out):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    dataset = Dataset.from_list([{"prompt": user(p), "completion": assistant(c), "label": label}
                                 for p, c, label in RECORDS])
    args = KTOConfig(output_dir=str(out), per_device_train_batch_size=len(RECORDS), beta=cfg.beta,
                     loss_type=cfg.loss, desirable_weight=cfg.desirable_weight,
                     undesirable_weight=cfg.undesirable_weight, max_length=512, report_to="none", use_cpu=True,
                     bf16=False, precompute_ref_log_probs=False, gradient_checkpointing=False, disable_dropout=True,
                     save_strategy="no", logging_steps=1, seed=0)
    trainer = KTOTrainer(model=load_causal_lm(policy_path), ref_model=load_causal_lm(ref_path), args=args,
                         train_dataset=dataset, processing_class=load_tokenizer(policy_path))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["label"].tolist() == [label for _, _, label in RECORDS]  # in order: one batch, the same pairs
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    return float(loss.detach()), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def our_loss(policy_path, ref_path, cfg: kto.Config):
    tokenizer = load_tokenizer(policy_path)
    examples = kto.encode_examples(tokenizer, [UnpairedExample(user(p), assistant(c), label)
                                               for p, c, label in RECORDS], "records", 512)
    mismatched = cfg.loss == "kto"
    groups = kto.kl_groups(examples, 512, mismatched)
    width = 2 if mismatched else 1
    policy = completion_logps(load_causal_lm(policy_path), groups).logps.view(-1, width)
    with torch.no_grad():
        ref = completion_logps(load_causal_lm(ref_path), groups).logps.view(-1, width)
    desirable = torch.tensor([label for _, _, label in RECORDS])
    losses, rewards, z = kto.example_losses(cfg, policy, ref, desirable)
    stats = {k: float(v) for k, v in kto.example_stats(policy[:, 0], rewards, desirable, z).items()}
    return float(losses.detach().mean()), kto.kto_means(stats)


@pytest.mark.parametrize("loss, desirable_weight, undesirable_weight", [
    ("kto", 1.0, 1.0), ("kto", 1.5, 0.7), ("apo_zero_unpaired", 1.0, 1.3),
])
def test_loss_and_metrics_equal_trl(models, tmp_path, loss, desirable_weight, undesirable_weight):
    policy_path, ref_path = models
    cfg = kto.Config(data="-", output="-", loss=loss, beta=0.3, desirable_weight=desirable_weight,
                     undesirable_weight=undesirable_weight)
    theirs, their_metrics = trl_loss(policy_path, ref_path, cfg, tmp_path)
    ours, our_metrics = our_loss(policy_path, ref_path, cfg)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    if loss == "kto":
        assert our_metrics["kl"] > 1e-3  # a real reference point, not the clamp at 0
    else:
        assert their_metrics["kl"] == our_metrics["kl"] == 0.0
    assert abs(our_metrics["rewards/margins"]) > 1e-3
    for key in METRICS:
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=1e-4, abs=1e-5), key
