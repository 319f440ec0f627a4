"""Scale-out (issue 2 §8): the unchanged training loops under 2 CPU processes (gloo, launched with
``torch.distributed.run``) equal one process with the same global batch."""

from __future__ import annotations

import pytest

from core_helpers import assert_same_params, read_metrics, run_distributed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("command", ["rm", "sft"])
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
