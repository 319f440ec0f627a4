"""Scale-out (issue 2 §8, issue 11 item 10): the unchanged training loops under 2 CPU processes
(gloo, launched with ``torch.distributed.run``) equal one process with the same global batch:
sft, rm, dpo and RLOO; and FSDP on CPU, where accelerate supports it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core_helpers import REPO, assert_same_params, read_metrics, run_distributed, write_jsonl, write_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("command", ["rm", "sft", "dpo"])
def test_two_processes_equal_one_with_the_same_global_batch(command, run_cli, tiny_lm, sft_toy, pairs_train,
                                                            tmp_path):
    data = sft_toy if command == "sft" else pairs_train
    common = [command, "--model", tiny_lm, "--data", data, "--eval-data", data, "--max-steps", "3",
              "--save-steps", "2", "--lr", "2e-2", "--no-progress"]
    single, double = tmp_path / "one", tmp_path / "two"

    result = run_cli(*common, "--batch-size", "4", "--output", single)
    assert result.code == 0, result.err
    launched = run_distributed([*common, "--batch-size", "2", "--output", double], nproc=2)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]

    # each rank wrote its own RNG state into the checkpoint, and the save completed on both
    files = {p.name for p in (double / "checkpoint-2").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= files
    assert not list(double.glob(".tmp-*"))

    assert_same_params(single, double, atol=1e-5)
    one, two = read_metrics(single), read_metrics(double)
    assert [r["step"] for r in two] == [1, 2, 3]  # one writer: the main process
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], abs=1e-12)  # one schedule step per step
        assert b["epoch"] == pytest.approx(a["epoch"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    evals = [k for k in one[-1] if k.startswith("eval/")]
    # perplexity is exp(loss), so it is compared relatively
    assert evals and ({k: two[-1][k] for k in evals}
                      == pytest.approx({k: one[-1][k] for k in evals}, rel=1e-5, abs=1e-5))
    if command == "dpo":  # the reference log-probs were computed in shares and gathered
        for key in ("rewards/chosen", "rewards/margins", "logps/rejected"):
            assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-5)


REWARD = """
def lower(prompts, completions):
    return [sum(ch.islower() for ch in c) / max(len(c), 1) for c in completions]
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rloo_with_two_processes_equals_one_with_the_same_global_batch(run_cli, tiny_lm, tmp_path):
    """Each process samples its own prompts from its own random stream, so the samples are made
    rank-independent for the test (tests/rank_independent_sampling.py); what is compared is the
    rest: group baselines, the token normalisation over both processes, the gradient reduction."""
    from rank_independent_sampling import rank_independent_sampling

    reward = write_text(tmp_path / "reward.py", REWARD)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say something {i}"} for i in range(8)])
    common = ["ppo", "--algo", "rloo", "--model", tiny_lm, "--reward", f"{reward}:lower", "--prompts", prompts,
              "--samples-per-prompt", "2", "--max-new-tokens", "6", "--max-steps", "2", "--ppo-epochs", "2",
              "--lr", "1e-2", "--sample-every", "0", "--no-progress"]
    single, double = tmp_path / "one", tmp_path / "two"

    with rank_independent_sampling(2):
        result = run_cli(*common, "--batch-size", "4", "--output", single)
    assert result.code == 0, result.err
    launched = run_distributed([*common, "--batch-size", "2", "--output", double], nproc=2,
                               module="rank_independent_sampling")
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]

    assert_same_params(single, double, atol=1e-5)
    one, two = read_metrics(single), read_metrics(double)
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["learning_rate"] == pytest.approx(a["learning_rate"], abs=1e-12)


# ------------------------------------------------------------------------------------ FSDP


def fsdp_environment() -> dict[str, str]:
    """The variables ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "configs/accelerate/fsdp.yaml"),
                                               "-m", "rlhfkit"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


PROBE = "from accelerate import Accelerator; print('distributed_type', Accelerator(cpu=True).distributed_type.value)"
FSDP_ON_CPU_UNSUPPORTED = (
    "accelerate {version} applies an FSDP config only to GPU-type process groups (AcceleratorState: MULTI_GPU, "
    "MULTI_NPU, MULTI_XPU, ...): with cpu=True the group is MULTI_CPU, the FSDP plugin is ignored and the run "
    "is plain DDP; `accelerate launch --cpu --config_file fsdp.yaml` starts a single process")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp_on_cpu_equals_one_process(run_cli, tiny_lm, sft_toy, tmp_path):
    import accelerate

    env = fsdp_environment()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    probe = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
         sys.executable, "-c", PROBE], env={**os.environ, **env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    observed = sorted({line.split()[1] for line in probe.stdout.splitlines() if line.startswith("distributed_type")})
    if observed != ["FSDP"]:
        pytest.skip(FSDP_ON_CPU_UNSUPPORTED.format(version=accelerate.__version__) + f" (observed: {observed})")
    # Reached once accelerate shards on CPU: the same equivalence as DDP above.
    common = ["sft", "--model", tiny_lm, "--data", sft_toy, "--max-steps", "2", "--lr", "2e-2", "--no-progress"]
    single, double = tmp_path / "one", tmp_path / "two"
    assert run_cli(*common, "--batch-size", "4", "--output", single).code == 0
    launched = run_distributed([*common, "--batch-size", "2", "--output", double], nproc=2, env=env)
    assert launched.returncode == 0, launched.stderr[-5000:]
    assert_same_params(Path(single), Path(double), atol=1e-5)
