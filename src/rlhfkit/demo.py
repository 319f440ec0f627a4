"""``rlhfkit demo``: the whole RLHF loop, offline, on a laptop CPU, from SmolLM2-135M-Instruct.

    1. prompts: the English chatterbot-corpus conversations, split into train and held-out
    2. preference collection: four sampled replies per train prompt, every pair judged by a
       simulated annotator (VADER prefers the warmer reply, with Bradley–Terry label noise), 8-point Likert;
       or, with ``--feedback ai``, by an AI judge as ``rlhfkit ai-label`` judges (a sampled principle,
       both presentation orders, ties and position-inconsistent pairs held back)
    3. a reward model (all-MiniLM-L6-v2 backbone, Bradley–Terry with the Likert margin)
    4. PPO against the reward model with a KL penalty to the initial policy
    5. DPO on the same preference pairs; best-of-N with the same reward model
    6. evaluation on held-out prompts: oracle (noise-free VADER) win rate over the initial
       policy (each method's reply against N + 1 replies of the initial policy, whose pairs are
       also the reward model's held-out pairs) and KL to it, for PPO, DPO and best-of-N; reward
       vs KL over PPO checkpoints
    7. report.md / report.html with plots and before/after samples

Every phase is an ordinary rlhfkit command (rm, ppo, dpo) run on files the previous phase
wrote, so the demo's output folder doubles as a worked example of the CLI.
"""

from __future__ import annotations

import html
import json
import math
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any, Literal

from rlhfkit.config import arg, validated
from rlhfkit.data.io import write_jsonl
from rlhfkit.errors import InputError
from rlhfkit.generation.decoding import DecodingDtype
from rlhfkit.models.backends import JudgeOptions

if TYPE_CHECKING:
    from rlhfkit.data.constitution import Principle
    from rlhfkit.label.ai_label import Labelling
    from rlhfkit.recipes.ppo import PPOResult
    from rlhfkit.recipes.rm import RewardModelResult
    from rlhfkit.training import TrainResult


@dataclass
class Config(JudgeOptions):
    """The embedded end-to-end RLHF pipeline (offline, CPU): preferences -> RM -> PPO, DPO, best-of-N -> report."""

    output: str = arg("demo-out", "Output folder: data, models, metrics, report.md, report.html and plots.")
    quick: bool = arg(False, "A small run (a few minutes) with the same report and plots, for smoke tests and CI.")
    model: str = arg("smollm2-135m", "The initial policy.")
    reward_backbone: str = arg("minilm-l6", "Backbone of the reward model.")
    seed: int = arg(0, "Seed for the prompt split, sampling, the annotator and training.")
    annotator_temperature: float = arg(0.25, "Label noise of the simulated annotator: it prefers A with "
                                       "probability sigmoid((s_A - s_B) / T) on VADER scores.")
    ppo_steps: int = arg(0, "PPO iterations (0: the preset, 3 with --quick).")
    skip_dpo: bool = arg(False, "Skip the DPO and best-of-N comparison.")
    sample_dtype: DecodingDtype = arg(
        "auto", "Precision of the copy that preference and evaluation replies are sampled from: auto (bfloat16 on "
        "a CPU with native bfloat16, about twice as fast), float32 or bfloat16. Log-probs and KL are always "
        "float32; PPO's rollouts are the policy's own.")
    bf16: bool = arg(True, "Train the reward model, PPO and DPO under bfloat16 autocast (each command's --bf16: "
                     "float32 weights and optimizer, matmuls in bfloat16; about twice as fast here). --no-bf16 "
                     "trains in float32.")
    feedback: Literal["simulated", "ai"] = arg(
        "simulated", "Who labels the preference pairs: the simulated annotator (offline) or an AI judge "
        "(--judge-model, --judge-url), asked as `rlhfkit ai-label` asks it; the report then adds the judge's "
        "agreement with the oracle and its position bias.")
    judge_model: str = arg("", "--feedback ai: the judge, a local path, hub id or embedded name, or the model "
                           "name sent to --judge-url.")
    constitution: str = arg("builtin", "--feedback ai: the principles, one sampled per pair (`builtin`, or a "
                            "JSONL/YAML file as for `rlhfkit ai-label`).")
    judge_max_new_tokens: int = arg(512, "--feedback ai: maximum tokens of each judgment.")

    def validate(self) -> list[str]:
        problems = []
        if self.annotator_temperature <= 0:
            problems.append("--annotator-temperature must be > 0")
        if self.ppo_steps < 0:
            problems.append("--ppo-steps must be >= 0")
        if self.feedback == "ai":
            problems += self.judge_problems() if self.judge_model else [
                "--feedback ai needs a judge: --judge-model NAME|PATH (a local model) or --judge-url URL "
                "--judge-model NAME (an OpenAI-compatible endpoint)"]
            if self.judge_max_new_tokens < 1:
                problems.append("--judge-max-new-tokens must be >= 1")
        elif self.judge_model or self.judge_url or self.constitution != "builtin":
            problems.append("--judge-model, --judge-url and --constitution apply only with --feedback ai")
        return problems


@dataclass
class Preset:
    held_out: int
    # more preference prompts, a better reward model: 96 x 4 replies gave a correlation with the
    # oracle of 0.58, 192 x 4 0.62 (docs/demo.md); 128 is what the time budget allows once
    # sampling runs in bfloat16
    preference_prompts: int
    ppo_steps: int
    ppo_batch: int
    max_new_tokens: int
    dpo_steps: int
    best_of: int
    # K replies per preference prompt, all K(K-1)/2 pairs judged (InstructGPT): at the same
    # generation cost, 96 prompts x 4 replies (576 pairs) give a reward model whose scores
    # correlate 0.58 with the oracle vs 0.43 for 192 prompts x 2 replies (measured, docs/demo.md)
    samples_per_prompt: int = 4
    # One sampling temperature everywhere (preferences, PPO, evaluation), so every KL reported is
    # the KL of the policy as it samples. 0.7 is TRL's default for online RL; at 1.0 the 135M model
    # writes enough gibberish that a MiniLM reward model trained on ~200 pairs learns mostly noise
    # (held-out oracle agreement ~55% at 1.0 vs ~70% at 0.7, measured; see docs/demo.md).
    temperature: float = 0.7
    # 14 iterations are few: at 1.5e-5 the held-out oracle mean moved +0.1, at 3e-5 +0.36..0.38
    # with a good reward model (win rate 76-84%, KL ~9 nats), but a weaker one is over-optimised
    # at that step size (measured, docs/demo.md)
    ppo_lr: float = 3e-5
    # the zero-initialised value head needs a learning rate of its own to track the reward
    # within a few dozen updates (see `rlhfkit ppo --value-lr`)
    value_lr: float = 1e-3
    kl_coef: float = 0.05
    # DPO on dpo_steps x 8 of the preference pairs: at 5e-6, 16 steps left the policy where it was
    # (KL 0.09 nats, held-out VADER 0.293 vs 0.276); at 2e-5, KL 1.6 and 0.336 (docs/demo.md)
    dpo_lr: float = 2e-5
    ppo_epochs: int = 1
    rm_epochs: int = 4
    checkpoint_every: int = 8

    @property
    def baseline_samples(self) -> int:
        """Replies of the initial policy per held-out prompt. Every win rate compares a method's
        reply with each of them (one baseline reply per prompt left a standard error of ~6 points
        on 64 prompts), their pairs are the reward model's held-out pairs, and best-of-N is
        measured leave-one-out among them (N + 1 replies: no sampling of its own)."""
        return self.best_of + 1


DEFAULT = Preset(held_out=64, preference_prompts=192, ppo_steps=18, ppo_batch=16, max_new_tokens=32,
                 dpo_steps=16, best_of=4, rm_epochs=1, checkpoint_every=6)
QUICK = Preset(held_out=8, preference_prompts=8, ppo_steps=3, ppo_batch=4, max_new_tokens=16,
               dpo_steps=2, best_of=2, rm_epochs=2, checkpoint_every=1)


@dataclass
class Results:
    """Everything the report states; saved as results.json."""

    prompts: dict = field(default_factory=dict)
    preferences: dict = field(default_factory=dict)
    reward_model: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)       # name -> {win_rate, win_rate_stderr, kl, oracle_mean, ...}
    frontier: list = field(default_factory=list)      # [{step, kl, reward, oracle}]
    timings: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)


@contextmanager
def timed(name: str, results: Results):
    """Record the seconds the block took as the phase ``name`` of the report's timings."""
    started = time.time()
    yield
    results.timings[name] = round(time.time() - started, 1)
    print(f"[demo] {name}: {results.timings[name]:.1f} s", flush=True)


# ------------------------------------------------------------------------------------ phases


def sample_replies(model, tokenizer, prompts: list[str], preset: Preset, seed: int) -> list[list[str]]:
    """``preset.samples_per_prompt`` replies per prompt sampled from ``model`` (the initial policy
    or its decoding copy). Each generate call is seeded alike, so the first prompts get the same
    replies however many prompts follow them."""
    from tqdm.auto import tqdm

    from rlhfkit.generation.decoding import SamplingParams, generate_chat

    params = SamplingParams(strategy="sample", temperature=preset.temperature, max_new_tokens=preset.max_new_tokens,
                            n=preset.samples_per_prompt, seed=seed)
    replies = []
    chunk_size = 64 // preset.samples_per_prompt  # 64 rows per generate call: small batches are overhead-bound
    for start in tqdm(range(0, len(prompts), chunk_size), desc="preferences", dynamic_ncols=True):
        chunk = prompts[start:start + chunk_size]
        replies += generate_chat(model, tokenizer, chunk, params, batch_size=chunk_size)
    return replies


def candidate_pairs(replies: list[str]) -> list[tuple[str, str]]:
    """Every pair of ``replies`` worth comparing: identical or empty replies are not compared."""
    from itertools import combinations

    return [(a, b) for a, b in combinations(replies, 2) if a and b and a != b]


def judge_all_pairs(prompt: str, replies: list[str], annotator) -> list[dict]:
    """Every candidate pair of ``replies`` judged by the annotator, as preference records (chosen,
    rejected, the Likert value and its margin, ``rlhfkit.data.likert``)."""
    from rlhfkit.data.likert import to_preference

    pairs = []
    for a, b in candidate_pairs(replies):
        likert = annotator.judge(prompt, a, b)
        a_preferred, margin = to_preference(likert)
        chosen, rejected = (a, b) if a_preferred else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin,
                      "likert": likert, "response_a": a, "response_b": b})
    return pairs


def label_with_judge(cfg: Config, principles: list[Principle], comparisons: list[tuple[str, str, str]],
                     out: Path) -> Labelling:
    """``--feedback ai``: the pairs ``(prompt, a, b)`` labelled by the judge with ``rlhfkit ai-label``'s
    machinery (a principle sampled per pair, both presentation orders, ties, position-inconsistent
    and unparsed pairs held back), its outputs in ``OUT/ai_label`` and the pairs it was given in
    ``OUT/data/pairs_candidates.jsonl`` (its config.yaml reruns it as ``rlhfkit ai-label``). Every
    judge reply is journaled: rerunning the demo with the same --output asks nothing twice. An
    endpoint error ends the demo (exit 1) with one line naming the endpoint."""
    from rlhfkit.label import ai_label
    from rlhfkit.models.backends import BackendError

    data = write_jsonl(out / "data" / "pairs_candidates.jsonl",
                       [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in comparisons])
    label_cfg = ai_label.Config(data=data, output=str(out / "ai_label"), constitution=cfg.constitution,
                                judge_model=cfg.judge_model, judge_url=cfg.judge_url,
                                judge_api_key_env=cfg.judge_api_key_env,
                                judge_max_new_tokens=cfg.judge_max_new_tokens, seed=cfg.seed)
    labelling = ai_label.label_comparisons(label_cfg, [ai_label.Comparison(p, a, b) for p, a, b in comparisons],
                                           principles)
    if labelling.failure is not None:
        raise BackendError(f"{labelling.failure} (the judge's replies so far are kept in {out / 'ai_label'}: "
                           "rerun the same demo command to continue)")
    return labelling


def judge_summary(labelling: Labelling, labels: dict) -> dict:
    """The report's AI-feedback figures: what the judge labelled and held back, its position bias
    (ai-label's verdict balance), and its agreement with the oracle on its confident labels
    (``labels``: :func:`oracle_agreement` of its rows) with one binomial standard error."""
    stats = labelling.stats
    rate, n = labels["oracle_agreement"], labels["oracle_pairs"]
    return {"judge": labelling.judge, "pairs_judged": stats["pairs"], "labelled": stats["labelled"],
            "ties": stats["ties"], "position_inconsistent": stats["position_inconsistent"],
            "unparsed": stats["unparsed"], "position_bias": stats["position_bias"],
            "oracle_agreement": rate if n else None,
            "oracle_agreement_stderr": math.sqrt(rate * (1 - rate) / n) if n else None, "oracle_pairs": n}


def sample_policy(model, tokenizer, prompts: list[str], preset: Preset, seed: int, n: int = 1, progress=None):
    from rlhfkit.evaluation.frontier import sample_policy as _sample

    return _sample(model, tokenizer, prompts, preset.temperature, preset.max_new_tokens, seed, n, progress)


def oracle_agreement(oracle, pairs: list[dict], chosen_scores: list[float] | None = None,
                     rejected_scores: list[float] | None = None) -> dict:
    """How often a judge orders the pairs as the noise-free oracle does, over the pairs the oracle
    does not score equal. The judge is the pairs' own labels (no scores: chosen over rejected)
    or a scorer's ``chosen_scores`` / ``rejected_scores``."""
    oracle_chosen, oracle_rejected = oracle([p["chosen"] for p in pairs]), oracle([p["rejected"] for p in pairs])
    chosen_scores = chosen_scores if chosen_scores is not None else [1.0] * len(pairs)
    rejected_scores = rejected_scores if rejected_scores is not None else [0.0] * len(pairs)
    verdicts = [(c > r) == (oc > orr) for c, r, oc, orr in
                zip(chosen_scores, rejected_scores, oracle_chosen, oracle_rejected) if oc != orr]
    return {"oracle_agreement": sum(verdicts) / max(len(verdicts), 1), "oracle_pairs": len(verdicts)}


def preference(a: float, b: float) -> float:
    """1 if the oracle scores ``a`` higher, 0.5 on a tie, 0 otherwise."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def oracle_win_rate(candidate: list[float], baselines: list[list[float]]):
    """Win rate of a method over the initial policy from oracle scores: its reply to prompt i
    (``candidate[i]``) against each of the initial policy's replies to it (``baselines[i]``),
    averaged over those replies, then over prompts (ties count half). Prompts are the independent
    units: the standard error is over the per-prompt values."""
    from rlhfkit.evaluation.winrate import win_rate

    return win_rate([sum(preference(c, b) for b in bs) / len(bs) for c, bs in zip(candidate, baselines)])


def leave_one_out_best_of_n(rm_scores: list[list[float]], oracle_scores: list[list[float]]) -> dict:
    """Best-of-(K−1) against the initial policy from K replies per prompt, without sampling again.

    For each reply j of a prompt, the reply the reward model scores highest among the *other*
    K−1 is compared with reply j by the oracle. The K replies are independent samples, so each
    comparison is an honest best-of-(K−1) pick against an independent initial reply; the win rate
    averages them over j, then over prompts. Returns the win rate (a ``WinRate``), the oracle and
    reward-model means of the picks, and for each prompt its pick that excludes reply 0."""
    from rlhfkit.evaluation.winrate import win_rate
    from rlhfkit.generation.best_of_n import argmax

    per_prompt, oracle_picked, rm_picked, picks = [], [], [], []
    for rm, oracle in zip(rm_scores, oracle_scores):
        wins = 0.0
        for j in range(len(rm)):
            others = [i for i in range(len(rm)) if i != j]
            pick = others[argmax([rm[i] for i in others])]
            wins += preference(oracle[pick], oracle[j])
            oracle_picked.append(oracle[pick])
            rm_picked.append(rm[pick])
            if j == 0:
                picks.append(pick)
        per_prompt.append(wins / len(rm))
    return {"win_rate": win_rate(per_prompt), "oracle_mean": fmean(oracle_picked), "rm_mean": fmean(rm_picked),
            "picks": picks}


def evaluate_method(name, model, reference, tokenizer, held_out, baseline_oracle, oracle, reward, preset, seed,
                    results: Results, sample_dtype: str) -> list[str]:
    """One reply per held-out prompt sampled from ``model`` (its decoding copy in ``sample_dtype``),
    its oracle win rate over the baseline replies, and its KL to ``reference`` (measured with ``model``)."""
    from rlhfkit.evaluation.divergence import kl_to_reference
    from rlhfkit.evaluation.frontier import sample_groups
    from rlhfkit.generation.decoding import decoding_copy

    prompt_ids, response_ids, texts = sample_policy(decoding_copy(model, sample_dtype), tokenizer, held_out, preset,
                                                    seed, progress=f"{name} replies")

    kl = kl_to_reference(model, reference, sample_groups(prompt_ids, response_ids), preset.temperature)
    results.methods[name] = _method_row(texts, baseline_oracle, held_out, oracle, reward, kl)
    return texts


def _method_row(texts, baseline_oracle, prompts, oracle, reward, kl) -> dict:
    oracle_scores = oracle(texts)
    wins = oracle_win_rate(oracle_scores, baseline_oracle)
    return {"win_rate": wins.win_rate, "win_rate_stderr": wins.stderr, "kl": kl,
            "oracle_mean": sum(oracle_scores) / len(oracle_scores),
            "rm_mean": sum(reward(prompts, texts)) / len(texts),
            "mean_words": sum(len(t.split()) for t in texts) / len(texts)}


# ------------------------------------------------------------------------------------ report


def plot_curves(rows: list[dict], out: Path) -> list[str]:
    """Reward and KL per PPO iteration (the rows the PPO run logged)."""
    from rlhfkit.evaluation.report import new_figure, save_figure

    if not rows:
        return []
    steps = [r["step"] for r in rows]
    made = []
    for key, label, filename in (("objective/scores", "reward-model score", "reward_curve.png"),
                                 ("objective/kl", "KL to the reference (nats)", "kl_curve.png")):
        fig = new_figure()
        ax = fig.add_subplot()
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker="o", ms=3)
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel(label)
        ax.set_title(f"{label} during PPO")
        ax.grid(alpha=0.3)
        save_figure(fig, out / filename)
        made.append(filename)
    return made


def plot_frontier(frontier: list[dict], methods: dict, out: Path) -> str:
    from rlhfkit.evaluation.report import new_figure, save_figure

    fig = new_figure()
    ax = fig.add_subplot()
    kls = [f["kl"] for f in frontier]
    ax.plot(kls, [f["reward"] for f in frontier], marker="o", label="reward model (PPO checkpoints)")
    ax.plot(kls, [f["oracle"] for f in frontier], marker="s", label="oracle VADER (PPO checkpoints)")
    for f in frontier:
        ax.annotate(str(f["step"]), (f["kl"], f["reward"]), fontsize=7, xytext=(2, 2), textcoords="offset points")
    for name, row in methods.items():
        if name != "initial":
            ax.scatter([row["kl"]], [row["oracle_mean"]], marker="*", s=90, label=f"{name} (oracle)")
    ax.set_xlabel("KL to the initial policy (nats)")
    ax.set_ylabel("mean score on held-out prompts")
    ax.set_title("Reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out / "reward_vs_kl.png")
    return "reward_vs_kl.png"


def summary_lines(results: Results) -> list[str]:
    """The report's opening: win rate, KL, sampling precision, reward model, and with --feedback ai the judge."""
    ppo = results.methods.get("ppo", {})
    ai = results.preferences.get("ai_feedback")
    labeller = "annotator" if ai is None else "judge"
    lines = ["# rlhfkit demo report", "",
             f"win rate: {100 * ppo.get('win_rate', float('nan')):.0f}% "
             f"(± {100 * ppo.get('win_rate_stderr', float('nan')):.0f} points, one standard error over prompts) "
             f"(PPO policy over the initial policy on {results.prompts.get('held_out', 0)} held-out prompts: "
             f"one PPO reply per prompt against each of {results.prompts.get('baseline_samples', 1)} replies "
             "of the initial policy, judged by the noise-free VADER oracle; ties count half)", "",
             f"mean KL to the initial policy: {ppo.get('kl', float('nan')):.2f} nats per response", "",
             f"replies sampled in {results.prompts.get('sample_dtype', 'float32')} (preferences, evaluation and "
             "PPO's rollouts, from a copy of the policy; log-probs and KL with the float32 models); training "
             f"{'under bfloat16 autocast' if results.prompts.get('bf16') else 'in float32'}", "",
             f"reward model held-out accuracy: {100 * results.reward_model.get('eval/accuracy', float('nan')):.1f}% "
             f"(on {results.reward_model.get('eval_pairs', 0)} pairs of the initial policy's replies to the "
             f"held-out prompts, against the {'' if ai is None else 'simulated '}annotator's noisy labels); "
             f"{labeller} agreement with the noise-free oracle: "
             f"{100 * results.preferences.get('oracle_agreement', float('nan')):.1f}%; reward model agreement "
             f"with the oracle on the held-out pairs it separates: "
             f"{100 * results.reward_model.get('oracle_agreement', float('nan')):.1f}% "
             f"(of {results.reward_model.get('oracle_pairs', 0)})", ""]
    return lines if ai is None else lines + judge_lines(ai)


def judge_lines(ai: dict) -> list[str]:
    """--feedback ai: what the judge labelled and held back, its agreement with the oracle, its position bias."""
    from rlhfkit.evaluation.report import md_escape

    bias = ai["position_bias"]
    share = "n/a" if bias["first_share"] is None else f"{bias['first_share']:.2f}"
    agreement = "n/a" if ai["oracle_agreement"] is None else (
        f"{100 * ai['oracle_agreement']:.1f}% ± {100 * ai['oracle_agreement_stderr']:.1f}")
    return [f"AI feedback: the judge {md_escape(ai['judge'])} labelled {ai['labelled']} of {ai['pairs_judged']} "
            "preference pairs confidently (a principle sampled per pair, both presentation orders asked); held "
            f"back: {ai['ties']} ties, {ai['position_inconsistent']} position-inconsistent, {ai['unparsed']} "
            "unparsed. The reward model (and DPO) train on its labels; the held-out pairs keep the simulated "
            "annotator's.", "",
            f"judge agreement with the oracle (VADER, the demo's hidden reward): {agreement} (one binomial "
            f"standard error) on the {ai['oracle_pairs']} confidently labelled pairs the oracle separates", "",
            f"judge position bias: the reply shown first was chosen in {bias['first']} verdicts, the second in "
            f"{bias['second']}, tie in {bias['tie']} (first-position share {share}; 0.50 is none)", ""]


def write_report(out: Path, results: Results, plots: list[str]) -> None:
    from rlhfkit.evaluation.report import md_escape, md_table

    summary = summary_lines(results)
    lines = summary + ["## Methods side by side", ""]
    header = ["method", "oracle win rate vs initial (± s.e.)", "KL to initial (nats)", "oracle mean", "RM mean",
              "words"]
    rows = [[name, f"{100 * m['win_rate']:.0f}% ± {100 * m['win_rate_stderr']:.0f}", f"{m['kl']:.2f}",
             f"{m['oracle_mean']:.3f}", f"{m['rm_mean']:.3f}",
             f"{m['mean_words']:.1f}"] for name, m in results.methods.items()]
    lines += [md_table(header, rows), "",
              "Best-of-N's KL is the analytic log N - (N-1)/N. Best-of-N is measured leave-one-out on the "
              "initial policy's held-out replies: for each reply, the reward model's pick among the other N "
              "is judged against it.", "",
              "## Reward vs KL over PPO checkpoints", "",
              md_table(["iteration", "KL (nats)", "reward model", "oracle"],
                       [[f["step"], f"{f['kl']:.2f}", f"{f['reward']:.3f}", f"{f['oracle']:.3f}"]
                        for f in results.frontier]), ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "## Before and after (held-out prompts)", ""]
    lines += [md_table(["prompt", "initial policy", "after PPO"],
                       [[md_escape(s["prompt"]), md_escape(s["initial"]), md_escape(s["ppo"])]
                        for s in results.samples]), ""]
    lines += ["## Timings (seconds)", "", md_table(["phase", "s"], [[k, v] for k, v in results.timings.items()]), ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.html").write_text(render_html(results, plots, "\n".join(summary).rstrip("\n")))


def render_html(results: Results, plots: list[str], summary: str) -> str:
    """A self-contained page; every model output is escaped (untrusted text)."""
    esc = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>rlhfkit demo report</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:auto}td,th{border:1px solid #ccc;"
             "padding:4px;vertical-align:top}table{border-collapse:collapse}</style>",
             "<h1>rlhfkit demo report</h1>", "<pre>" + esc(summary) + "</pre>", "<h2>Methods</h2><table>",
             "<tr><th>method</th><th>win rate</th><th>KL</th><th>oracle mean</th><th>RM mean</th></tr>"]
    for name, m in results.methods.items():
        parts.append(f"<tr><td>{esc(name)}</td><td>{100 * m['win_rate']:.0f}%</td><td>{m['kl']:.2f}</td>"
                     f"<td>{m['oracle_mean']:.3f}</td><td>{m['rm_mean']:.3f}</td></tr>")
    parts.append("</table>")
    parts += [f"<p><img src='{esc(p)}' alt='{esc(p)}' width='600'></p>" for p in plots]
    parts.append("<h2>Before and after</h2><table><tr><th>prompt</th><th>initial</th><th>after PPO</th></tr>")
    for s in results.samples:
        parts.append("<tr>" + "".join(f"<td>{esc(s[k])}</td>" for k in ("prompt", "initial", "ppo")) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ main


def main(cfg: Config) -> int:
    from rlhfkit.data.annotators import VaderSentiment, vader_annotator
    from rlhfkit.data.constitution import load_constitution
    from rlhfkit.training import seed_everything

    preset = QUICK if validated(cfg).quick else DEFAULT
    principles = load_constitution(cfg.constitution) if cfg.feedback == "ai" else None  # checked before any model
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    results = Results()
    seed_everything(cfg.seed)
    t_all = time.time()

    with timed("prompts and model", results):  # 1.
        start = prompts_and_model(cfg, preset, out, results)
    with timed("preference collection", results):  # 2.
        oracle = VaderSentiment()
        annotator = vader_annotator(cfg.annotator_temperature, cfg.seed)
        preferences = collect_phase(cfg, start, annotator, principles, oracle, preset, out, results)
    with timed("held-out initial replies", results):
        baseline = baseline_phase(start, annotator, oracle, preset, cfg.seed + 1, out, results)
        start.sampler = None  # its memory is needed for training
    with timed("reward model", results):  # 3.
        reward_model = reward_model_phase(cfg, preset, preferences, baseline, start.held_out, oracle, out, results)
    with timed("ppo", results):  # 4.
        ppo = run_ppo(cfg, preset, cfg.ppo_steps or preset.ppo_steps, start.prompts_file, reward_model.trained.output,
                      out / "ppo")
    with timed("ppo evaluation", results):  # 5-6.
        evaluate_ppo(cfg, preset, start, baseline, reward_model, ppo, oracle, results)
    if not cfg.skip_dpo:
        with timed("dpo", results):
            dpo_phase(cfg, preset, start, preferences, baseline, reward_model, oracle, out, results)
        with timed("best-of-n", results):
            best_of_n_phase(preset, baseline, reward_model, results)
    report_phase(out, results, ppo, t_all)  # 7.
    return 0


# ------------------------------------------------------------------------------------ phases of main


@dataclass
class Start:
    """Phase 1: the prompt split and the initial policy."""

    train_prompts: list[str]
    held_out: list[str]
    preference_prompts: list[str]   # the first train prompts
    prompts_file: Path              # the train prompts (PPO's --prompts)
    initial: Any                    # the initial policy (float32): the reference of every KL
    tokenizer: Any
    sampler: Any                    # its decoding copy (--sample-dtype): preference and baseline replies


@dataclass
class Preferences:
    """Phase 2: the judged pairs of the preference prompts' replies."""

    pairs: list[dict]
    file: str


@dataclass
class Baseline:
    """The initial policy's N + 1 replies to each held-out prompt: the baseline of every win rate
    and, judged pairwise by the same annotator, the reward model's held-out pairs (so the reward
    model trains on every preference prompt and is tested on prompts it never saw)."""

    replies: list[list[str]]      # [held-out prompt][baseline sample]
    oracle: list[list[float]]     # their oracle scores
    pairs: list[dict]
    pairs_file: str

    @property
    def flat(self) -> list[str]:
        return [reply for replies in self.replies for reply in replies]


@dataclass
class RewardModel:
    """Phase 3: the reward model as its recipe returned it, its scorer, and its scores of the baseline replies."""

    trained: RewardModelResult
    score: Callable               # score(prompts, completions) -> list[float]
    baseline_scores: list[list[float]]


def prompts_and_model(cfg: Config, preset: Preset, out: Path, results: Results) -> Start:
    from rlhfkit.data.corpora import chatterbot_prompts, split_prompts
    from rlhfkit.generation.decoding import decoding_copy
    from rlhfkit.models.loading import load_policy

    train_prompts, held_out = split_prompts(chatterbot_prompts(), preset.held_out, cfg.seed)
    pref_prompts = train_prompts[:preset.preference_prompts]
    results.prompts = {"train": len(train_prompts), "held_out": len(held_out), "preference": len(pref_prompts)}
    prompts_file = out / "data" / "prompts_train.jsonl"
    write_jsonl(prompts_file, [{"prompt": p} for p in train_prompts])
    write_jsonl(out / "data" / "prompts_heldout.jsonl", [{"prompt": p} for p in held_out])
    initial, tokenizer = load_policy(cfg.model)
    sampler = decoding_copy(initial, cfg.sample_dtype)
    results.prompts["sample_dtype"] = str(next(sampler.parameters()).dtype).removeprefix("torch.")
    results.prompts["bf16"] = cfg.bf16
    return Start(train_prompts, held_out, pref_prompts, prompts_file, initial, tokenizer, sampler)


def collect_phase(cfg: Config, start: Start, annotator, principles: list[Principle] | None, oracle, preset: Preset,
                  out: Path, results: Results) -> Preferences:
    """Replies to the preference prompts and their pairs labelled by the simulated annotator or,
    with ``--feedback ai``, by the judge (its confident labels only)."""
    prompts = start.preference_prompts
    replies = sample_replies(start.sampler, start.tokenizer, prompts, preset, cfg.seed)
    labelling = None
    if cfg.feedback == "ai":
        labelling = label_with_judge(cfg, principles, [(prompt, a, b) for prompt, rs in zip(prompts, replies)
                                                       for a, b in candidate_pairs(rs)], out)
        pairs = labelling.rows
    else:
        pairs = [pair for prompt, rs in zip(prompts, replies) for pair in judge_all_pairs(prompt, rs, annotator)]
    if len(pairs) < 4:
        held = "" if labelling is None else (
            f" (the judge labelled {len(pairs)} of {labelling.stats['pairs']} pairs confidently; see "
            f"{out / 'ai_label' / 'stats.json'} for what it held back)")
        raise InputError(f"the demo collected fewer than 4 usable preference pairs{held}")
    labels = oracle_agreement(oracle, pairs)
    results.preferences = {"pairs": len(pairs), "oracle_agreement": labels["oracle_agreement"],
                           "ties_by_oracle": len(pairs) - labels["oracle_pairs"]}
    if labelling is not None:
        results.preferences["ai_feedback"] = judge_summary(labelling, labels)
    return Preferences(pairs, write_jsonl(out / "data" / "pairs_train.jsonl", pairs))


def baseline_phase(start: Start, annotator, oracle, preset: Preset, seed: int, out: Path,
                   results: Results) -> Baseline:
    n = preset.baseline_samples
    _, _, flat = sample_policy(start.sampler, start.tokenizer, start.held_out, preset, seed, n=n,
                               progress="held-out replies")
    replies = [flat[i:i + n] for i in range(0, len(flat), n)]
    pairs = [pair for prompt, rs in zip(start.held_out, replies) for pair in judge_all_pairs(prompt, rs, annotator)]
    if not pairs:
        raise InputError("the initial policy's held-out replies gave no pair to judge")
    pairs_file = write_jsonl(out / "data" / "pairs_heldout.jsonl", pairs)
    results.prompts["baseline_samples"] = n
    return Baseline(replies, [oracle(rs) for rs in replies], pairs, pairs_file)


def reward_model_phase(cfg: Config, preset: Preset, preferences: Preferences, baseline: Baseline,
                       held_out: list[str], oracle, out: Path, results: Results) -> RewardModel:
    from rlhfkit.generation.best_of_n import score_completions
    from rlhfkit.recipes import rm as rm_recipe
    from rlhfkit.rl.rewards import load_reward
    from rlhfkit.training import start_run

    rm_cfg = rm_recipe.Config(model=cfg.reward_backbone, data=preferences.file, eval_data=baseline.pairs_file,
                              output=str(out / "reward_model"), epochs=preset.rm_epochs, batch_size=8, lr=1e-4,
                              max_length=192, seed=cfg.seed, warmup_ratio=0.1,
                              save_only_model=True, bf16=cfg.bf16)
    with start_run(rm_cfg) as run:
        trained = rm_recipe.train(rm_cfg, run)
    results.reward_model = {**trained.metrics, "eval_pairs": len(baseline.pairs)}
    reward = load_reward(str(trained.final_model))
    pair_prompts = [p["prompt"] for p in baseline.pairs]
    results.reward_model.update(oracle_agreement(
        oracle, baseline.pairs, reward(pair_prompts, [p["chosen"] for p in baseline.pairs]),
        reward(pair_prompts, [p["rejected"] for p in baseline.pairs])))
    return RewardModel(trained, reward, score_completions(reward, held_out, baseline.replies))


def evaluate_ppo(cfg: Config, preset: Preset, start: Start, baseline: Baseline, reward_model: RewardModel,
                 ppo: PPOResult, oracle, results: Results) -> None:
    """The initial policy's row, the final PPO policy's row, before/after samples, and reward vs KL
    over the PPO snapshots (the curve's ends are the two rows: only the snapshots between are sampled)."""
    from rlhfkit.data.annotators import vader_reward
    from rlhfkit.evaluation.frontier import frontier_point, load_run_policy
    from rlhfkit.generation.decoding import decoding_copy

    results.methods["initial"] = {"win_rate": 0.5, "win_rate_stderr": 0.0, "kl": 0.0,  # itself, by symmetry
                                  "oracle_mean": fmean(s for row in baseline.oracle for s in row),
                                  "rm_mean": fmean(s for row in reward_model.baseline_scores for s in row),
                                  "mean_words": fmean(len(reply.split()) for reply in baseline.flat)}
    policy = load_ppo_policy(ppo.final_model)
    ppo_texts = evaluate_method("ppo", policy, start.initial, start.tokenizer, start.held_out, baseline.oracle,
                                oracle, reward_model.score, preset, cfg.seed + 2, results, cfg.sample_dtype)
    results.samples = [{"prompt": p, "initial": a, "ppo": b} for p, a, b in
                       list(zip(start.held_out, (b[0] for b in baseline.replies), ppo_texts))[:8]]

    def measured(step: int, row: dict) -> dict:
        return {"step": step, "kl": row["kl"], "reward": row["rm_mean"], "oracle": row["oracle_mean"]}

    last = ppo.metrics["step"]
    results.frontier.append(measured(0, results.methods["initial"]))
    for step, path in ppo.snapshots:
        if 0 < step < last:
            snapshot = load_run_policy(str(path), cfg.model)
            results.frontier.append(frontier_point(
                step, snapshot, start.initial, start.tokenizer, start.held_out, reward_model.score, vader_reward,
                preset.temperature, preset.max_new_tokens, cfg.seed + 3,
                sampler=decoding_copy(snapshot, cfg.sample_dtype), progress=f"ppo iteration {step} replies"))
    results.frontier.append(measured(last, results.methods["ppo"]))


def dpo_phase(cfg: Config, preset: Preset, start: Start, preferences: Preferences, baseline: Baseline,
              reward_model: RewardModel, oracle, out: Path, results: Results) -> None:
    from rlhfkit.models.loading import load_policy

    # the DPO steps see dpo_steps x 8 pairs: give it just those (a seeded sample across prompts),
    # so it precomputes reference log-probs for 64 pairs rather than all ~500
    pairs = random.Random(cfg.seed).sample(preferences.pairs, min(len(preferences.pairs), preset.dpo_steps * 8))
    trained = run_dpo(cfg, preset, write_jsonl(out / "data" / "pairs_dpo.jsonl", pairs), out / "dpo")
    dpo_policy, _ = load_policy(str(trained.final_model))
    evaluate_method("dpo", dpo_policy, start.initial, start.tokenizer, start.held_out, baseline.oracle, oracle,
                    reward_model.score, preset, cfg.seed + 4, results, cfg.sample_dtype)


def best_of_n_phase(preset: Preset, baseline: Baseline, reward_model: RewardModel, results: Results) -> None:
    from rlhfkit.evaluation.divergence import best_of_n_kl

    bon = leave_one_out_best_of_n(reward_model.baseline_scores, baseline.oracle)
    results.methods[f"best-of-{preset.best_of}"] = {
        "win_rate": bon["win_rate"].win_rate, "win_rate_stderr": bon["win_rate"].stderr,
        "kl": best_of_n_kl(preset.best_of), "oracle_mean": bon["oracle_mean"], "rm_mean": bon["rm_mean"],
        "mean_words": fmean(len(replies[i].split()) for replies, i in zip(baseline.replies, bon["picks"]))}


def report_phase(out: Path, results: Results, ppo: PPOResult, started: float) -> None:
    (out / "results.json").write_text(json.dumps(asdict(results), indent=1))
    plots = plot_curves(ppo.history, out)
    if results.frontier:
        plots.append(plot_frontier(results.frontier, results.methods, out))
    results.timings["total"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(asdict(results), indent=1))
    write_report(out, results, plots)
    ppo_row = results.methods["ppo"]
    print(f"[demo] win rate: {100 * ppo_row['win_rate']:.0f}% (PPO vs initial, oracle), KL {ppo_row['kl']:.2f} nats, "
          f"RM accuracy {100 * results.reward_model.get('eval/accuracy', float('nan')):.0f}%; "
          f"report: {out / 'report.md'} ({results.timings['total']:.0f} s)")


# ------------------------------------------------------------------------------------ glue


def run_ppo(cfg: Config, preset: Preset, steps: int, prompts: Path, rm_dir: Path, ppo_dir: Path) -> PPOResult:
    """The PPO recipe on the demo's settings."""
    from rlhfkit.recipes import ppo
    from rlhfkit.training import start_run

    ppo_cfg = ppo.Config(model=cfg.model, reward=str(rm_dir), prompts=str(prompts), output=str(ppo_dir),
                         max_steps=steps, batch_size=preset.ppo_batch, max_new_tokens=preset.max_new_tokens,
                         temperature=preset.temperature, seed=cfg.seed, save_steps=preset.checkpoint_every,
                         save_only_model=True, lr=preset.ppo_lr, value_lr=preset.value_lr, kl_coef=preset.kl_coef,
                         ppo_epochs=preset.ppo_epochs,
                         minibatch_size=preset.ppo_batch // 2, warmup_ratio=0.0, lr_schedule="constant",
                         sample_every=5, bf16=cfg.bf16, sample_dtype=cfg.sample_dtype)
    with start_run(ppo_cfg) as run:
        return ppo.train(ppo_cfg, run)


def load_ppo_policy(ppo_dir: Path):
    from rlhfkit.models.loading import load_causal_lm

    return load_causal_lm(str(ppo_dir)).eval()


def run_dpo(cfg: Config, preset: Preset, pairs: str, dpo_dir: Path) -> TrainResult:
    """The DPO recipe on the demo's settings."""
    from rlhfkit.recipes import dpo
    from rlhfkit.training import start_run

    dpo_cfg = dpo.Config(model=cfg.model, data=pairs, output=str(dpo_dir), batch_size=8, epochs=1,
                         max_steps=preset.dpo_steps, lr=preset.dpo_lr, beta=0.1, seed=cfg.seed, max_length=256,
                         save_only_model=True, bf16=cfg.bf16)
    with start_run(dpo_cfg) as run:
        return dpo.train(dpo_cfg, run)
