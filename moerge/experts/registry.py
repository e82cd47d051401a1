"""The registry of expert cards: one table behind a SQLAlchemy URL (SQLite or PostgreSQL).

SQLite (its busy timeout) and PostgreSQL (`lock_timeout`) wait at most `busy_timeout_s` for another
connection's lock; past it, and on a full disk, every call raises a typed error (RegistryBusyError,
503; StorageFullError, 507) instead of the driver's OperationalError.

Every write also bumps a one-row pool version in the same transaction, so a process can see that
another one changed the pool by reading one integer. On PostgreSQL, `exclusive()` is an advisory
lock that serialises the writers of every process and host sharing the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import (BigInteger, Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text,
                        create_engine, delete, func, insert, select, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from moerge.experts.card import ExpertCard
from moerge.experts.errors import RegistryBusyError, StorageFullError

metadata = MetaData()
experts_table = Table(
    "experts",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("body", Text, nullable=False),
)
# one row (id 1): bumped by every insert, replace and delete, in the writer's transaction
pool_version_table = Table(
    "pool_version",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", BigInteger, nullable=False),
)

# Learning from outcomes (moerge/router/feedback.py), on their own metadata: with SQLite they live in a file of
# their own beside the registry's (feedback.sqlite), so a chat's record never takes the registry's write lock
# or changes its file; with PostgreSQL, in the same database. Neither table bumps the pool version: feedback is
# not a pool change. FeedbackStore creates them with `create_all`, which only adds missing tables.
# What each chat completion routed to, written when it is answered, so feedback can name it by id; bounded
# (FeedbackStore keeps the newest `max_completions` rows and none older than `completion_ttl_s`).
feedback_metadata = MetaData()
completions_table = Table(
    "completions",
    feedback_metadata,
    Column("id", String(64), primary_key=True),          # the response's `chatcmpl-...` id
    Column("created_at", Float, nullable=False, index=True),
    Column("model", String(128), nullable=False),         # what the client asked for: auto, moerge:<m>, an expert
    Column("method", String(64), nullable=False),         # the routing method that decided
    Column("query", Text, nullable=False),                # the text routing looked at (the last user turn)
    Column("plan", Text, nullable=False),                 # JSON: chosen, abstained, plan kind, top scores
)
# One row per feedback: the completion's query (and its embedding), its routing, the score in [0, 1].
feedback_table = Table(
    "feedback",
    feedback_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("completion_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("completed_at", Float, nullable=False),
    Column("method", String(64), nullable=False),
    Column("arm", String(64), nullable=True),             # the one expert that answered, "(base)", or None (mixture)
    Column("score", Float, nullable=False),
    Column("label", String(32), nullable=True),
    Column("query", Text, nullable=False),
    Column("embedding", LargeBinary, nullable=True),      # float32, unit norm: the query's, data masked
    Column("plan", Text, nullable=False),
    Column("source", String(32), nullable=False, default="api"),
    Index("ix_feedback_completion", "completion_id"),
)

# The PostgreSQL advisory lock key of the pool: one pool per database, so one fixed key.
POOL_LOCK_KEY = int.from_bytes(hashlib.sha256(b"moerge expert pool").digest()[:8], "big", signed=True)

Fingerprint = tuple[float, str]  # (created_at, sha256 of the stored row): a new created_at is a new expert


def fingerprint(body: str) -> Fingerprint:
    return float(json.loads(body)["created_at"]), hashlib.sha256(body.encode()).hexdigest()


class Registry:
    def __init__(self, url: str, busy_timeout_s: float = 5.0):
        self.url = url
        self.busy_timeout_s = busy_timeout_s
        self.is_postgres = url.startswith("postgresql")
        if url.startswith("sqlite"):
            kwargs = {"connect_args": {"timeout": busy_timeout_s}}
        elif self.is_postgres:  # lock waits (rows, tables, the advisory lock) end in 55P03 past the timeout
            kwargs = {"connect_args": {"options": f"-c lock_timeout={max(1, round(busy_timeout_s * 1000))}"}}
        else:
            kwargs = {}
        self.engine: Engine = create_engine(url, future=True, **kwargs)
        with self.typed_errors():
            self._create_tables()

    def _create_tables(self) -> None:
        """The tables and the version row; on PostgreSQL under a transaction-level advisory lock, so that
        replicas starting together do not race on CREATE TABLE."""
        with self.engine.begin() as conn:
            if self.is_postgres:
                conn.execute(select(func.pg_advisory_xact_lock(POOL_LOCK_KEY)))
            metadata.create_all(conn)
        try:
            with self.engine.begin() as conn:
                if conn.execute(select(pool_version_table.c.version)).first() is None:
                    conn.execute(insert(pool_version_table).values(id=1, version=0))
        except IntegrityError:  # another SQLite process inserted it first
            pass

    @contextlib.contextmanager
    def typed_errors(self) -> Iterator[None]:
        """SQLite's "database is locked" and "database or disk is full", and PostgreSQL's lock timeout, as the
        errors a client can act on."""
        try:
            yield
        except OperationalError as e:
            code = getattr(e.orig, "sqlite_errorname", "")
            text = str(e.orig).lower()
            pg_lock_timeout = getattr(e.orig, "sqlstate", "") == "55P03"  # lock_not_available
            if code == "SQLITE_BUSY" or "database is locked" in text or pg_lock_timeout:
                raise RegistryBusyError(
                    f"the expert registry is busy: another process has held its database lock for over "
                    f"{self.busy_timeout_s:g} s (registry_busy_timeout_s); nothing was changed: send the "
                    "request again shortly") from e
            if code == "SQLITE_FULL" or "database or disk is full" in text:
                raise StorageFullError(
                    f"no space left on the device holding the expert registry ({self.engine.url.database}); "
                    "nothing was registered: free some space there and send the request again") from e
            raise

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """On PostgreSQL, the pool's session-level advisory lock, held by one connection until the block
        ends (or the process dies: the server drops a closed session's locks). Waits at most
        `busy_timeout_s` (lock_timeout), then RegistryBusyError. On SQLite, nothing: the pool's flock
        is the lock."""
        if not self.is_postgres:
            yield
            return
        conn = self.engine.connect()
        try:
            with self.typed_errors():
                conn.execute(select(func.pg_advisory_lock(POOL_LOCK_KEY)))
                conn.commit()  # the lock outlives the transaction; no session idles in one
            yield
        finally:
            try:
                conn.rollback()
                conn.execute(select(func.pg_advisory_unlock_all()))
                conn.commit()
            except Exception:
                conn.invalidate()  # a closed session holds no lock
            conn.close()

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction: everything inside commits together or not at all."""
        with self.typed_errors(), self.engine.begin() as conn:
            yield conn

    def get(self, name: str, conn: Connection | None = None) -> ExpertCard | None:
        stmt = select(experts_table.c.body).where(experts_table.c.name == name)
        with self.typed_errors():
            if conn is None:
                with self.engine.connect() as c:
                    row = c.execute(stmt).first()
            else:
                row = conn.execute(stmt).first()
        return ExpertCard.from_row(row[0]) if row else None

    def list(self) -> list[ExpertCard]:
        with self.typed_errors(), self.engine.connect() as c:
            rows = c.execute(select(experts_table.c.body).order_by(experts_table.c.name)).all()
        return [ExpertCard.from_row(r[0]) for r in rows]

    def names(self) -> list[str]:
        with self.typed_errors(), self.engine.connect() as c:
            return [r[0] for r in c.execute(select(experts_table.c.name).order_by(experts_table.c.name))]

    def insert(self, conn: Connection, card: ExpertCard) -> None:
        with self.typed_errors():
            conn.execute(insert(experts_table).values(**card.to_row()))
            self._bump(conn)

    def replace(self, conn: Connection, card: ExpertCard) -> None:
        with self.typed_errors():
            conn.execute(update(experts_table).where(experts_table.c.name == card.name).values(**card.to_row()))
            self._bump(conn)

    def delete(self, conn: Connection, name: str) -> None:
        with self.typed_errors():
            conn.execute(delete(experts_table).where(experts_table.c.name == name))
            self._bump(conn)

    @staticmethod
    def _bump(conn: Connection) -> None:
        conn.execute(update(pool_version_table).where(pool_version_table.c.id == 1)
                     .values(version=pool_version_table.c.version + 1))

    def version(self) -> int:
        """The pool version: it moves with every committed write, by any process."""
        with self.typed_errors(), self.engine.connect() as c:
            return int(c.execute(select(pool_version_table.c.version)).scalar_one())

    def fingerprints(self) -> dict[str, Fingerprint]:
        """name -> fingerprint of every stored row (what a process compares to see what others changed)."""
        with self.typed_errors(), self.engine.connect() as c:
            rows = c.execute(select(experts_table.c.name, experts_table.c.body)).all()
        return {name: fingerprint(body) for name, body in rows}

    def referenced_digests(self) -> set[str]:
        return {d for card in self.list() for d in card.artifacts.values()}

    def recover(self) -> None:
        """After a crash: let SQLite roll back a hot journal, then drop a stale one.

        Call only while no other writer can be mid-transaction (the pool lock guarantees that).
        """
        self.names()  # the first read rolls back a hot journal
        if self.engine.url.get_backend_name() == "sqlite" and self.engine.url.database:
            journal = Path(self.engine.url.database + "-journal")
            if journal.exists():
                self.engine.dispose()
                journal.unlink(missing_ok=True)

    def close(self) -> None:
        self.engine.dispose()
