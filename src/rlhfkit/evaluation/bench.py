"""``rlhfkit eval-bench``: EleutherAI's lm-evaluation-harness as a library, on a checkpoint or an endpoint.

    rlhfkit eval-bench --model smollm2-135m --tasks arith_mc --include-path bench/tasks --output out/bench
    rlhfkit eval-bench --model-url http://127.0.0.1:8000/v1 --model-name smollm2-135m --suite open-llm-v1 \\
        --output out/leaderboard

A local model (``--model``: a folder, LoRA adapter folder, hub id or embedded name such as
``smollm2-135m``) is loaded by rlhfkit in ``--dtype`` and handed to lm-eval's ``hf`` model; an
endpoint (``--model-url`` + ``--model-name``) is scored through lm-eval's ``local-completions``
model (``/v1/completions`` with ``echo`` and ``logprobs``, as ``rlhfkit serve`` and vLLM answer
it), tokenised with ``--tokenizer`` (default: ``--model-name``).

Tasks: lm-eval's own (``--tasks arc_easy,hellaswag``: their data comes from the Hugging Face hub
once, then from the ``datasets`` cache), folders of task YAML files (``--include-path DIR``:
offline when their data files are local), and ``--suite open-llm-v1``: the Open LLM Leaderboard
v1 tasks at that leaderboard's few-shot counts and metrics (:data:`SUITES`). Tasks are loaded,
and their data fetched, before any model is: a task whose data cannot be fetched is one error line
(exit 2). Writes ``results.json`` (per task: metric, value, stderr, n, num_fewshot; the config and
lm-eval's version), ``report.md`` and ``config.yaml``.

lm-eval is an optional dependency: ``pip install 'rlhfkit[bench]'``.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhfkit.config import arg, flag, save_config, validated
from rlhfkit.errors import InputError
from rlhfkit.models.backends import BackendError, ModelOptions

INSTALL_HINT = "pip install 'rlhfkit[bench]'"
ENDPOINT_MODULES = ("aiohttp", "tenacity", "requests")  # lm-eval[api]: what local-completions imports

# task -> (few-shot examples, the metric the leaderboard reported), as the Open LLM Leaderboard v1 ran them
SUITES: dict[str, dict[str, tuple[int, str]]] = {
    "open-llm-v1": {
        "arc_challenge": (25, "acc_norm"),
        "hellaswag": (10, "acc_norm"),
        "mmlu": (5, "acc"),
        "truthfulqa_mc2": (0, "acc"),
        "winogrande": (5, "acc"),
        "gsm8k": (5, "exact_match,strict-match"),
    },
}


@dataclass
class Config(ModelOptions):
    """Benchmarks of lm-evaluation-harness (local task folders, or the Open LLM Leaderboard's) on a model."""

    model: str = arg("smollm2-135m", "Model: a local path, LoRA adapter folder, hub id or embedded name (or "
                     "--model-url and --model-name: an endpoint).")
    tokenizer: str = arg("", "With --model-url: the endpoint model's tokenizer (a local path, hub id or embedded "
                         "name; default: --model-name). lm-eval counts tokens with it.")
    tasks: str = arg("", "Comma-separated lm-eval task or group names: built in, or defined under --include-path.")
    include_path: str = arg("", "A folder of lm-eval task YAML files (local tasks, offline when their data is).")
    suite: Literal["none", "open-llm-v1"] = arg(
        "none", "open-llm-v1: the Open LLM Leaderboard v1 tasks at its few-shot counts (arc_challenge 25, "
        "hellaswag 10, mmlu 5, truthfulqa_mc2 0, winogrande 5, gsm8k 5); their data needs the network once.")
    num_fewshot: int = arg(-1, "Few-shot examples for every task (-1: each task's own, or the suite's count).")
    limit: int = arg(0, "Score at most this many items of each task (0: all).")
    batch_size: int = arg(8, "lm-eval's batch size: requests per forward pass of a local model, per request to an "
                          "endpoint.")
    seed: int = arg(1234, "Seed of the few-shot sampling and of any sampling (lm-eval's default, 1234).")
    output: str = arg("", "Output folder: results.json, report.md, config.yaml.")

    def validate(self) -> list[str]:
        missing = lm_eval_problem()
        if missing:
            return [missing]
        problems = self.model_problems()
        if not self.output:
            problems.append("--output is required")
        if not task_names(self.tasks) and self.suite == "none":
            problems.append("--tasks or --suite is required")
        if self.include_path and not Path(self.include_path).is_dir():
            problems.append(f"--include-path: no such folder: {self.include_path}")
        if self.num_fewshot < -1:
            problems.append(f"--num-fewshot must be >= 0, or -1 for each task's own (got {self.num_fewshot})")
        for name, low in (("limit", 0), ("batch_size", 1)):
            if getattr(self, name) < low:
                problems.append(f"--{flag(name)} must be >= {low} (got {getattr(self, name)})")
        if self.generation_batch_size != ModelOptions.generation_batch_size:
            problems.append("--generation-batch-size does not apply to eval-bench: use --batch-size")
        if self.tokenizer and not self.model_url:
            problems.append("--tokenizer is for --model-url (a local model brings its own)")
        if self.model_url and lm_eval_problem(ENDPOINT_MODULES):
            problems.append(f"--model-url: {lm_eval_problem(ENDPOINT_MODULES)}")
        return problems


def lm_eval_problem(modules: tuple[str, ...] = ("lm_eval",)) -> str | None:
    """The one line to print when lm-eval (or what its endpoint models need) is not installed; None
    when it is. Imports nothing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    if modules == ("lm_eval",):
        return f"this needs EleutherAI's lm-evaluation-harness, which is not installed: {INSTALL_HINT}"
    return f"lm-eval's endpoint models need {', '.join(missing)} (lm-eval's `api` extra): {INSTALL_HINT}"


def task_names(tasks: str) -> list[str]:
    return [t.strip() for t in tasks.split(",") if t.strip()]


# ------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class BenchTask:
    """One requested task or group: its few-shot count (None: the task's own) and preferred metric."""

    name: str
    source: str           # the flag it came from, for error messages
    num_fewshot: int | None
    metric: str = ""      # "metric" or "metric,filter"; "": the task's first metric


def task_plan(tasks: str, suite: str, num_fewshot: int = -1) -> list[BenchTask]:
    """The suite's tasks (at its few-shot counts and metrics), then ``tasks``; ``num_fewshot`` >= 0
    overrides every count."""
    override = num_fewshot if num_fewshot >= 0 else None
    plan = [BenchTask(name, f"--suite {suite}", override if override is not None else shots, metric)
            for name, (shots, metric) in SUITES.get(suite, {}).items()]
    known = {t.name for t in plan}
    plan += [BenchTask(name, "--tasks", override) for name in task_names(tasks) if name not in known]
    return plan


def quiet_lm_eval() -> None:
    """lm-eval's per-task notes (default aggregations, few-shot overrides) are noise here."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    logging.getLogger("lm-eval").setLevel(logging.ERROR)


def task_manager(names: list[str], include_path: str = ""):
    """lm-eval's ``TaskManager`` over ``include_path``, and over lm-eval's own ~14k task files only when
    a name is not found there (indexing them takes several seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=include_path or None)


@dataclass(frozen=True)
class LoadedTasks:
    """Tasks ready to run: lm-eval's Task/Group objects and the manager that built them."""

    manager: Any
    objects: list


def load_tasks(plan: list[BenchTask], include_path: str = "") -> LoadedTasks:
    """lm-eval Task/Group objects for ``plan``, their data loaded and their few-shot counts set.

    A task whose data cannot be fetched (no network), an unknown name or a broken task file is an
    :class:`InputError` naming the task: nothing else has run yet.
    """
    quiet_lm_eval()
    manager = task_manager([task.name for task in plan], include_path)
    objects = []
    for task in plan:
        try:
            loaded = manager.load([task.name])
        except Exception as e:  # noqa: BLE001 - any failure of a task's files or data is the task's problem
            raise InputError(task_load_problem(task, e)) from None
        found = loaded["groups"].get(task.name) or loaded["tasks"].get(task.name)
        members = [found] if found is not None else list(loaded["tasks"].values())  # a tag: its tasks
        for leaf in loaded["tasks"].values():
            if task.num_fewshot is not None:
                leaf.set_config(key="num_fewshot", value=task.num_fewshot)
        objects += members
    return LoadedTasks(manager, objects)


def task_load_problem(task: BenchTask, error: Exception) -> str:
    """One line for a task that did not load."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0].strip("\"'")
    where = f"{task.source}: task {task.name}"
    if isinstance(error, ConnectionError) or "Couldn't reach" in detail or "offline" in detail.lower():
        return f"{where}: its data could not be fetched (offline? it is downloaded once, then cached): {detail}"
    if isinstance(error, KeyError):
        return f"{where}: lm-eval knows no such task (built in, or a YAML file under --include-path)"
    return f"{where}: could not be loaded ({type(error).__name__}: {detail})"


# ------------------------------------------------------------------------ models


def local_lm(model, tokenizer, batch_size: int):
    """lm-eval's ``hf`` model over a model rlhfkit loaded (its dtype and device kept)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def endpoint_lm(url: str, name: str, tokenizer: str, api_key: str | None, batch_size: int, concurrency: int,
                timeout: float, seed: int):
    """lm-eval's ``local-completions`` model on an OpenAI-compatible ``/v1/completions`` endpoint.

    The key goes in the Authorization header only (lm-eval would otherwise send ``OPENAI_API_KEY``).
    """
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from rlhfkit.models.backends import completions_url
    from rlhfkit.models.loading import resolve_model

    header = {"Authorization": f"Bearer {api_key}"} if api_key else {"Accept": "application/json"}
    try:
        return LocalCompletionsAPI(base_url=completions_url(url), model=name, tokenizer=resolve_model(tokenizer),
                                   tokenizer_backend="huggingface", batch_size=batch_size, num_concurrent=concurrency,
                                   timeout=int(timeout), max_retries=3, seed=seed, header=header)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"--tokenizer {tokenizer}: cannot load a tokenizer from it ({first})") from None


def run_tasks(lm, tasks: LoadedTasks, limit: int = 0, seed: int = 1234) -> dict:
    """lm-eval's ``simple_evaluate`` on loaded tasks: its raw results dict (few-shot counts as set)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks.objects, task_manager=tasks.manager, limit=limit or None,
                           log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


# ------------------------------------------------------------------------ results


def _leaves(raw: dict, name: str) -> list[str]:
    """The leaf tasks under ``name`` (itself for a task), through nested groups."""
    subtasks = raw.get("group_subtasks", {}).get(name)
    if not subtasks:
        return [name]
    return [leaf for sub in subtasks for leaf in _leaves(raw, sub)]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def task_row(raw: dict, task: BenchTask) -> dict:
    """``{metric, filter, value, stderr, n, num_fewshot, metrics}`` of one requested task or group.

    ``metric``: the task's preferred one (the suite's), else its first; ``metrics``: every metric
    lm-eval reported for it (``"name,filter"`` -> value).
    """
    scores = raw["results"][task.name]
    metrics = {key: value for key, value in scores.items()
               if "," in key and "_stderr," not in key and _number(value) is not None}
    if not metrics:
        raise InputError(f"{task.source}: task {task.name}: lm-eval reported no metric for it")
    wanted = task.metric if "," in task.metric else f"{task.metric},none"
    key = wanted if wanted in metrics else next(iter(metrics))
    metric, _, filter_name = key.partition(",")
    leaves = _leaves(raw, task.name)
    shots = raw.get("n-shot", {})
    return {"metric": metric, "filter": filter_name, "value": metrics[key],
            "stderr": _number(scores.get(f"{metric}_stderr,{filter_name}")),
            "n": sum(raw["n-samples"][leaf]["effective"] for leaf in leaves if leaf in raw.get("n-samples", {})),
            "num_fewshot": shots.get(task.name, shots.get(leaves[0])), "metrics": metrics}


def bench_report(label: str, rows: dict[str, dict], version: str, wall: float) -> str:
    from rlhfkit.evaluation.report import fmt_num, md_escape, md_table

    table = md_table(["task", "metric", "value", "± stderr", "n", "few-shot"],
                     [[md_escape(name), md_escape(r["metric"] + ("" if r["filter"] == "none" else f" ({r['filter']})")),
                       fmt_num(r["value"], 4), fmt_num(r["stderr"], 4), r["n"], r["num_fewshot"]]
                      for name, r in rows.items()], align=["l", "l", "r", "r", "r", "r"])
    return (f"# eval-bench: {md_escape(label)}\n\nlm-eval {version}, {len(rows)} task(s), "
            f"{wall:.1f} s\n\n{table}\n")


# ------------------------------------------------------------------------ a bench task per checkpoint (eval-frontier)


@dataclass
class CheckpointBench:
    """One task, loaded once, scored on model after model: ``bench(model, tokenizer) -> value`` of its
    metric (``eval-frontier --y-bench``: the reward model's score against a benchmark)."""

    task: BenchTask
    tasks: LoadedTasks
    limit: int = 0
    seed: int = 1234
    batch_size: int = 8
    metric: str = ""  # the metric scored, known after the first model

    @classmethod
    def load(cls, name: str, include_path: str = "", limit: int = 0, seed: int = 1234,
             batch_size: int = 8) -> CheckpointBench:
        (task,) = task_plan(name, "none")
        return cls(task, load_tasks([task], include_path), limit, seed, batch_size)

    @property
    def label(self) -> str:
        return f"{self.task.name} {self.metric}".strip()

    def __call__(self, model, tokenizer) -> float:
        row = task_row(run_tasks(local_lm(model, tokenizer, self.batch_size), self.tasks, self.limit, self.seed),
                       self.task)
        self.metric = row["metric"]
        return row["value"]


def plot_reward_vs_bench(points: list[dict], path: Path, reward_label: str, bench_label: str) -> None:
    """The objective mismatch: each checkpoint's reward (x) against its benchmark metric (y), in step order."""
    from rlhfkit.evaluation.report import new_figure, save_figure

    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot([p["reward"] for p in points], [p["bench"] for p in points], marker="o")
    for p in points:
        ax.annotate(str(p["step"]), (p["reward"], p["bench"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(reward_label)
    ax.set_ylabel(bench_label)
    ax.set_title("Reward-model score vs benchmark over checkpoints")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


# ------------------------------------------------------------------------ the command


def model_under_test(cfg: Config):
    """(lm-eval model, label for reports): the endpoint, or the local model loaded by rlhfkit."""
    import os

    if cfg.model_url:
        from rlhfkit.models.backends import completions_url, redact_url

        lm = endpoint_lm(cfg.model_url, cfg.model_name, cfg.tokenizer or cfg.model_name,
                         os.environ.get(cfg.api_key_env) or None, cfg.batch_size, cfg.concurrency,
                         cfg.request_timeout, cfg.seed)
        return lm, f"{redact_url(completions_url(cfg.model_url))} ({cfg.model_name})"
    from rlhfkit.models.loading import load_policy

    model, tokenizer = load_policy(cfg.model, cfg.dtype)
    return local_lm(model, tokenizer, cfg.batch_size), cfg.model


def main(cfg: Config) -> int:
    import importlib.metadata

    from rlhfkit.config import config_to_dict
    from rlhfkit.evaluation.report import write_json, write_text

    plan = task_plan(validated(cfg).tasks, cfg.suite, cfg.num_fewshot)
    tasks = load_tasks(plan, cfg.include_path)  # data fetched before any model loads
    lm, label = model_under_test(cfg)
    start = time.perf_counter()
    try:
        raw = run_tasks(lm, tasks, cfg.limit, cfg.seed)
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - an endpoint that fails mid-run: one line, exit 1
        if not cfg.model_url:
            raise
        raise BackendError(f"{label}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e
    wall = time.perf_counter() - start
    rows = {task.name: task_row(raw, task) for task in plan}
    version = importlib.metadata.version("lm_eval")
    out = Path(cfg.output)
    save_config(cfg, out)
    write_json(out / "results.json", {"model": label, "lm_eval_version": version, "wall_seconds": round(wall, 2),
                                      "tasks": rows, "config": config_to_dict(cfg)})
    report = bench_report(label, rows, version, wall)
    write_text(out / "report.md", report)
    print(report)
    print(f"wrote {out / 'results.json'}")
    return 0
