"""A real PostgreSQL for the pool's tests: one cluster per session (scripts/pg_local.sh), a fresh database
per test. Where PostgreSQL is not installed, the tests that need it are skipped and say why."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

PG_LOCAL = Path(__file__).resolve().parents[2] / "scripts" / "pg_local.sh"
NOT_INSTALLED = 3  # pg_local.sh's exit status when it finds no PostgreSQL


@pytest.fixture(scope="session")
def pg_server():
    """The SQLAlchemy URL of a PostgreSQL cluster on loopback, stopped and deleted after the session."""
    folder = tempfile.mkdtemp(prefix="moerge-pg-")  # under /tmp: the server's user must reach it
    started = subprocess.run(["bash", str(PG_LOCAL), "start", folder], capture_output=True, text=True, timeout=180)
    if started.returncode == NOT_INSTALLED:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"needs PostgreSQL: {started.stderr.strip()}")
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"scripts/pg_local.sh start failed ({started.returncode}): {started.stderr.strip()}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(PG_LOCAL), "stop", folder], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A new empty database on the session's cluster, dropped after the test."""
    import psycopg

    admin = pg_server.replace("postgresql+psycopg://", "postgresql://")
    name = f"moerge_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
