"""Data from where users keep it: Hugging Face dataset ids (read offline from a datasets cache built
here), seeded mixtures with ratios, the grammar that tells paths, ids, splits and ratios apart, and
bad input (exit 2, one line naming the source, no traceback)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from core_helpers import read_metrics, write_jsonl
from rlhfkit.data.io import DataSource, mixture_counts, parse_data_spec, read_records
from rlhfkit.data.schema import load_sft
from rlhfkit.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

HUB_ID = "tiny-org/tiny_sft"
HUB_SPLITS = {
    "train": [{"prompt": f"hub question {i}", "completion": f"hub answer {i}."} for i in range(6)],
    "validation": [{"prompt": "hub held-out", "completion": "kept apart."}],
    "test": [{"prompt": "fine", "completion": "ok."}, {"prompt": "broken", "completion": "  "}],
}
CONFIGS_ID = "tiny-org/two_configs"  # configurations `first` and `other`, no default
OTHER_CONFIG = {"train": [{"prompt": f"other question {i}", "completion": f"other answer {i}."} for i in range(3)]}


def cache_hub_dataset(cache: Path, work: Path, repo_id: str, config: str, splits: dict[str, list[dict]]) -> None:
    """Put ``repo_id`` into the datasets cache ``cache`` the way ``load_dataset`` leaves a Hub dataset
    after downloading it: ``org___name/CONFIG/0.0.0/HASH/`` with one ``name-SPLIT.arrow`` per split and a
    ``dataset_info.json`` naming the config. Offline (HF_DATASETS_OFFLINE=1), ``load_dataset(repo_id,
    config, split=...)`` finds the Hub unreachable and reads this entry (datasets'
    CachedDatasetModuleFactory and its `cache` builder), which is what a user who loaded the dataset
    once online gets. Built with datasets' own JSON builder, then moved under the Hub id's folder."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    org, name = repo_id.split("/")
    files = {split: [write_jsonl(work / config / f"{split}.jsonl", rows)] for split, rows in splits.items()}
    builder = Json(cache_dir=str(work / "build"), dataset_name=name, config_name=config, hash="0123abcd",
                   data_files=DataFilesDict.from_patterns(files))
    builder.download_and_prepare()
    target = cache / f"{org}___{name}" / config / "0.0.0"
    target.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target / "0123abcd")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A datasets cache holding HUB_ID and CONFIGS_ID."""
    cache, work = tmp_path_factory.mktemp("hf_datasets_cache"), tmp_path_factory.mktemp("hub_build")
    cache_hub_dataset(cache, work / "one", HUB_ID, "default", HUB_SPLITS)
    cache_hub_dataset(cache, work / "two", CONFIGS_ID, "first", HUB_SPLITS)
    cache_hub_dataset(cache, work / "two", CONFIGS_ID, "other", OTHER_CONFIG)
    return cache


@pytest.fixture
def offline_cache(hub_cache, monkeypatch) -> Path:
    """This process reads datasets offline from ``hub_cache`` (the environment variables are read
    when `datasets` is imported, so in-process the values are set on datasets.config)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return hub_cache


@pytest.fixture
def local_files(tmp_path, monkeypatch) -> Path:
    """a.jsonl (10 records), b.jsonl (2), a file with a colon and one with a comma in its name, and a
    saved DatasetDict folder; the working directory is their folder."""
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": f"a{i}", "completion": "x"} for i in range(10)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(2)])
    write_jsonl(tmp_path / "odd:name.jsonl", rows[:1])
    write_jsonl(tmp_path / "with,comma.jsonl", rows[:1])
    DatasetDict({"train": Dataset.from_list(rows[:2]), "test": Dataset.from_list(rows[2:3])}).save_to_disk(
        str(tmp_path / "saved"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------ the grammar


def _local(path, split=None, ratio=None):
    return DataSource(path, dataset_id=False, split=split, ratio=ratio)


def _hub(name, split="train", ratio=None):
    return DataSource(name, dataset_id=True, split=split, ratio=ratio)


GRAMMAR = {
    "org/name": [_hub("org/name")],
    "name": [_hub("name")],
    "org/name:test": [_hub("org/name", "test")],
    "org/name:train[:10%]": [_hub("org/name", "train[:10%]")],  # a colon inside a split
    "org/name:0.5,a.jsonl:0.5": [_hub("org/name", ratio=0.5), _local("a.jsonl", ratio=0.5)],
    "org/name:train[:3]:2,a.jsonl:1": [_hub("org/name", "train[:3]", 2.0), _local("a.jsonl", ratio=1.0)],
    "org/name:test:1e-1, b.jsonl:.9": [_hub("org/name", "test", 0.1), _local("b.jsonl", ratio=0.9)],
    "a.jsonl": [_local("a.jsonl")],
    "a.jsonl,b.jsonl": [_local("a.jsonl"), _local("b.jsonl")],
    "odd:name.jsonl": [_local("odd:name.jsonl")],  # an existing path wins over name:split
    "odd:name.jsonl:0.25,a.jsonl:0.75": [_local("odd:name.jsonl", ratio=0.25), _local("a.jsonl", ratio=0.75)],
    "with,comma.jsonl": [_local("with,comma.jsonl")],  # ... and over the comma of a mixture
    "saved:test": [_local("saved", "test")],  # a split of a saved DatasetDict folder
    "teknium/OpenHermes-2.5": [_hub("teknium/OpenHermes-2.5")],  # a dot is not a file suffix
    "missing.jsonl": [_local("missing.jsonl")],  # a data-file suffix: a path, not an id
    "org/missing.parquet:0.5,a.jsonl:0.5": [_local("org/missing.parquet", ratio=0.5), _local("a.jsonl", ratio=0.5)],
    "data/sub/x": [_local("data/sub/x")],  # two slashes: not an id
}


@pytest.mark.parametrize("spec", list(GRAMMAR))
def test_the_grammar_tells_paths_ids_splits_and_ratios_apart(spec, local_files):
    assert parse_data_spec(spec) == GRAMMAR[spec]


ONE_SOURCE_RATIO = "a ratio is a share of a mixture of two or more sources (e.g. a.jsonl:0.7,org/name:0.3)"
BAD_GRAMMAR = {
    "a.jsonl:0,b.jsonl:1": "a.jsonl:0: the ratio must be a finite number > 0 (got 0)",
    "a.jsonl:-0.3,b.jsonl:1": "a.jsonl:-0.3: the ratio must be a finite number > 0 (got -0.3)",
    "a.jsonl:1e999,b.jsonl:1": "a.jsonl:1e999: the ratio must be a finite number > 0 (got 1e999)",
    "a.jsonl:0.5": f"a.jsonl:0.5: {ONE_SOURCE_RATIO}",
    "org/name:1": f"org/name:1: {ONE_SOURCE_RATIO}",  # a number after the last colon is a ratio, not a split
    "a.jsonl,b.jsonl:1": "a.jsonl,b.jsonl:1: give every source of a mixture a ratio, or none",
    "a.jsonl,,b.jsonl": "a.jsonl,,b.jsonl: an empty source (two commas in a row, or a comma at an end)",
    "a.jsonl:test": "a.jsonl:test: a split (:test) belongs to a dataset id or a saved `datasets` folder, "
                    "and a.jsonl is a file",
    "org/name:": "org/name:: expected name:split (one of them is empty)",
    "https://example.org/d.jsonl": "https://example.org/d.jsonl: URLs are not read: download the file, "
                                   "or give the Hugging Face dataset id",
}


@pytest.mark.parametrize("spec", list(BAD_GRAMMAR))
def test_bad_grammar_is_one_clear_line(spec, local_files):
    with pytest.raises(InputError) as e:
        parse_data_spec(spec)
    assert e.value.problems == [BAD_GRAMMAR[spec]]


# ------------------------------------------------------------------------------------ mixtures


@pytest.mark.parametrize("sizes, ratios, counts", [
    ([10, 2], [0.7, 0.3], [8, 4]),      # 12 × 0.7 = 8.4, 12 × 0.3 = 3.6: the larger remainder gets the 12th
    ([2, 1], [1, 1], [2, 1]),           # 1.5 and 1.5: a tie goes to the earlier source
    ([3, 3], [1, 2], [2, 4]),           # ratios are relative: 1:2 of 6
    ([4, 4], [0.5, 0.5], [4, 4]),
    ([100, 1, 1], [1, 1, 1], [34, 34, 34]),  # 102 / 3 each: small sources repeat
])
def test_mixture_counts_by_hand(sizes, ratios, counts):
    assert mixture_counts(sizes, ratios) == counts
    assert sum(counts) == sum(sizes)


def _origins(records) -> list[tuple[str, int]]:
    return [(r.file, r.line) for r in records]


def test_a_mixture_takes_the_ratios_and_is_a_pure_function_of_the_seed(local_files):
    spec = "a.jsonl:0.7,b.jsonl:0.3"
    mixed = read_records(spec, seed=3)
    per_file = Counter(r.file for r in mixed)
    assert per_file == {"a.jsonl": 8, "b.jsonl": 4}  # mixture_counts([10, 2], [0.7, 0.3])
    a_lines = [r.line for r in mixed if r.file == "a.jsonl"]
    assert len(set(a_lines)) == 8 and set(a_lines) <= set(range(1, 11))  # a sample, no record twice
    assert Counter(r.line for r in mixed if r.file == "b.jsonl") == {1: 2, 2: 2}  # each record twice
    assert all(r.data["prompt"] == f"{r.file[0]}{r.line - 1}" for r in mixed)  # the records themselves

    assert _origins(read_records(spec, seed=3)) == _origins(mixed)  # same seed, same records, same order
    others = [_origins(read_records(spec, seed=s)) for s in (4, 5, 6)]
    assert any(sorted(o) != sorted(_origins(mixed)) for o in others)  # another seed, another sample of a
    assert _origins(mixed) != sorted(_origins(mixed))  # shuffled, not a then b


def test_a_mixture_without_ratios_takes_every_record_once(local_files):
    mixed = read_records("a.jsonl,b.jsonl", seed=0)
    assert sorted(_origins(mixed)) == sorted([("a.jsonl", i) for i in range(1, 11)] + [("b.jsonl", 1), ("b.jsonl", 2)])


def test_a_single_source_keeps_its_order(local_files):
    assert [r.line for r in read_records("a.jsonl", seed=7)] == list(range(1, 11))


def test_a_bad_record_in_a_mixture_names_its_file_and_line_once(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": f"q{i}", "completion": "c"} for i in range(9)])
    with pytest.raises(InputError) as e:
        load_sft(f"{bad}:0.9,{good}:0.1", seed=0)  # bad.jsonl:1 is drawn 9 times
    assert e.value.problems == [f"{bad}:1: field 'completion': missing field"]


def test_every_missing_source_of_a_mixture_is_reported(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "q", "completion": "c"}])
    with pytest.raises(InputError) as e:
        read_records(f"{tmp_path}/x.jsonl:1,{good}:1,{tmp_path}/y.parquet:1")
    assert e.value.problems == [f"{tmp_path}/x.jsonl: no such file or directory",
                                f"{tmp_path}/y.parquet: no such file or directory"]


def test_a_split_of_a_saved_datasets_folder(local_files):
    assert [r.data["prompt"] for r in read_records("saved")] == ["a0", "a1"]  # train, as before
    (record,) = read_records("saved:test")
    assert (record.data["prompt"], record.file, record.line) == ("a2", "saved:test", 1)
    with pytest.raises(InputError) as e:
        read_records("saved:dev")
    assert e.value.problems == ["saved:dev: no such split (the folder has train, test)"]


# ------------------------------------------------------------------------------------ dataset ids


def test_a_dataset_id_reads_offline_from_the_cache(offline_cache):
    records = read_records(HUB_ID)
    assert [r.data for r in records] == HUB_SPLITS["train"]
    assert {r.file for r in records} == {f"{HUB_ID}:train"} and [r.line for r in records] == list(range(1, 7))
    assert [r.data for r in read_records(f"{HUB_ID}:validation")] == HUB_SPLITS["validation"]
    assert [r.data for r in read_records(CONFIGS_ID, config="other")] == OTHER_CONFIG["train"]
    assert [r.data for r in read_records(f"{CONFIGS_ID}:test", config="first")] == HUB_SPLITS["test"]


def test_a_dataset_record_names_the_id_split_and_row(offline_cache):
    with pytest.raises(InputError) as e:
        load_sft(f"{HUB_ID}:test")
    assert e.value.problems == [f"{HUB_ID}:test:2: field 'completion': is empty"]


def test_a_mixture_of_a_file_and_a_dataset_id(offline_cache, local_files):
    mixed = read_records(f"b.jsonl:1,{HUB_ID}:train:2", seed=0)  # 8 records: 1/3 and 2/3 of them
    assert Counter(r.file for r in mixed) == {"b.jsonl": 3, f"{HUB_ID}:train": 5}


@pytest.mark.parametrize("spec, config, reason", [
    ("tiny-org/absent", "", "(offline: only datasets already in the datasets cache load): ConnectionError: "
                            "Couldn't reach 'tiny-org/absent' on the Hub (OfflineModeIsEnabled)"),
    (f"{HUB_ID}:nosuch", "", "(offline: only datasets already in the datasets cache load): ValueError: "
                             "Unknown split \"nosuch\". Should be one of ['train', 'validation', 'test']."),
    (CONFIGS_ID, "nosuch", "(offline: only datasets already in the datasets cache load): ValueError: "
                           f"Couldn't find cache for {CONFIGS_ID} for config 'nosuch'; Available configs in the "
                           "cache: ['first', 'other']"),
    (CONFIGS_ID, "", "(offline: only datasets already in the datasets cache load): ValueError: There are multiple "
                     f"'{CONFIGS_ID}' configurations in the cache: "),
])
def test_a_dataset_that_does_not_load_is_one_line(spec, config, reason, offline_cache):
    name, _, split = spec.partition(":")
    with pytest.raises(InputError) as e:
        read_records(spec, config=config)
    (line,) = e.value.problems
    configured = f" (config {config!r})" if config else ""
    assert line.startswith(f"{name}:{split or 'train'}: no such local file or folder, and the Hugging Face "
                           f"dataset {name!r}{configured} did not load {reason}")


# ------------------------------------------------------------------------------------ through the CLI


def test_sft_trains_on_a_dataset_id_offline_through_the_cli(hub_cache, tiny_lm, tmp_path):
    """The user's route: environment variables, a fresh process, HF_DATASETS_OFFLINE=1."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_DATASETS_CACHE": str(hub_cache),
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "rlhfkit", "sft", "--model", tiny_lm, "--data", f"{HUB_ID}:train",
         "--eval-data", f"{HUB_ID}:validation", "--output", str(out), "--max-steps", "2", "--batch-size", "2",
         "--lr", "1e-3", "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert any("eval/loss" in r for r in rows)
    assert yaml.safe_load((out / "config.yaml").read_text())["data"] == f"{HUB_ID}:train"

    result = subprocess.run(
        [sys.executable, "-m", "rlhfkit", "sft", "--model", tiny_lm, "--data", "tiny-org/absent",
         "--output", str(tmp_path / "o2")], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: tiny-org/absent:train: no such local file or folder")


def test_data_config_reaches_the_loader(run_cli, offline_cache, tiny_lm):
    result = run_cli("inspect-data", "--model", tiny_lm, "--data", CONFIGS_ID, "--data-config", "other", "--index", "1",
                     "--no-color")
    assert result.code == 0, result.err
    assert result.out.startswith(f"example 1 of 3: {CONFIGS_ID}:train:2\n")  # `other` has 3 records, `first` 6
    assert "[o][t][h][e][r][ ][a][n][s][w][e][r][ ][1][.]" in result.out


@pytest.mark.parametrize("command, flag, extra", [
    ("sft", "--data", ["--output", "{out}"]),
    ("rm", "--eval-data", ["--data", "{good}", "--output", "{out}"]),
    ("dpo", "--data", ["--output", "{out}"]),
    ("ppo", "--prompts", ["--reward", "{good}", "--output", "{out}"]),
    ("rejection-sampling", "--prompts", ["--reward", "{good}", "--output", "{out}"]),
    ("generate", "--prompts", ["--output", "{out}"]),
    ("eval-rm", "--data", ["--reward", "{good}"]),
    ("inspect-data", "--data", []),
])
def test_bad_data_values_exit_2_before_any_model_is_loaded(command, flag, extra, run_cli, no_model_loading, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "q", "completion": "c", "chosen": "a", "rejected": "b"}])
    extra = [e.format(good=good, out=tmp_path / "out") for e in extra]
    missing = tmp_path / "missing.parquet"
    result = run_cli(command, flag, f"{good}:0.7,{missing}:0.3", *extra)
    assert result.code == 2
    assert f"error: {flag}: no such file or directory: {missing}" in result.errors
    result = run_cli(command, flag, f"{good}:0.7,{good}:0", *extra)
    assert result.code == 2
    assert f"error: {flag}: {good}:0: the ratio must be a finite number > 0 (got 0)" in result.errors
    assert no_model_loading == []
