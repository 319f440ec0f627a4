"""The rlhfkit CLI with sampling that does not depend on which process samples a row.

Each process samples its own prompts with its own random stream, so a 2-process PPO run cannot
draw the samples a 1-process run draws. For the equivalence test (tests/test_distributed.py)
the decoding loop's draw (``rlhfkit.generation.decoding.draw_tokens``) is replaced by an inverse-CDF draw at a fixed
quantile that depends only on the row's index within its prompt's group (row % K, the same on
every process since a process holds whole groups) and on the decoding step. The samples of one
prompt still differ, and the probabilities they are drawn from are the policy's.

    python -m torch.distributed.run ... -m rank_independent_sampling ppo --samples-per-prompt K ...
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch


@contextmanager
def rank_independent_sampling(samples_per_prompt: int):
    from rlhfkit.generation import decoding

    real_draw, real_loop = decoding.draw_tokens, decoding.decode_loop
    step = [0]

    def draw_tokens(scores):
        probs = torch.softmax(scores.double(), dim=-1)
        rows = torch.arange(probs.shape[0], device=probs.device, dtype=torch.float64)
        quantile = ((rows % samples_per_prompt) * 0.6180339887 + step[0] * 0.3819660113 + 0.05) % 1.0
        step[0] += 1
        cdf = probs.cumsum(-1)
        picked = torch.searchsorted(cdf / cdf[:, -1:], quantile.unsqueeze(1))
        return picked.squeeze(1).clamp(max=probs.shape[-1] - 1)

    def decode_loop(*args, **kwargs):
        step[0] = 0
        return real_loop(*args, **kwargs)

    decoding.draw_tokens, decoding.decode_loop = draw_tokens, decode_loop
    try:
        yield
    finally:
        decoding.draw_tokens, decoding.decode_loop = real_draw, real_loop


def main(argv: list[str]) -> int:
    from rlhfkit.cli import main as cli_main

    k = int(argv[argv.index("--samples-per-prompt") + 1])
    with rank_independent_sampling(k):
        return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
