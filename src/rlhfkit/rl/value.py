"""The value function of PPO and the one module that the optimizer sees.

Two kinds of value function (``--value-model``):

- ``head``: a linear :class:`ValueHead` on the policy's own trunk. The value of every response
  position is read from the same forward pass that gives the policy's logits (no second
  model, no second pass); the value loss also trains the shared trunk (or its LoRA adapters).
- a path: a separate small :class:`Critic`, the trunk of a decoder model plus a scalar head,
  initialised from a causal LM or from a reward-model folder written by ``rlhfkit rm``
  (its trained ``score`` head included, as TRL initialises the critic from the reward model).
  It reads the policy's token ids, so it must share the policy's tokenizer.

:class:`ActorCritic` holds the policy and the value function in one ``nn.Module`` so that one
optimizer, one ``accelerator.prepare`` and one checkpoint cover all trainable weights.

Offline RL needs the value of the frozen reference instead, fitted once on a fixed data set:
:func:`fit_prompt_values` on :func:`prompt_features`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rlhfkit.errors import InputError
from rlhfkit.losses import entropy_from_logits
from rlhfkit.models.packed import PackedBatch, head_logps, packed_attention


def scalar_head(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` [..., 1] -> [...] in the head's own dtype, outside any autocast: a value is a
    regression output read by the value loss, so --bf16 (bfloat16 autocast) must not round it to
    bfloat16's 8 bits (a value of 3 would move in steps of 1/64); the head is one dot product."""
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.to(head.weight.dtype)).squeeze(-1)


class ValueHead(nn.Module):
    """V(h) = w·h + b on the trunk's final hidden states; starts at V = 0 everywhere."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return scalar_head(self.summary, hidden)


class Critic(nn.Module):
    """A separate value model: a decoder trunk and a scalar head, one value per position."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def hidden(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        return self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return scalar_head(self.head, hidden)

    def packed_values(self, batch: PackedBatch) -> torch.Tensor:
        """Values ``[n]`` read where a packed row's hidden states predict its scored tokens (its own
        trunk over the row, with the packed attention: :mod:`rlhfkit.models.packed`)."""
        device = next(self.parameters()).device
        return self(packed_hidden(self.trunk, self.trunk, batch, device)[batch.predict_at.to(device)])


def packed_hidden(trunk: nn.Module, owner: nn.Module, batch: PackedBatch, device) -> torch.Tensor:
    """The final hidden states ``[T, d]`` of ``trunk`` over a packed row, ``owner``'s config (the
    causal LM or peft model around the trunk, or the trunk itself) selecting the packed attention."""
    with packed_attention(owner):
        return trunk(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                     rlhfkit_layout=batch.layout.to(device), use_cache=False).last_hidden_state[0]


def load_critic(name: str, policy_tokenizer, dtype: str = "float32", device=None,
                gradient_checkpointing: bool = False) -> Critic:
    """A :class:`Critic` from a causal-LM or reward-model folder (or embedded name / hub id), on
    ``device`` (default: :func:`rlhfkit.models.loading.default_device`) in ``dtype``.

    A causal LM gets a fresh zero-initialised head; a reward model keeps its trained head.
    Raises :class:`InputError` when its tokenizer differs from the policy's.
    """
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.models.loading import enable_gradient_checkpointing, load_tokenizer, place, resolve_model, torch_dtype

    tokenizer = load_tokenizer(name)
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise InputError(f"--value-model {name}: its tokenizer differs from the policy's; the critic reads "
                         "the policy's tokens, so it needs the same vocabulary")
    path = resolve_model(name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as e:
        raise InputError(f"--value-model {name}: cannot load it ({str(e).splitlines()[0]})") from None
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear) or not hasattr(model, "base_model"):
        raise InputError(f"--value-model {name}: expected a decoder model (a trunk with a `score` head), "
                         f"got {type(model).__name__}")
    from rlhfkit.models.reward import is_reward_model_dir

    if not is_reward_model_dir(path):  # a causal LM: the new head starts at V = 0
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = place(model, device)
    return Critic(model.base_model, head)


class ActorCritic(nn.Module):
    """The policy (a causal LM, possibly a peft model) and its value function, if any.

    ``value_head`` (on the policy trunk) and ``critic`` (a separate model) are exclusive;
    both None for the critic-free algorithms (RLOO, GRPO).
    """

    def __init__(self, policy: nn.Module, value_head: ValueHead | None = None, critic: Critic | None = None):
        super().__init__()
        if value_head is not None and critic is not None:
            raise ValueError("ActorCritic: give a value head or a critic, not both")
        self.policy = policy
        self.value_head = value_head
        self.critic = critic

    @property
    def has_values(self) -> bool:
        return self.value_head is not None or self.critic is not None

    @property
    def is_peft(self) -> bool:
        return hasattr(self.policy, "disable_adapter") and hasattr(self.policy, "get_base_model")

    def causal_lm(self) -> nn.Module:
        """The transformers causal LM inside the policy (peft's LoRA layers stay injected)."""
        return self.policy.get_base_model() if self.is_peft else self.policy

    def trunk(self) -> nn.Module:
        return self.causal_lm().get_decoder()

    def lm_head(self) -> nn.Module:
        return self.causal_lm().get_output_embeddings()

    def forward(self, *args, packed: PackedBatch | None = None, **kwargs):
        """:meth:`forward_packed` when ``packed`` is given, else :meth:`forward_padded` (both
        reached through ``forward``, so that DDP sees the call)."""
        if packed is not None:
            return self.forward_packed(packed, **kwargs)
        return self.forward_padded(*args, **kwargs)

    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       start: int, width: int, with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, width, V]`` predicting tokens ``start .. start+width-1``, and their values.

        The trunk runs once; only the ``width`` hidden states that predict the response go
        through ``lm_head`` (no ``[B, T, V]`` tensor over the prompt) and the value head. The
        value of position t is V(state before token t), read at the same hidden state as the
        logits that predict token t.
        """
        hidden = self.trunk()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
        window = slice(start - 1, start - 1 + width)
        predicting = hidden[:, window]
        logits = self.lm_head()(predicting)
        values = None
        if with_values and self.value_head is not None:
            values = self.value_head(predicting)
        elif with_values and self.critic is not None:
            values = self.critic(self.critic.hidden(input_ids, attention_mask, position_ids)[:, window])
        return logits, values

    def forward_packed(self, batch: PackedBatch, temperature: float = 1.0, with_values: bool = True,
                       with_entropy: bool = False) -> PackedOutput:
        """Log-probs at temperature τ (and values, entropy) of the scored tokens of a packed row
        (:mod:`rlhfkit.models.packed`: each prompt once, no padding), in ``batch.targets`` order.

        The trunk runs with the packed attention; the hidden states at ``batch.predict_at`` (those
        that predict a scored token) go through the LM head fused with the log-softmax
        (:func:`~rlhfkit.models.packed.head_logps`: no logits kept) and the value head. A
        separate critic's trunk runs on the same packed row. The entropy (no gradient) needs the
        logits at those positions: they are computed for it alone.
        """
        device = next(self.parameters()).device
        hidden = packed_hidden(self.trunk(), self.causal_lm(), batch, device)[batch.predict_at.to(device)]
        logps = head_logps(self.lm_head(), hidden, batch.targets.to(device), temperature)
        values = entropy = None
        if with_values and self.value_head is not None:
            values = self.value_head(hidden)
        elif with_values and self.critic is not None:
            values = self.critic.packed_values(batch)
        if with_entropy:  # a second head pass: the log-probs must come from the update's fused path (under
            with torch.no_grad():  # autocast the unfused head rounds differently: PPO's first ratio moves 1e-3)
                entropy = entropy_from_logits(self.lm_head()(hidden).float() / temperature)
        return PackedOutput(logps, values, entropy)


class PackedOutput(NamedTuple):
    """What :meth:`ActorCritic.forward_packed` returns: one entry per scored token (packed order)."""

    logps: torch.Tensor                 # [n] log π(token) at temperature τ
    values: torch.Tensor | None         # [n] V(state before the token)
    entropy: torch.Tensor | None        # [n] entropy of π's next-token distribution at τ (no gradient)


# --------------------------------------------------------------------------------------------
# The value of a frozen policy from a fixed data set (offline RL)
# --------------------------------------------------------------------------------------------

# Ridge strengths tried, as multiples of the mean eigenvalue of the centred features' Gram matrix;
# inf is the constant mean reward (no head), so the chosen head never does worse than it on held-out prompts.
RIDGE_GRID = (math.inf, 100.0, 10.0, 1.0, 0.1, 0.01, 0.001)


@torch.no_grad()
def prompt_features(model, prompts: list[list[int]]) -> torch.Tensor:
    """The last hidden state (after the final norm) of each prompt's last token: ``[len(prompts), d]``
    float32 on the CPU. ``model``: a causal LM (a peft model too: its adapters as they are now)."""
    from rlhfkit.data.collate import pad_batch

    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts])
    ids, mask = pad_batch(prompts, 0)  # right-padded: the padding is masked, its id does not matter
    decoder = getattr(model, "module", model).get_decoder()
    hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    return hidden[torch.arange(len(prompts), device=device), (lengths - 1).to(device)].float().cpu()


@dataclass
class PromptValues:
    """V_ref(x) = b + (φ(x) − μ_φ)·w, fitted on a data set's rewards (:func:`fit_prompt_values`)."""

    values: torch.Tensor   # [N] each example's value, predicted by a head fitted without its prompt
    mean: torch.Tensor     # [d] μ_φ, the mean training feature
    weight: torch.Tensor   # [d] w (zeros for the constant)
    bias: float            # b, the mean training reward
    mse: float             # mean squared error of ``values`` (held-out prompts)
    var_explained: float   # 1 − mse / Var(r): 0 for the constant, 1 for a perfect head
    ridge: float           # the strength chosen (a multiple of the mean eigenvalue; inf: the constant)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """V for new prompts' features [M, d] (the head fitted on every training prompt): [M] float64."""
        return self.bias + (features.double() - self.mean) @ self.weight


def _ridge(x: torch.Tensor, y: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(μ_x, w, ȳ) of min_w Σ (y − ȳ − (x − μ_x)·w)² + λ‖w‖², λ = strength · tr(XcᵀXc) / d."""
    mean_x, mean_y = x.mean(0), float(y.mean())
    xc = x - mean_x
    d = x.shape[1]
    if math.isinf(strength):
        return mean_x, torch.zeros(d, dtype=x.dtype), mean_y
    lam = strength * float((xc ** 2).sum()) / d + 1e-12
    w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(d, dtype=x.dtype), xc.T @ (y - mean_y))
    return mean_x, w, mean_y


def fit_prompt_values(features: torch.Tensor, prompt_of: list[int], rewards: torch.Tensor, folds: int = 5,
                      seed: int = 0) -> PromptValues:
    """The value V(x) ≈ E[r | x] of the policy that wrote the data: ridge regression of the rewards
    on prompt features, trained by mean squared error, cross-fitted over prompts.

    ``features`` [P, d]: one row per distinct prompt; ``prompt_of[i]``: example i's prompt;
    ``rewards`` [N]. The prompts are dealt into ``folds`` groups (a seeded shuffle); each
    example's value is predicted by the head fitted on the other groups, so it never saw the
    example's prompt nor its reward (with K samples of a prompt an in-sample head would learn
    their mean, reward included; with one sample, the reward itself). The ridge strength is
    the one of :data:`RIDGE_GRID` with the least held-out MSE (the constant mean included); the
    returned head for new prompts is refitted on every prompt with it. Rewards that are all
    equal give V = r exactly (every advantage 0).
    """
    x, y = features.double()[torch.as_tensor(prompt_of)], rewards.double()
    variance = float(y.var(unbiased=False))
    if float(y.max()) == float(y.min()):
        return PromptValues(y.clone(), x.mean(0), torch.zeros(x.shape[1], dtype=x.dtype), float(y[0]), 0.0, 0.0,
                            math.inf)
    num_prompts = features.shape[0]
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed))
    fold_of_prompt = torch.empty(num_prompts, dtype=torch.long)
    fold_of_prompt[order] = torch.arange(num_prompts) % max(1, min(folds, num_prompts))
    fold = fold_of_prompt[torch.as_tensor(prompt_of)]
    best: tuple[float, float, torch.Tensor] | None = None
    for strength in RIDGE_GRID if num_prompts >= 2 else (math.inf,):
        held_out = torch.empty_like(y)
        for f in fold.unique().tolist():
            test = fold == f
            train = ~test if bool((~test).any()) else test  # one prompt: the in-sample mean
            mean_x, w, b = _ridge(x[train], y[train], strength)
            held_out[test] = b + (x[test] - mean_x) @ w
        mse = float(((held_out - y) ** 2).mean())
        if best is None or mse < best[0]:
            best = (mse, strength, held_out)
    mse, strength, values = best
    mean_x, w, b = _ridge(x, y, strength)
    return PromptValues(values, mean_x, w, b, mse, 1.0 - mse / variance, strength)
