"""Data of the local lm-eval tasks in this folder: read from the JSONL next to each task's YAML."""

import json
from pathlib import Path


def load_items(**kwargs):
    """``custom_dataset`` of rlhfkit_basics.yaml: its JSONL as a ``test`` split (no network, any cwd)."""
    import datasets

    path = Path(__file__).with_name("rlhfkit_basics.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
