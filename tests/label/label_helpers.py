"""Helpers shared by the label tests (imported as ``label_helpers``)."""

from __future__ import annotations

from rlhfkit.data.io import write_jsonl  # noqa: F401  (re-exported)
from rlhfkit.label import service
from rlhfkit.label.db import Database
from rlhfkit.label.importer import Pair, import_pairs  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------------------------


def make_pairs(n: int, prefix: str = "q") -> list[Pair]:
    return [Pair(prompt=f"{prefix} question {i}?", response_a=f"answer A{i}",
                 response_b=f"answer B{i}", metadata={"i": i}) for i in range(n)]


def add_users(db: Database, n: int, role: str = "annotator", prefix: str = "ann") -> list[tuple[int, str]]:
    out = []
    for i in range(n):
        user, token, _ = service.add_user(db, f"{prefix}{i}", role)
        out.append((user.id, token))
    return out


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
