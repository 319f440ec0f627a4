"""Every model a command builds is on the command's device, in the requested dtype.

Each command runs through the real CLI with ``--dtype bfloat16`` while the loaders, the recipes'
model builders and ``Accelerator.prepare`` are wrapped to record every model they return. Then
every floating-point parameter and buffer of every recorded model must be bfloat16 (except the
LoRA adapters, float32 by design, and the rotary frequency tables that transformers keeps in
float32) and on the expected device. On a CPU-only machine "on the CPU" holds trivially, so the
device is also checked where it is decided: a training command must hand its accelerator's
device to every loader (under ``accelerate launch`` each rank has its own GPU, and the loaders'
default, :func:`rlhfkit.models.loading.default_device`, would put them all on the first), and no
code path may move a model with ``.cpu()`` or ``.to("cpu")``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from core_helpers import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

FLOAT32_BY_DESIGN = ("inv_freq", "original_inv_freq")  # rotary tables: transformers keeps them in float32


class Recorder:
    def __init__(self):
        self.models: list[tuple[str, torch.nn.Module]] = []
        self.loader_devices: list[tuple[str, object]] = []
        self.accelerators: list = []

    def add(self, what: str, model) -> None:
        if isinstance(model, torch.nn.Module):
            self.models.append((what, model))


@pytest.fixture
def recorder(monkeypatch):
    import accelerate

    import rlhfkit.models.loading as loading
    import rlhfkit.models.reward as reward
    import rlhfkit.recipes.dpo as dpo
    import rlhfkit.recipes.ppo as ppo
    import rlhfkit.rl.value as value
    import rlhfkit.training as training

    rec = Recorder()

    def wrap_loader(module, name: str, device_position: int):
        original = getattr(module, name)

        def load(*args, **kwargs):
            device = kwargs.get("device", args[device_position] if len(args) > device_position else None)
            rec.loader_devices.append((name, device))
            model = original(*args, **kwargs)
            rec.add(name, model)
            return model

        monkeypatch.setattr(module, name, load)

    wrap_loader(loading, "load_causal_lm", 2)        # (name, dtype, device, bits)
    wrap_loader(reward, "load_reward_backbone", 3)   # (name, tokenizer, dtype, device, bits)
    wrap_loader(value, "load_critic", 3)             # (name, tokenizer, dtype, device, ...)

    build_models, build_reference = ppo.build_models, dpo.build_reference

    def ppo_models(*args, **kwargs):
        tokenizer, model, reference = build_models(*args, **kwargs)
        rec.add("ppo model", model)
        rec.add("ppo reference", reference)
        return tokenizer, model, reference

    def dpo_reference(*args, **kwargs):
        ref = build_reference(*args, **kwargs)
        rec.add("dpo reference", ref.model)
        return ref

    monkeypatch.setattr(ppo, "build_models", ppo_models)
    monkeypatch.setattr(dpo, "build_reference", dpo_reference)

    make_accelerator = training.make_accelerator

    def accelerator(*args, **kwargs):
        acc = make_accelerator(*args, **kwargs)
        rec.accelerators.append(acc)
        return acc

    monkeypatch.setattr(training, "make_accelerator", accelerator)
    prepare = accelerate.Accelerator.prepare

    def prepared(self, *args, **kwargs):
        out = prepare(self, *args, **kwargs)
        for obj in out if isinstance(out, tuple) else (out,):
            rec.add("accelerator.prepare", obj)
        return out

    monkeypatch.setattr(accelerate.Accelerator, "prepare", prepared)

    def no_cpu(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__}.cpu() called: models stay on the command's device")

    module_to = torch.nn.Module.to

    def checked_to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, str) and target.startswith("cpu"):
            raise AssertionError(f"{type(self).__name__}.to({target!r}) called: models stay on the command's device")
        return module_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "cpu", no_cpu)
    monkeypatch.setattr(torch.nn.Module, "to", checked_to)
    return rec


def misplaced(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> list[str]:
    """Every parameter or buffer of ``model`` that is not on ``device`` or not in ``dtype``."""
    bad = []
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.device != device:
            bad.append(f"{name} on {tensor.device}")
        if tensor.is_floating_point():
            by_design = "lora_" in name or name.rsplit(".", 1)[-1] in FLOAT32_BY_DESIGN
            expected = torch.float32 if by_design else dtype
            if tensor.dtype != expected:
                bad.append(f"{name} is {tensor.dtype}")
    return bad


def assert_placed(rec: Recorder, expected_models: set[str]) -> None:
    from rlhfkit.models.loading import default_device

    assert {what for what, _ in rec.models} >= expected_models
    device = rec.accelerators[0].device if rec.accelerators else default_device()
    if rec.accelerators:  # a training command hands its accelerator's device to every loader
        assert len({str(a.device) for a in rec.accelerators}) == 1
        assert [(name, d) for name, d in rec.loader_devices if d != device] == []
    else:
        assert all(d is None or d == device for _, d in rec.loader_devices), rec.loader_devices
    for what, model in rec.models:
        bad = misplaced(model, torch.bfloat16, device)
        assert not bad, f"{what} ({type(model).__name__}): {bad[:5]}"


# ------------------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def inputs(one_thread, tiny_lm, tmp_path_factory):
    """A trained (float32) tiny reward model, prompts, pairs and a one-iteration PPO run."""
    from rlhfkit.cli import main

    root = tmp_path_factory.mktemp("placement")
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": f"q {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                               for i in range(4)])
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"say something {i}"} for i in range(4)])
    rm_dir = root / "rm"
    assert main(["rm", "--model", tiny_lm, "--data", pairs, "--output", str(rm_dir), "--max-steps", "1",
                 "--batch-size", "2", "--no-progress"]) == 0
    ppo_run = root / "ppo"
    assert main(["ppo", "--model", tiny_lm, "--reward", str(rm_dir), "--prompts", prompts, "--output", str(ppo_run),
                 "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"]) == 0
    return {"pairs": pairs, "prompts": prompts, "rm": str(rm_dir), "ppo_run": str(ppo_run), "root": root}


TRAIN = ["--max-steps", "1", "--batch-size", "2", "--no-progress", "--dtype", "bfloat16"]

COMMANDS = {
    # id: (argv with {lm}, {rm}, {pairs}, {prompts}, {sft}, {ppo_run}, {out}; models that must be recorded)
    "sft": (["sft", "--model", "{lm}", "--data", "{sft}", *TRAIN],
            {"load_causal_lm", "accelerator.prepare"}),
    "sft-lora": (["sft", "--model", "{lm}", "--data", "{sft}", "--lora-r", "4", *TRAIN],
                 {"load_causal_lm", "accelerator.prepare"}),
    "rm": (["rm", "--model", "{lm}", "--data", "{pairs}", *TRAIN],
           {"load_reward_backbone", "accelerator.prepare"}),
    "dpo": (["dpo", "--model", "{lm}", "--data", "{pairs}", "--ref-model", "{lm}", "--no-precompute-ref", *TRAIN],
            {"load_causal_lm", "dpo reference", "accelerator.prepare"}),
    "dpo-copy": (["dpo", "--model", "{lm}", "--data", "{pairs}", "--no-precompute-ref", *TRAIN],
                 {"load_causal_lm", "dpo reference", "accelerator.prepare"}),
    "ppo": (["ppo", "--model", "{lm}", "--reward", "{rm}", "--prompts", "{prompts}", "--max-new-tokens", "4",
             *TRAIN], {"load_causal_lm", "load_reward_backbone", "ppo model", "ppo reference"}),
    "ppo-critic": (["ppo", "--model", "{lm}", "--reward", "{rm}", "--prompts", "{prompts}", "--value-model", "{lm}",
                    "--max-new-tokens", "4", *TRAIN], {"load_critic", "ppo model", "ppo reference"}),
    "rejection-sampling": (["rejection-sampling", "--model", "{lm}", "--reward", "{rm}", "--prompts", "{prompts}",
                            "--samples-per-prompt", "2", "--max-new-tokens", "4", *TRAIN],
                           {"load_causal_lm", "load_reward_backbone", "accelerator.prepare"}),
    "generate": (["generate", "--model", "{lm}", "--prompts", "{prompts}", "--reward", "{rm}", "--max-new-tokens",
                  "4", "--dtype", "bfloat16"], {"load_causal_lm", "load_reward_backbone"}),
    "eval-rm": (["eval-rm", "--reward", "{rm}", "--data", "{pairs}", "--dtype", "bfloat16"],
                {"load_reward_backbone"}),
    "eval-rm-implicit": (["eval-rm", "--model", "{lm}", "--ref-model", "{lm}", "--data", "{pairs}",
                          "--dtype", "bfloat16"], {"load_causal_lm"}),
    "eval-frontier": (["eval-frontier", "--run", "{ppo_run}", "--limit", "2", "--max-new-tokens", "4",
                       "--dtype", "bfloat16"], {"load_causal_lm", "load_reward_backbone"}),
    "judge": (["judge", "--model", "{lm}", "--judge-model", "{lm}", "--limit", "1", "--max-new-tokens", "4",
               "--judge-max-new-tokens", "4", "--dtype", "bfloat16"], {"load_causal_lm"}),
}
NEEDS_OUTPUT = {"sft", "sft-lora", "rm", "dpo", "dpo-copy", "ppo", "ppo-critic", "rejection-sampling", "generate",
                "judge"}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_model_of_a_command_is_on_its_device_in_the_requested_dtype(command, recorder, run_cli, inputs, tiny_lm,
                                                                          sft_toy, tmp_path):
    template, expected = COMMANDS[command]
    values = {"lm": tiny_lm, "rm": inputs["rm"], "pairs": inputs["pairs"], "prompts": inputs["prompts"],
              "sft": sft_toy, "ppo_run": inputs["ppo_run"]}
    argv = [a.format(**values) for a in template]
    if command in NEEDS_OUTPUT:
        argv += ["--output", str(tmp_path / ("out.jsonl" if command == "generate" else "out"))]
    if command == "eval-frontier":
        argv += ["--output", str(tmp_path / "frontier")]
    result = run_cli(*argv)
    assert result.code == 0, result.err[-3000:]
    assert_placed(recorder, expected)


def test_the_serve_engine_model_is_on_the_default_device_in_the_requested_dtype(recorder, tiny_lm):
    from rlhfkit.serve.server import start_background

    with start_background(tiny_lm, dtype="bfloat16", served_model_name="tiny") as handle:
        assert handle.engine.model is recorder.models[0][1]
    assert_placed(recorder, {"load_causal_lm"})


def test_a_training_command_gives_its_loaders_the_accelerator_device(recorder, monkeypatch, run_cli, tiny_lm, sft_toy,
                                                                     tmp_path):
    """The check above can fail: a loader called without the accelerator's device is caught even on one CPU."""
    import rlhfkit.recipes.sft as sft

    build_model = sft.build_model
    monkeypatch.setattr(sft, "build_model", lambda cfg, device=None, *a: build_model(cfg))
    result = run_cli("sft", "--model", tiny_lm, "--data", sft_toy, "--output", tmp_path, *TRAIN)
    assert result.code == 0, result.err
    with pytest.raises(AssertionError, match="load_causal_lm"):
        assert_placed(recorder, {"load_causal_lm"})
