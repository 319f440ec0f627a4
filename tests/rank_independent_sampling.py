"""The rlhfkit CLI with sampling that does not depend on which process samples a row.

Each process samples its own prompts with its own random stream, so a 2-process PPO run cannot
draw the samples a 1-process run draws. For the equivalence test (tests/test_distributed.py)
``torch.multinomial`` is replaced, while ``generate`` runs, by an inverse-CDF draw at a fixed
quantile that depends only on the row's index within its prompt's group (row % K, the same on
every process since a process holds whole groups) and on the decoding step. The samples of one
prompt still differ, and the probabilities they are drawn from are the policy's.

    python -m torch.distributed.run ... -m rank_independent_sampling ppo --samples-per-prompt K ...
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
import transformers


@contextmanager
def rank_independent_sampling(samples_per_prompt: int):
    real_multinomial, real_generate = torch.multinomial, transformers.GenerationMixin.generate
    step = [0]

    def multinomial(probs, num_samples=1, replacement=False, *, generator=None, out=None):
        rows = torch.arange(probs.shape[0], device=probs.device, dtype=torch.float64)
        quantile = ((rows % samples_per_prompt) * 0.6180339887 + step[0] * 0.3819660113 + 0.05) % 1.0
        step[0] += 1
        cdf = probs.double().cumsum(-1)
        picked = torch.searchsorted(cdf / cdf[:, -1:], quantile.unsqueeze(1))
        return picked.clamp(max=probs.shape[-1] - 1)

    def generate(self, *args, **kwargs):
        step[0] = 0
        return real_generate(self, *args, **kwargs)

    torch.multinomial, transformers.GenerationMixin.generate = multinomial, generate
    try:
        yield
    finally:
        torch.multinomial, transformers.GenerationMixin.generate = real_multinomial, real_generate


def main(argv: list[str]) -> int:
    from rlhfkit.cli import main as cli_main

    k = int(argv[argv.index("--samples-per-prompt") + 1])
    with rank_independent_sampling(k):
        return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
