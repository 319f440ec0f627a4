"""Shared fixtures: tiny random models (no downloads), small data files, the real CLI in-process.

Sub-folders may add their own conftest.py (e.g. tests/label/); keep this one cheap to import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

# No test downloads anything; fail fast instead of hanging on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))  # core_helpers, for every test folder

from core_helpers import (  # noqa: E402
    PAIRS_EVAL,
    PAIRS_TRAIN,
    RANKINGS,
    SFT_TOY,
    STEPWISE_EVAL,
    STEPWISE_TRAIN,
    write_jsonl,
)


class CliResult(NamedTuple):
    code: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        """The ``error: ...`` lines the CLI printed (one per problem)."""
        return [l for l in self.err.splitlines() if l.startswith("error: ")]


@pytest.fixture
def run_cli(capsys):
    """Run the real CLI in-process: ``run_cli("sft", "--model", m, ...) -> CliResult``."""
    from rlhfkit.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: tiny models are latency-bound, and on 2 shared cores the
    OpenMP barrier of every small op costs far more than the math (10x slower runs under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make every model loader fail loudly; returns the list of attempted loads (must stay empty)."""
    import rlhfkit.models.loading as loading
    import rlhfkit.models.prm as prm
    import rlhfkit.models.reward as reward

    calls: list[str] = []

    def forbidden(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called: a model was loaded before validation finished")
        return fail

    monkeypatch.setattr(loading, "load_causal_lm", forbidden("load_causal_lm"))
    monkeypatch.setattr(reward, "load_reward_backbone", forbidden("load_reward_backbone"))
    monkeypatch.setattr(prm, "load_prm_backbone", forbidden("load_prm_backbone"))
    return calls


# ------------------------------------------------------------------------------------ models


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    """A tiny random Llama with a byte-level tokenizer and a ChatML template (a few k params)."""
    from rlhfkit.models.tiny import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-lm", seed=0)


@pytest.fixture(scope="session")
def tiny_base_lm(tmp_path_factory) -> str:
    """The same tiny Llama without a chat template (a 'base' model: raw text + EOS)."""
    from rlhfkit.models.tiny import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-base", seed=0, chat_template=False)


# ------------------------------------------------------------------------------------ data


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def sft_toy(data_dir) -> str:
    """Four prompt/completion pairs a tiny model can memorise."""
    return write_jsonl(data_dir / "sft_toy.jsonl", SFT_TOY)


@pytest.fixture(scope="session")
def pairs_train(data_dir) -> str:
    return write_jsonl(data_dir / "pairs_train.jsonl", PAIRS_TRAIN)


@pytest.fixture(scope="session")
def pairs_eval(data_dir) -> str:
    return write_jsonl(data_dir / "pairs_eval.jsonl", PAIRS_EVAL)


@pytest.fixture(scope="session")
def rankings(data_dir) -> str:
    return write_jsonl(data_dir / "rankings.jsonl", RANKINGS)


@pytest.fixture(scope="session")
def stepwise_train(data_dir) -> str:
    """Toy step-labelled chains: a step saying "bad" and every later one are wrong (core_helpers)."""
    return write_jsonl(data_dir / "stepwise_train.jsonl", STEPWISE_TRAIN)


@pytest.fixture(scope="session")
def stepwise_eval(data_dir) -> str:
    return write_jsonl(data_dir / "stepwise_eval.jsonl", STEPWISE_EVAL)


@pytest.fixture(scope="session")
def tiny_prm(tiny_lm, stepwise_train, tmp_path_factory) -> str:
    """A process reward model on the tiny Llama, trained on the toy chains: it rejects a "bad" step
    and the steps after it."""
    import torch

    from rlhfkit.cli import main

    out = tmp_path_factory.mktemp("prm") / "model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["prm", "--model", tiny_lm, "--data", stepwise_train, "--output", str(out), "--max-steps", "40",
                     "--batch-size", "8", "--lr", "1e-2", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return str(out)
