"""configs/accelerate/*.yaml: each is read by accelerate's own config loader and accepted by
``accelerate launch``'s argument checks, with no key that accelerate does not know."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

from core_helpers import REPO

CONFIGS = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP,
           "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED}


def test_exactly_these_configs_ship():
    assert sorted(p.stem for p in (REPO / "configs" / "accelerate").glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_loads_with_accelerates_loader_and_passes_launch_checks(name):
    path = str(REPO / "configs" / "accelerate" / f"{name}.yaml")
    config = load_config_from_file(path)  # raises on an unknown top-level key
    assert config.distributed_type == CONFIGS[name]
    assert config.num_machines == 1 and config.mixed_precision == "no" and not config.use_cpu

    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    nested = {**config.fsdp_config, **config.deepspeed_config}
    assert not sorted(k for k in nested if k not in known), "keys accelerate launch would ignore"
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", path, "-m", "rlhfkit"]))
    assert (args.use_fsdp, args.use_deepspeed, args.multi_gpu) == (name == "fsdp", name.startswith("deepspeed"),
                                                                   name == "ddp")
    if name == "fsdp":
        assert (args.fsdp_version, args.fsdp_state_dict_type) == (2, "FULL_STATE_DICT")
    if name.startswith("deepspeed"):
        assert args.zero_stage == int(name[-1])
        assert args.gradient_accumulation_steps == 1  # DeepSpeed steps on every backward under rlhfkit's loop


def test_deepspeed_is_told_the_micro_batch_that_no_dataloader_gives_it(monkeypatch):
    """accelerate reads DeepSpeed's micro-batch size from a prepared DataLoader and refuses to
    prepare without one; rlhfkit prepares none, so make_accelerator sets it (DeepSpeed is not
    installed here: its plugin is stubbed)."""
    import accelerate

    from rlhfkit.training import make_accelerator

    class Plugin:
        def __init__(self):
            self.deepspeed_config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}

        def is_auto(self, key):
            return self.deepspeed_config.get(key) == "auto"

    plugin = Plugin()

    class FakeAccelerator:
        def __init__(self, **kwargs):
            self.state = type("State", (), {"deepspeed_plugin": plugin})()

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    make_accelerator(micro_batch_size=4)
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 16  # set by the user's own DeepSpeed file: kept
    make_accelerator(micro_batch_size=4)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 16
