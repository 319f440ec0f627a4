"""A frozen reference policy π_ref read once over fixed data, its answers cached in --output.

The offline recipes (``dpo``, ``offline-rl``) read the reference only through numbers of their
fixed training data: log π_ref of each completion (and, for offline RL, the hidden state of each
prompt). They compute them once before training, each process a strided share, and cache them in
--output as ``<name>-<key>.pt``, ``key`` a hash of the tokenised data and of the reference's
identity (resolved path and weight files, dtype, adapters on or off), so a rerun or ``--resume``
reuses them and a change of data or reference recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from rlhfkit.models.packed import Group


def adapters_disabled(model):
    """The context in which a peft model runs as its base model (LoRA adapters off)."""
    inner = getattr(model, "module", model)
    return inner.disable_adapter()


def model_fingerprint(name: str) -> dict:
    """What identifies a model's weights without reading them all: the resolved path and its files' stats."""
    from rlhfkit.models.loading import resolve_model

    path = resolve_model(name)
    info: dict = {"name": name, "path": os.path.abspath(path) if os.path.exists(path) else path}
    if os.path.isdir(path):
        info["files"] = sorted((f, os.path.getsize(os.path.join(path, f)), int(os.path.getmtime(os.path.join(path, f))))
                               for f in os.listdir(path) if f.endswith((".json", ".safetensors", ".bin")))
    return info


def reference_key(identity: dict, splits: dict[str, list[Group]]) -> str:
    """Hash of the reference's ``identity`` (JSON-able) and of every tokenised group of every split."""
    h = hashlib.sha256()
    h.update(json.dumps(identity, sort_keys=True).encode())
    for name, groups in sorted(splits.items()):
        h.update(name.encode())
        for g in groups:
            h.update(json.dumps([g.prompt, g.completions, g.scored]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def precompute_reference(run, model, splits: dict[str, list[Group]], score: Callable[[list[Group]], list], *,
                         name: str, key: str, batch_size: int, adapters_off: bool = False, desc: str = "reference",
                         unit: str = "groups", show_progress: bool = True,
                         finish: Callable[[list], Any] = lambda rows: rows) -> dict[str, Any]:
    """``finish(rows)`` for every split, ``rows`` holding ``score(groups)``'s row of each group in order.

    ``score(chunk) -> list`` (one picklable row per group of the chunk) runs under ``no_grad``,
    with the model in eval mode (and its adapters disabled with ``adapters_off``), ``batch_size``
    groups at a time; each process scores a strided share and the shares are gathered. The result
    is saved as ``<name>-<key>.pt`` in ``run.output`` and read back instead when that file exists.
    Under --bf16 the passes run in the run's bfloat16 autocast, as the policy's do (an fp32 policy
    against a bf16 reference would start with a nonzero log-ratio), and the file is ``<name>-<key>-bf16.pt``.
    """
    from accelerate.utils import gather_object

    from rlhfkit.training import progress

    acc = run.accelerator
    path = run.output / f"{name}-{key}{'-bf16' if run.bf16 else ''}.pt"
    if path.exists():
        run.print(f"{desc}: reusing {path.name}")
        return torch.load(path)
    was_training = model.training
    model.eval()
    t0 = time.time()
    table = {}
    total = sum(len(groups) for groups in splits.values())
    bar = progress(run, total, 0, desc, show_progress)
    with adapters_disabled(model) if adapters_off else nullcontext(), run.autocast():
        for split, groups in splits.items():
            mine = list(range(acc.process_index, len(groups), acc.num_processes))
            rows = []
            for start in range(0, len(mine), batch_size):
                chunk = mine[start:start + batch_size]
                rows += list(zip(chunk, score([groups[i] for i in chunk])))
                bar.update(len(chunk) * acc.num_processes)
            gathered = gather_object(rows) if acc.num_processes > 1 else rows
            ordered = [None] * len(groups)
            for i, row in gathered:
                ordered[i] = row
            table[split] = finish(ordered)
    bar.close()
    model.train(was_training)
    if run.is_main:
        tmp = path.with_suffix(".tmp")
        torch.save(table, tmp)
        os.replace(tmp, path)
    acc.wait_for_everyone()
    run.print(f"{desc}: {total} {unit} in {time.time() - t0:.1f} s, cached as {path.name}")
    return table
