"""``rlhfkit eval-frontier``: reward against KL over a run's checkpoints (over-optimisation).

For every saved policy of a PPO run (``policy-N/``), a rejection-sampling run (``round-K/``), an
``rlhfkit loop`` with dpo or ppo rounds (``round-N/policy/``) or
an SFT/DPO run (``checkpoint-N/`` of a full fine-tune), plus the reference itself (step 0) and
the final model: sample responses to held-out prompts, score them with the run's reward (and an
optional second reward or oracle), and estimate KL(π ‖ π_ref) from the same samples. The
picture of Gao et al.: the proxy reward keeps rising with KL while the oracle's turns down.

With ``--x-reward`` and ``--y-reward`` it draws instead the plane of two rewards (say helpfulness
and harmlessness): each checkpoint is a dot at (mean X, mean Y) of its samples, labelled by its
step, the dots joined in step order, as in Constitutional AI's helpfulness-vs-harmlessness figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from rlhfkit.config import DATA_CONFIG_HELP, PROMPTS_HELP, arg, check_data_flag, flag, validated
from rlhfkit.errors import InputError


@dataclass
class Config:
    """Reward (and an optional oracle) against KL to the reference, for every checkpoint of a run."""

    run: str = arg("", "A run folder of rlhfkit ppo, dpo, sft or rejection-sampling.")
    prompts: str = arg("", PROMPTS_HELP + " Drawn with --seed; default: the run's own prompts and --data-config.")
    data_config: str = arg("", DATA_CONFIG_HELP)
    reward: str = arg("", "Reward for the y axis (default: the run's --reward; required for dpo/sft runs).")
    oracle: str = arg("", "An optional second reward or oracle function (e.g. file.py:function).")
    x_reward: str = arg("", "The two-reward plane instead (with --y-reward): the reward of the x axis, a SPEC as "
                        "`rlhfkit ppo --reward` takes; writes plane.json, plane.md, plane.png.")
    y_reward: str = arg("", "The reward of the y axis of the two-reward plane (with --x-reward).")
    ref_model: str = arg("", "The reference policy of the KL (default: the run's initial policy).",
                         aliases=("reference",))
    output: str = arg("", "Output folder (default: RUN/frontier).")
    limit: int = arg(64, "Use at most this many prompts.")
    samples_per_prompt: int = arg(1, "Completions sampled per prompt.", aliases=("n",))
    max_new_tokens: int = arg(48, "Tokens per sampled response.")
    temperature: float = arg(1.0, "Sampling temperature.")
    seed: int = arg(0, "Sampling seed (the same for every checkpoint).")
    dtype: Literal["float32", "bfloat16"] = arg("float32", "Parameter dtype of the policies, the reference and "
                                                "a reward model (on the GPU when there is one).")
    y_bench: str = arg("", "An lm-eval task (built in, or under --include-path) scored on every checkpoint: the "
                       "report then shows the reward against its metric (pip install 'rlhfkit[bench]').")
    include_path: str = arg("", "A folder of lm-eval task YAML files for --y-bench.")
    bench_limit: int = arg(0, "Score at most this many items of --y-bench (0: all).")

    def validate(self) -> list[str]:
        problems = []
        if not self.run:
            problems.append("--run is required")
        elif not (Path(self.run) / "config.yaml").exists():
            problems.append(f"--run {self.run}: not an rlhfkit run folder (no config.yaml)")
        problems += check_data_flag("prompts", self.prompts, required=False)
        for name in ("limit", "samples_per_prompt", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{flag(name)} must be >= 1 (got {getattr(self, name)})")
        if self.temperature <= 0:
            problems.append("--temperature must be > 0")
        if bool(self.x_reward) != bool(self.y_reward) or (self.x_reward and (self.reward or self.oracle)):
            problems.append("--x-reward and --y-reward go together, and replace --reward and --oracle")
        if self.y_bench or self.include_path:
            problems += self.bench_problems()
        return problems

    def bench_problems(self) -> list[str]:
        from rlhfkit.evaluation.bench import lm_eval_problem

        missing = lm_eval_problem()
        if missing:
            return [f"--y-bench: {missing}"]
        if not self.y_bench or "," in self.y_bench:
            return ["--y-bench takes one lm-eval task (--include-path is its task folder)"]
        if self.x_reward:
            return ["--y-bench draws the reward against a benchmark: give --reward, not --x-reward/--y-reward"]
        if self.include_path and not Path(self.include_path).is_dir():
            return [f"--include-path: no such folder: {self.include_path}"]
        return [f"--bench-limit must be >= 0 (got {self.bench_limit})"] if self.bench_limit < 0 else []


# ------------------------------------------------------------------------ shared with the demo


def sample_policy(model, tokenizer, prompts: list, temperature: float, max_new_tokens: int, seed: int, n: int = 1,
                  progress: str | None = None):
    """(prompt ids, response ids, texts), ``n`` samples per prompt, flattened. ``model`` may be a
    :func:`rlhfkit.generation.decoding.decoding_copy`; ``progress`` labels a progress bar."""
    from rlhfkit.data.chat import encode_prompt
    from rlhfkit.generation.decoding import SamplingParams, decode_response, generate_ids

    params = SamplingParams(strategy="sample", temperature=temperature, max_new_tokens=max_new_tokens, n=n, seed=seed)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    # ~64 rows per generate call: larger decoding batches cost less per row (docs/generation.md)
    responses = generate_ids(model, tokenizer, prompt_ids, params, batch_size=max(1, 64 // n), progress=progress)
    flat_prompts = [p for p, rows in zip(prompt_ids, responses) for _ in rows]
    flat_responses = [r for rows in responses for r in rows]
    return flat_prompts, flat_responses, [decode_response(tokenizer, r) for r in flat_responses]


def sample_groups(prompt_ids: list[list[int]], response_ids: list[list[int]], n: int = 1) -> list:
    """:func:`sample_policy`'s flat lists (``n`` samples per prompt, consecutive) as packed groups."""
    from rlhfkit.models.packed import Group

    return [Group(prompt_ids[i], response_ids[i:i + n]) for i in range(0, len(prompt_ids), n)]


def frontier_point(step, model, reference, tokenizer, prompts, reward, oracle, temperature, max_new_tokens,
                   seed, n=1, sampler=None, progress: str | None = None) -> dict:
    """Reward (and oracle) mean and KL to ``reference`` of samples of ``model`` (drawn from
    ``sampler``, its decoding copy, when given; the KL is always measured with ``model``, at the
    sampling temperature: :func:`rlhfkit.evaluation.divergence.kl_to_reference`)."""
    from rlhfkit.evaluation.divergence import kl_to_reference

    prompt_ids, response_ids, texts = sample_policy(sampler if sampler is not None else model, tokenizer, prompts,
                                                    temperature, max_new_tokens, seed, n, progress)
    shown = [p for p in prompts for _ in range(n)]
    kl = 0.0 if model is reference else kl_to_reference(model, reference, sample_groups(prompt_ids, response_ids, n),
                                                        temperature)
    point = {"step": step, "kl": kl, "reward": sum(reward(shown, texts)) / len(texts)}
    if oracle is not None:
        point["oracle"] = sum(oracle(shown, texts)) / len(texts)
    return point


def plot_frontier(points: list[dict], path: Path, reward_label: str = "reward", oracle_label: str = "oracle") -> None:
    from rlhfkit.evaluation.report import new_figure, save_figure

    fig = new_figure()
    ax = fig.add_subplot()
    kls = [p["kl"] for p in points]
    ax.plot(kls, [p["reward"] for p in points], marker="o", label=reward_label)
    if all("oracle" in p for p in points):
        ax2 = ax.twinx()
        ax2.plot(kls, [p["oracle"] for p in points], marker="s", color="tab:red", label=oracle_label)
        ax2.set_ylabel(oracle_label, color="tab:red")
    for p in points:
        ax.annotate(str(p["step"]), (p["kl"], p["reward"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KL(policy || reference), nats per response")
    ax.set_ylabel(reward_label)
    ax.set_title("Reward vs KL over checkpoints")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_reward_plane(points: list[dict], path: Path, x_label: str, y_label: str) -> None:
    """Each checkpoint a dot at (mean x reward, mean y reward), labelled by step, joined in step order."""
    from rlhfkit.evaluation.report import new_figure, save_figure

    fig = new_figure(6.0, 5.0)
    ax = fig.add_subplot()
    ax.plot([p["x"] for p in points], [p["y"] for p in points], marker="o", color="tab:blue")
    for p in points:
        ax.annotate(f"step {p['step']}", (p["x"], p["y"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title("Two rewards over checkpoints")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def write_reward_plane(out: Path, run: Path, x_spec: str, y_spec: str, n_prompts: int, points: list[dict]) -> int:
    """plane.json, plane.md and plane.png of points measured with the x reward as ``reward`` and the y
    reward as ``oracle``."""
    from rlhfkit.evaluation.report import md_table, write_json, write_text

    plane = [{"step": p["step"], "kl": p["kl"], "x": p["reward"], "y": p["oracle"]} for p in points]
    write_json(out / "plane.json", {"run": str(run), "x_reward": x_spec, "y_reward": y_spec, "prompts": n_prompts,
                                    "points": plane})
    table = md_table(["step", "x: " + Path(x_spec).name, "y: " + Path(y_spec).name, "KL (nats)"],
                     [[p["step"], f"{p['x']:.4g}", f"{p['y']:.4g}", f"{p['kl']:.3f}"] for p in plane], "rrrr")
    plot_reward_plane(plane, out / "plane.png", Path(x_spec).name, Path(y_spec).name)
    write_text(out / "plane.md", f"# Two rewards over checkpoints: {run}\n\n{n_prompts} prompts\n\n{table}\n"
                                 "![plane](plane.png)\n")
    print(table)
    print(f"wrote {out / 'plane.md'}")
    return 0


# ------------------------------------------------------------------------ the command


def run_policies(run: Path) -> list[tuple[int, str]]:
    """(step, loadable folder) for every saved policy of a run, in step order, final last."""
    found: dict[int, str] = {}
    for p in run.iterdir():
        for prefix in ("policy-", "round-"):
            suffix = p.name[len(prefix):]
            folder = p / "policy" if prefix == "round-" and (p / "policy").is_dir() else p  # an `rlhfkit loop` round
            loadable = (folder / "config.json").exists() or (folder / "adapter_config.json").exists()
            if p.is_dir() and p.name.startswith(prefix) and suffix.isdigit() and loadable:
                found[int(suffix)] = str(folder)
    if not found:
        from rlhfkit.training import list_checkpoints

        for ckpt in list_checkpoints(run):
            found[int(ckpt.name.split("-")[-1])] = str(ckpt)
    return sorted(found.items())


def load_run_policy(path: str, reference_name: str, dtype: str = "float32"):
    """A policy from a loadable folder, or a full-fine-tune ``checkpoint-N/`` over the reference's config
    (on :func:`rlhfkit.models.loading.default_device`, in ``dtype``)."""
    from rlhfkit.models.loading import load_causal_lm

    if (Path(path) / "config.json").exists() or (Path(path) / "adapter_config.json").exists():
        return load_causal_lm(path, dtype).eval()
    from safetensors.torch import load_file

    model = load_causal_lm(reference_name, dtype).eval()
    state = load_file(str(Path(path) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"{path}: not a full-model checkpoint of {reference_name} "
                         "(a LoRA run? use its policy folders)")
    return model


def main(cfg: Config) -> int:
    from rlhfkit.data.schema import load_prompts
    from rlhfkit.evaluation.bench import CheckpointBench, plot_reward_vs_bench
    from rlhfkit.evaluation.report import md_table
    from rlhfkit.models.loading import load_policy
    from rlhfkit.rl.rewards import build_reward, load_reward

    run = Path(validated(cfg).run)
    run_cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    # the initial policy: `model` in the run's config.yaml (`policy` in a ppo run saved before the rename)
    reference_name = cfg.ref_model or run_cfg.get("policy") or run_cfg.get("model")
    prompts_file = cfg.prompts or run_cfg.get("prompts") or ""
    data_config = cfg.data_config if cfg.prompts else run_cfg.get("data_config") or ""
    reward_spec = cfg.x_reward or cfg.reward or run_cfg.get("reward") or ""
    oracle_spec = cfg.y_reward or cfg.oracle  # the plane: x measured as the reward, y as the oracle
    if not prompts_file:
        raise InputError("--prompts is required (the run has no prompts file)")
    if not reward_spec:
        raise InputError("--reward is required (the run has no reward)")
    prompts = [p.prompt for p in load_prompts(prompts_file, config=data_config, seed=cfg.seed)][:cfg.limit]
    # the run's own reward: several ones combined as the run combined them (ppo --reward-weight/--reward-gate)
    reward = load_reward(reward_spec, cfg.dtype) if cfg.x_reward or cfg.reward else build_reward(
        reward_spec, run_cfg.get("reward_weight") or (), run_cfg.get("reward_gate") or "", cfg.dtype)
    oracle = load_reward(oracle_spec, cfg.dtype) if oracle_spec else None
    bench = CheckpointBench.load(cfg.y_bench, cfg.include_path, cfg.bench_limit, cfg.seed) if cfg.y_bench else None
    reference, tokenizer = load_policy(reference_name, cfg.dtype)
    points = [frontier_point(0, reference, reference, tokenizer, prompts, reward, oracle, cfg.temperature,
                             cfg.max_new_tokens, cfg.seed, cfg.samples_per_prompt)]
    if bench:
        points[0]["bench"] = bench(reference, tokenizer)
    for step, path in run_policies(run):
        model = load_run_policy(path, reference_name, cfg.dtype)
        points.append(frontier_point(step, model, reference, tokenizer, prompts, reward, oracle, cfg.temperature,
                                     cfg.max_new_tokens, cfg.seed, cfg.samples_per_prompt))
        if bench:
            points[-1]["bench"] = bench(model, tokenizer)
        names = ("x", "y") if cfg.x_reward else ("reward", "oracle")  # the plane measures x as reward, y as oracle
        print(f"step {step}: KL {points[-1]['kl']:.3f}, {names[0]} {points[-1]['reward']:.3f}"
              + (f", {names[1]} {points[-1]['oracle']:.3f}" if oracle else ""), flush=True)
    out = Path(cfg.output or run / "frontier")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.x_reward:
        return write_reward_plane(out, run, cfg.x_reward, cfg.y_reward, len(prompts), points)
    (out / "frontier.json").write_text(json.dumps({"run": str(run), "reward": reward.name, "oracle": cfg.oracle,
                                                   "prompts": len(prompts), "points": points,
                                                   **({"y_bench": bench.label} if bench else {})}, indent=1))
    header = ["step", "KL (nats)", "reward"] + (["oracle"] if oracle else []) + ([bench.label] if bench else [])
    rows = [[p["step"], f"{p['kl']:.3f}", f"{p['reward']:.3f}"] + ([f"{p['oracle']:.3f}"] if oracle else [])
            + ([f"{p['bench']:.3f}"] if bench else []) for p in points]
    table = md_table(header, rows)
    plot_frontier(points, out / "frontier.png", f"reward ({Path(reward.name).name})",
                  f"oracle ({cfg.oracle})" if cfg.oracle else "oracle")
    if bench:
        plot_reward_vs_bench(points, out / "frontier-bench.png", f"reward ({Path(reward.name).name})", bench.label)
    (out / "frontier.md").write_text(f"# Reward vs KL: {run}\n\n{len(prompts)} prompts, "
                                     f"{cfg.samples_per_prompt} sample(s) each\n\n{table}\n\n"
                                     "![frontier](frontier.png)\n"
                                     + ("\n![reward vs benchmark](frontier-bench.png)\n" if bench else ""))
    print(table)
    print(f"wrote {out / 'frontier.md'}")
    return 0
