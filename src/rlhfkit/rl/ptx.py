"""PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2): demonstrations mixed into every PPO update.

    objective(φ) = E_{(x,y)~π_φ} [ r(x,y) − β·log(π_φ(y|x) / π_SFT(y|x)) ] + γ·E_{x~D} [ log π_φ(x) ]

As a loss, each optimizer step of the update adds γ × the SFT loss of a batch of demonstrations:
the token mean of −log π_φ over their completion tokens, read by ``rlhfkit sft``'s loader,
tokenised by its encoder under the length policy, and computed by its loss
(:func:`rlhfkit.recipes.sft.batch_loss`, the one per-token log-prob primitive underneath). The
paper mixes in pretraining text; here any data in the SFT schema (typically the SFT
demonstrations the policy was tuned on) keeps the policy's skills. Which demonstrations a step
draws is a pure function of the seed, the iteration and the process: a resumed run draws what
the uninterrupted one drew.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.data.chat import Encoded


@dataclass(frozen=True)
class PtxData:
    """The encoded demonstrations, the demonstrations drawn per optimizer step and γ."""

    rows: list[Encoded]
    pad_id: int
    batch_size: int
    coef: float

    def generator(self, seed: int, iteration: int, process_index: int = 0) -> torch.Generator:
        """The draws of one iteration on one process (its own stream: the PPO minibatch order,
        seeded from the same iteration, is untouched)."""
        return torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 100_003 + 7919 * process_index + 1)

    def draw(self, generator: torch.Generator) -> list[Encoded]:
        """The demonstrations of one optimizer step: ``batch_size`` distinct ones (all when fewer)."""
        order = torch.randperm(len(self.rows), generator=generator)[:self.batch_size]
        return [self.rows[i] for i in order.tolist()]


def load_ptx_data(path: str, tokenizer, cfg, run=None, batch_size: int = 1, coef: float = 0.0) -> PtxData:
    """``path`` read and tokenised as ``rlhfkit sft`` reads and tokenises --data (``cfg``'s
    --max-length, --truncation, --data-config, --seed)."""
    from rlhfkit.data.schema import load_sft
    from rlhfkit.recipes.sft import encode_examples

    rows = encode_examples(tokenizer, load_sft(path, config=cfg.data_config, seed=cfg.seed), cfg, run, source=path)
    return PtxData(rows, tokenizer.pad_token_id, batch_size, coef)


def ptx_loss_sum(policy, demos: list[Encoded], pad_id: int) -> torch.Tensor:
    """The summed SFT loss −Σ log π(completion tokens) of ``demos`` (the sft recipe's loss)."""
    from rlhfkit.data.collate import collate
    from rlhfkit.recipes.sft import batch_loss

    return batch_loss(policy, collate([[e] for e in demos], pad_id))[0]


def demo_tokens(demos: list[Encoded]) -> int:
    """The tokens that carry the SFT loss (:func:`rlhfkit.recipes.sft.trained_tokens`)."""
    from rlhfkit.recipes.sft import trained_tokens

    return trained_tokens([[e] for e in demos])
