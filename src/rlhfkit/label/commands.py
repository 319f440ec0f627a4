"""``rlhfkit label serve | add-user | import | export``: the command-line side of the label app.

Each command is a function with a ``<Name>Config`` dataclass (see :mod:`rlhfkit.config`);
``--db`` is a SQLAlchemy URL (``postgresql+psycopg://user@host/db``) or a plain file path, which
means a SQLite file in WAL mode (created on first use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from rlhfkit.config import arg, validated
from rlhfkit.errors import InputError

DB_HELP = ("The label database: a SQLAlchemy URL (e.g. postgresql+psycopg://user@host/labels) "
           "or a file path for SQLite (WAL mode).")


def db_problems(db: str) -> list[str]:
    if not db:
        return ["--db is required"]
    if "://" in db:
        try:
            from sqlalchemy.engine import make_url

            make_url(db)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad flag
            return [f"--db: not a valid database URL: {e}"]
        return []
    parent = os.path.dirname(os.path.abspath(os.path.expanduser(db)))
    if not os.path.isdir(parent):
        return [f"--db: the folder {parent} does not exist"]
    return []


def _open(db: str):
    from sqlalchemy.exc import SQLAlchemyError

    from rlhfkit.label.db import Database

    try:
        return Database(db)
    except (SQLAlchemyError, ImportError) as e:
        raise InputError(f"--db {db}: cannot open the database: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    """Run the feedback web app (pairs, ranking tasks, and live tasks with --live-url)."""

    db: str = arg("labels.db", DB_HELP)
    host: str = arg("127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
    port: int = arg(8000, "Port to listen on.")
    lease_minutes: float = arg(30.0, "An item served to an annotator holds one of its slots this "
                               "long; after that, if not judged, the slot is offered to others.")
    secure_cookies: bool = arg(False, "Mark the session cookie Secure (when served over HTTPS).")
    access_log: bool = arg(False, "Log every request (off by default: sign-in URLs carry tokens).")
    live_url: list[str] = arg(default_factory=list, help="OpenAI-compatible endpoint for live tasks (e.g. "
                              "http://127.0.0.1:8001/v1 from `rlhfkit serve`). Once: two replies sampled from one "
                              "model; twice: one reply from each of two models.")
    live_model: list[str] = arg(default_factory=list, help="The model name sent to each --live-url, in order.")
    live_api_key_env: str = arg("OPENAI_API_KEY", "Environment variable holding the live endpoints' API key "
                                "(unset: no key sent; never written anywhere).")
    live_temperature: float = arg(0.8, "Sampling temperature of the live replies (> 0 with one model, or both "
                                  "replies are the same).")
    live_max_tokens: int = arg(256, "Longest live reply, in tokens.")

    def validate(self) -> list[str]:
        problems = db_problems(self.db)
        if len(self.live_url) > 2 or len(self.live_model) != len(self.live_url):
            problems.append(f"--live-url and --live-model go together, once or twice (got {len(self.live_url)} "
                            f"--live-url, {len(self.live_model)} --live-model)")
        if self.live_temperature < 0 or self.live_max_tokens < 1:
            problems.append("--live-temperature must be >= 0 and --live-max-tokens >= 1")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be in 0..65535 (got {self.port})")
        if self.lease_minutes <= 0:
            problems.append(f"--lease-minutes must be > 0 (got {self.lease_minutes})")
        return problems


def serve(cfg: ServeConfig) -> int:
    import uvicorn

    from rlhfkit.label.app import create_app

    db = _open(validated(cfg).db)
    live_models = None
    if cfg.live_url:
        from rlhfkit.label.live import LiveModels

        live_models = LiveModels.from_flags(cfg.live_url, cfg.live_model, os.environ.get(cfg.live_api_key_env) or None,
                                            cfg.live_temperature, cfg.live_max_tokens)
    app = create_app(db, lease_seconds=cfg.lease_minutes * 60, secure_cookies=cfg.secure_cookies,
                     live_models=live_models)
    print(f"rlhfkit label: serving {db.engine.url.render_as_string(hide_password=True)} "
          f"on http://{cfg.host}:{cfg.port}/ (sign in with /?token=TOKEN)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, access_log=cfg.access_log, log_level="info")
    return 0


# --------------------------------------------------------------------------------------------


@dataclass
class AddUserConfig:
    """Add an annotator or an admin; the token is printed as the last line."""

    name: str = arg(None, "The user's name (unique).", positional=True)
    role: Literal["annotator", "admin"] = arg("annotator", "annotator: judges items; admin: also "
                                              "sees progress, statistics and the export.")
    db: str = arg("labels.db", DB_HELP)
    new_token: bool = arg(False, "If the user exists, give them a new token (the old one and "
                          "their browser sessions stop working) instead of failing.")

    def validate(self) -> list[str]:
        problems = db_problems(self.db)
        if not self.name or not self.name.strip():
            problems.append("NAME is required")
        elif len(self.name) > 200:
            problems.append("NAME: at most 200 characters")
        return problems


def add_user(cfg: AddUserConfig) -> int:
    from rlhfkit.label.service import LabelError
    from rlhfkit.label.service import add_user as _add

    db = _open(validated(cfg).db)
    try:
        user, token, created = _add(db, cfg.name, cfg.role, new_token_if_exists=cfg.new_token)
    except LabelError as e:
        raise InputError(e.message) from None
    finally:
        db.dispose()
    what = "added" if created else "new token for"
    print(f"{what} {user.role} {user.name!r} (id {user.id}); sign in at http://HOST:PORT/?token=<the token below>")
    print(token)
    return 0


# --------------------------------------------------------------------------------------------


@dataclass
class ImportItemsConfig:
    """Import response pairs to be judged (JSONL)."""

    file: str = arg(None, "JSONL with {prompt | messages, response_a, response_b, ...} records, "
                    "or `rlhfkit generate --samples-per-prompt 2` output ({prompt | messages, completions: [a, b]}), "
                    "or ranking tasks ({prompt | messages, completions: [3 or 4 of them]}).",
                    positional=True)
    db: str = arg("labels.db", DB_HELP)
    overlap: int = arg(3, "K: how many different annotators judge each item.")
    extra_on_disagreement: int = arg(0, "When an item's K judgments disagree on the preferred "
                                     "response, send it to this many extra annotators (once).")
    rank_pairs: bool = arg(False, "Import records with 2 `completions` as ranking tasks too (3 or 4 "
                           "completions always are; 2 are otherwise a pair judged on the 8-point scale).")

    def validate(self) -> list[str]:
        problems = db_problems(self.db)
        if not self.file:
            problems.append("FILE is required")
        elif not os.path.isfile(self.file):
            problems.append(f"{self.file}: no such file")
        if self.overlap < 1:
            problems.append(f"--overlap must be >= 1 (got {self.overlap})")
        if self.extra_on_disagreement < 0:
            problems.append(f"--extra-on-disagreement must be >= 0 (got {self.extra_on_disagreement})")
        return problems


def import_items(cfg: ImportItemsConfig) -> int:
    from rlhfkit.label.importer import import_pairs, read_pairs

    # every problem is reported before anything is written
    pairs = read_pairs(validated(cfg).file, rank_pairs=cfg.rank_pairs)
    db = _open(cfg.db)
    try:
        result = import_pairs(db, pairs, cfg.overlap, cfg.extra_on_disagreement)
    finally:
        db.dispose()
    print(f"imported {result.added} items from {cfg.file} (overlap {cfg.overlap}"
          + (f", +{cfg.extra_on_disagreement} on disagreement" if cfg.extra_on_disagreement else "")
          + f"); {result.already_present} already present"
          + (f"; {result.identical} skipped: identical responses" if result.identical else ""))
    return 0


# --------------------------------------------------------------------------------------------


@dataclass
class ExportConfig:
    """Export judgments as preference pairs (prompt/chosen/rejected/margin JSONL) and rankings, or as
    arena battles."""

    db: str = arg("labels.db", DB_HELP)
    output: str = arg("", "Where to write the JSONL (written atomically).")
    format: Literal["pairs", "battles"] = arg("pairs", "pairs: preference pairs and rankings (what `rlhfkit rm` "
                                              "and `rlhfkit dpo` read); battles: one human vote per line between "
                                              "the two named models of an item (what `rlhfkit arena` reads).")
    keep_ties: bool = arg(False, "Keep items whose judgments split evenly, as rows with "
                          "\"tie\": true and margin 0 (by default they are dropped).")
    exclude_flag: list[str] = arg(default_factory=list, help="Drop rows (and battles) that any annotator flagged "
                                  "with this flag on any response (repeat for several), e.g. hallucination.")
    min_agreement: float = arg(0.0, "Keep rows judged by several annotators only when their agreement (share on "
                               "the majority side; for rankings, of the pair orderings) is at least this.")
    min_judgments: int = arg(1, "Keep only rows with at least this many judgments.")
    quadrant: list[str] = arg(
        default_factory=list, help="Keep only pairs in this quadrant, one of good-vs-good, good-vs-bad, bad-vs-good, "
        "bad-vs-bad (repeat for several): each response's own "
        "good/bad votes, the chosen one first (good-vs-bad: chosen good, rejected bad). Pairs without a quadrant "
        "(responses not rated, or split) and rankings are then dropped.")

    def validate(self) -> list[str]:
        from rlhfkit.label.db import FLAGS

        problems = db_problems(self.db)
        problems += [f"--exclude-flag {f!r}: not a flag (known: {', '.join(FLAGS)})"
                     for f in self.exclude_flag if f not in FLAGS]
        if not 0 <= self.min_agreement <= 1:
            problems.append(f"--min-agreement must be in [0, 1] (got {self.min_agreement})")
        if self.min_judgments < 1:
            problems.append(f"--min-judgments must be >= 1 (got {self.min_judgments})")
        quadrants = ("good-vs-good", "good-vs-bad", "bad-vs-good", "bad-vs-bad")
        problems += [f"--quadrant {q!r}: not a quadrant (one of {', '.join(quadrants)})"
                     for q in self.quadrant if q not in quadrants]
        if "://" not in self.db and self.db and not os.path.exists(self.db):
            problems.append(f"--db: no such database file: {self.db}")
        if not self.output:
            problems.append("--output is required")
        return problems


def export(cfg: ExportConfig) -> int:
    from rlhfkit.label.export import Curation, write_battles, write_export

    db = _open(validated(cfg).db)
    curation = Curation(cfg.exclude_flag, cfg.min_agreement, cfg.min_judgments, list(cfg.quadrant))
    try:
        if cfg.format == "battles":
            n = write_battles(db, cfg.output, curation)
            print(f"wrote {n} battles to {cfg.output} (read them with `rlhfkit arena --battles {cfg.output}`)")
            return 0
        result = write_export(db, cfg.output, keep_ties=cfg.keep_ties, curation=curation)
    finally:
        db.dispose()
    ties = (f"{result.ties_kept} ties kept" if cfg.keep_ties
            else f"{result.ties_dropped} evenly split items dropped")
    rankings = f" and {result.rankings} rankings" if result.rankings else ""
    curated = f"; {result.curated_out} dropped by curation" if result.curated_out else ""
    print(f"wrote {result.written - result.rankings} preference pairs{rankings} to {cfg.output} "
          f"({result.items_judged} items judged; {ties}{curated})")
    return 0
