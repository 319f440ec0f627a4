"""The one entry point: ``rlhfkit COMMAND [flags]``.

Each command is a module that defines a ``Config`` dataclass (see :mod:`rlhfkit.config`) and a
``main(cfg) -> int | None`` function. The flags, ``--help`` text and validation come from the
dataclass; modules are imported only when their command runs, so ``rlhfkit --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rlhfkit.errors import InputError
from rlhfkit.models.backends import BackendError

# name -> (module, one-line description). Two-word names are sub-commands of a group.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("rlhfkit.demo", "The embedded end-to-end RLHF pipeline on SmolLM2 (offline, CPU)."),
    "sft": ("rlhfkit.recipes.sft", "Supervised instruction tuning on completion tokens."),
    "rm": ("rlhfkit.recipes.rm", "Train a Bradley-Terry reward model on preference pairs or rankings."),
    "prm": ("rlhfkit.recipes.prm", "Train a process reward model: a verdict on every step of a chain."),
    "inspect-data": ("rlhfkit.data.inspect", "Show one example token by token with the trained tokens marked."),
    "ppo": ("rlhfkit.recipes.ppo", "RL against a reward with a KL penalty: PPO, RLOO or GRPO."),
    "dpo": ("rlhfkit.recipes.dpo", "Direct preference optimisation and its relatives (IPO, SLiC, SimPO, ...)."),
    "kto": ("rlhfkit.recipes.kto", "KTO on unpaired feedback: completions labelled desirable or undesirable."),
    "offline-rl": ("rlhfkit.recipes.offline_rl",
                   "Offline RL from scored completions, no sampling: A-LoL (advantage-based) or AWR."),
    "generate": ("rlhfkit.generation.command", "Decode completions (greedy, beam, sampling) and best-of-N."),
    "self-instruct": ("rlhfkit.synthetic.self_instruct",
                      "Synthetic instructions and responses bootstrapped from seed tasks (Self-Instruct)."),
    "templatize": ("rlhfkit.synthetic.templatize",
                   "FLAN-style instruction records from a labelled dataset (several phrasings per task)."),
    "rejection-sampling": ("rlhfkit.recipes.rejection_sampling",
                           "Rejection-sampling fine-tuning: sample N, keep the best, SFT, repeat."),
    "loop": ("rlhfkit.loop.command", "Iterative RLHF in rounds: sample, label, reward model, optimise, evaluate."),
    "serve": ("rlhfkit.serve.server", "OpenAI-compatible HTTP server over any checkpoint."),
    "eval-rm": ("rlhfkit.evaluation.rm_accuracy", "Reward-model (or DPO implicit reward) agreement accuracy."),
    "judge": ("rlhfkit.evaluation.judge", "LLM-as-judge: single grading, pairwise, win rates, chat-bench."),
    "arena": ("rlhfkit.evaluation.arena", "Elo and Bradley-Terry ratings with bootstrap intervals from battles."),
    "eval-safety": ("rlhfkit.evaluation.safety",
                    "Refusals, harmful compliance and over-refusal on red-team and benign prompts."),
    "eval-bench": ("rlhfkit.evaluation.bench",
                   "lm-evaluation-harness benchmarks (local tasks, Open LLM Leaderboard v1) on a model or endpoint."),
    "eval-frontier": ("rlhfkit.evaluation.frontier", "Reward vs KL over a run's checkpoints (over-optimisation)."),
    "cai-revise": ("rlhfkit.label.cai_revise",
                   "Constitutional AI's supervised phase: critique and revise responses against principles."),
    "ai-label": ("rlhfkit.label.ai_label", "Preference pairs labelled by an AI judge with a constitution (RLAIF)."),
    "label serve": ("rlhfkit.label.commands:serve", "Run the feedback web app (pairs, rankings, live models)."),
    "label add-user": ("rlhfkit.label.commands:add_user", "Add an annotator or admin; prints the token last."),
    "label import": ("rlhfkit.label.commands:import_items", "Import response pairs (or ranking tasks) to be judged."),
    "label export": ("rlhfkit.label.commands:export", "Export judgments as preference pairs and rankings, or battles."),
    "feedback export": ("rlhfkit.serve.feedback:export",
                        "Export `serve --feedback-db` ratings as KTO or SFT records, or the logged prompts."),
}


def _load(target: str):
    """``module`` or ``module:prefix`` -> (Config class, main function)."""
    module_name, _, prefix = target.partition(":")
    module = importlib.import_module(module_name)
    if prefix:
        return getattr(module, f"{_camel(prefix)}Config"), getattr(module, prefix)
    return module.Config, module.main


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfkit",
        description="rlhfkit: instruction tuning, preference data, reward models, PPO/RLOO/GRPO, "
                    "DPO, sampling methods and evaluation in one tool.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (_, description) in COMMANDS.items():
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands", description=f"rlhfkit {group} commands")
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            groups[group].add_parser(leaf, help=description, add_help=False)
        else:
            sub.add_parser(name, help=description, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    rest = argv[1:]
    groups = {n.split(" ", 1)[0] for n in COMMANDS if " " in n}
    if name in groups:
        if not rest or rest[0].startswith("-"):
            parser.parse_args([name, *rest[:1]] if rest else [name, "--help"])
            return 0
        name, rest = f"{name} {rest[0]}", rest[1:]
    if name not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(f"rlhfkit: error: unknown command '{name}' (see rlhfkit --help)", file=sys.stderr)
        return 2
    target, description = COMMANDS[name]
    try:
        from rlhfkit.config import add_config_arguments, build_config

        config_cls, run = _load(target)
        sub = argparse.ArgumentParser(prog=f"rlhfkit {name}", description=description)
        add_config_arguments(sub, config_cls)
        ns = vars(sub.parse_args(rest))
        config_file = ns.pop("__config_file", None)
        cfg = build_config(config_cls, ns, config_file)
        code = run(cfg)
        return int(code or 0)
    except InputError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except BackendError as e:  # an endpoint or model that cannot answer: one line, the outputs so far kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
