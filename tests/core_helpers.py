"""Plain helpers shared by the core tests (data sets, parameter comparison, launching processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rlhfkit.data.io import write_jsonl  # noqa: F401  (re-exported: the project's one JSONL writer)

REPO = Path(__file__).resolve().parents[1]

# Four examples a tiny model memorises in a few dozen steps; one in the messages form.
SFT_TOY = [
    {"prompt": "Name a colour.", "completion": "Blue."},
    {"prompt": "Count to three.", "completion": "1, 2, 3."},
    {"prompt": "Say hi.", "completion": "Hi!"},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Yes or no?"},
                  {"role": "assistant", "content": "Yes."}]},
]

# The chosen side always says "good", the rejected side "bad": a tiny reward model learns it.
PAIRS_TRAIN = [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
               for i in range(16)]
PAIRS_EVAL = [{"prompt": f"another question {i}", "chosen": f"good reply {i}", "rejected": f"bad reply {i}"}
              for i in range(8)]

# Rankings of K = 3 completions (best first), the completions listed in a shuffled order.
RANKINGS = [{"prompt": f"rank {i}", "completions": [f"ok {i}", f"bad {i}", f"good {i}"], "ranking": [2, 0, 1]}
            for i in range(6)]



def stepwise_chain(i: int) -> dict:
    """Chain i of the toy stepwise set: 2-4 steps, the step that says "bad" (if any) and every later
    one labelled false (a tiny process reward model learns it)."""
    num_steps = 2 + i % 3
    bad_at = (i // 3) % (num_steps + 1)  # == num_steps: a correct chain
    steps = [f"{'bad' if j == bad_at else 'good'} step {j}" for j in range(num_steps)]
    return {"prompt": f"task {i}", "completions": steps, "labels": [j < bad_at for j in range(num_steps)]}


STEPWISE_TRAIN = [stepwise_chain(i) for i in range(24)]
STEPWISE_EVAL = [stepwise_chain(i) for i in range(24, 36)]


# Reward functions for the tiny model's samples, written to a file and named as file.py:function. Its
# tokenizer is byte-level: `lower` is the fraction of lower-case ASCII letters of a completion (about 0.1
# for the random initial model), `upper` that of upper-case ones, `length` its length in characters.
TOY_REWARDS = '''
def lower(prompts, completions):
    return [sum(ch.islower() and ch.isascii() for ch in c) / max(len(c), 1) for c in completions]

def upper(prompts, completions):
    return [sum(ch.isupper() and ch.isascii() for ch in c) / max(len(c), 1) for c in completions]

def length(prompts, completions):
    return [float(len(c)) for c in completions]
'''


def write_text(path, text: str) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def read_metrics(output) -> list[dict]:
    path = Path(output) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def load_params(folder) -> dict:
    """The saved tensors of a model folder (full model, or the adapter of a LoRA folder)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (folder / name).exists():
            return load_file(folder / name)
    raise AssertionError(f"no safetensors weights in {folder}: {sorted(p.name for p in folder.iterdir())}")


def max_param_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), "the two folders hold different tensors"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_same_params(folder_a, folder_b, atol: float = 1e-6) -> None:
    import torch

    a, b = load_params(folder_a), load_params(folder_b)
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0)]
    assert not bad, f"{len(bad)} tensor(s) differ beyond {atol}, max diff {max_param_diff(a, b):.3g}: {bad[:5]}"


def run_distributed(args: list[str], nproc: int = 2, timeout: int = 420, module: str = "rlhfkit",
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N -m MODULE ARGS`` on CPU (gloo).

    ``module``: ``rlhfkit`` (the CLI) or a module of tests/ that wraps it; ``env``: extra variables.
    """
    path = os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=path, **(env or {}))
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes talking over gloo, like the single-process run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
