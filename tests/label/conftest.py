"""Fixtures for the label app: databases (SQLite, and PostgreSQL where a server can be started),
users, items, an in-process TestClient and a real uvicorn server on loopback."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from rlhfkit.label.db import Database

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# PostgreSQL: a throwaway server (unix socket only) when the binaries are installed
# --------------------------------------------------------------------------------------------


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server for this test session, or a skip saying why there is none.

    ``RLHFKIT_TEST_PG_URL`` (a SQLAlchemy URL of a server where databases may be created) is used
    when set; otherwise ``initdb``/``pg_ctl`` start one in a temporary folder.
    """
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    if os.environ.get("RLHFKIT_TEST_PG_URL"):
        yield os.environ["RLHFKIT_TEST_PG_URL"]
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        run_as = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="rlhfkit-pg-"))
    data = base / "data"
    if run_as:
        shutil.chown(base, "postgres")
        os.chmod(base, 0o700)
    env = {**os.environ, "LC_ALL": "C"}
    try:
        subprocess.run(run_as + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                                 "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, env=env, timeout=120)
        subprocess.run(run_as + [pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
                                 "-o", f"-c listen_addresses='' -k {base} -c fsync=off "
                                       "-c max_connections=200",
                                 "start"], check=True, capture_output=True, env=env, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        out = getattr(e, "stderr", b"") or b""
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {e} {out.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={base}"
    finally:
        subprocess.run(run_as + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _new_pg_database(server_url: str) -> str:
    """A URL whose connections work in a fresh, empty schema (cheaper than a database each)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = "label_" + uuid.uuid4().hex[:12]
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{name}"'))
    engine.dispose()
    url = make_url(server_url)
    url = url.set(query={**url.query, "options": f"-csearch_path={name}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh label database URL: a SQLite file, then a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        return str(tmp_path / "labels.db")
    return _new_pg_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def db(db_url):
    d = Database(db_url)
    yield d
    d.dispose()


@pytest.fixture
def sqlite_db(tmp_path):
    d = Database(str(tmp_path / "labels.db"))
    yield d
    d.dispose()


@pytest.fixture
def client_for():
    """``client_for(db, **kw)`` -> a TestClient over ``create_app(db, **kw)``."""
    from fastapi.testclient import TestClient

    from rlhfkit.label.app import create_app

    clients = []

    def make(db: Database, **kw):
        c = TestClient(create_app(db, **kw))
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


# --------------------------------------------------------------------------------------------
# A real server: `python -m rlhfkit label serve` on a free loopback port
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, db: str, log: Path, extra: tuple[str, ...] = ()):
        self.db = db
        self.extra = list(extra)
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 60.0) -> LiveServer:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for _attempt in range(3):
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            self._log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rlhfkit", "label", "serve", "--db", self.db,
                 "--host", "127.0.0.1", "--port", str(port), *self.extra],
                stdout=self._log, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            self.stop()  # the port was taken in between, or it failed: try another port
        raise RuntimeError(f"the label server did not start; log:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture
def live_server(tmp_path):
    """``live_server(db_path, *flags)`` starts ``rlhfkit label serve`` and returns it (stopped at the end)."""
    servers = []

    def start(db: str, *flags: str) -> LiveServer:
        server = LiveServer(db, tmp_path / f"server{len(servers)}.log", flags).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


