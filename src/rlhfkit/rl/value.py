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
"""

from __future__ import annotations

import torch
from torch import nn

from rlhfkit.errors import InputError


class ValueHead(nn.Module):
    """V(h) = w·h + b on the trunk's final hidden states; starts at V = 0 everywhere."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


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
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                start: int, width: int, with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[B, width, V]`` predicting tokens ``start .. start+width-1``, and their values.

        The trunk runs once; only the ``width`` hidden states that predict the response go
        through ``lm_head`` (no ``[B, T, V]`` tensor over the prompt) and the value head. The
        value of position t is V(state before token t), read at the same hidden state as the
        logits that predict token t. Called through ``forward`` so that DDP sees it.
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
