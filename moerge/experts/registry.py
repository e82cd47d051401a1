"""The registry of expert cards: one table behind a SQLAlchemy URL (SQLite or PostgreSQL).

SQLite waits at most `busy_timeout_s` for another connection's lock; past it, and on a full disk,
every call raises a typed error (RegistryBusyError, 503; StorageFullError, 507) instead of
sqlite3's OperationalError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Column, Float, MetaData, String, Table, Text, create_engine, delete, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

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


class Registry:
    def __init__(self, url: str, busy_timeout_s: float = 5.0):
        self.url = url
        self.busy_timeout_s = busy_timeout_s
        kwargs = {"connect_args": {"timeout": busy_timeout_s}} if url.startswith("sqlite") else {}
        self.engine: Engine = create_engine(url, future=True, **kwargs)
        with self.typed_errors():
            metadata.create_all(self.engine)

    @contextlib.contextmanager
    def typed_errors(self) -> Iterator[None]:
        """SQLite's "database is locked" and "database or disk is full" as the errors a client can act on."""
        try:
            yield
        except OperationalError as e:
            code = getattr(e.orig, "sqlite_errorname", "")
            text = str(e.orig).lower()
            if code == "SQLITE_BUSY" or "database is locked" in text:
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

    def replace(self, conn: Connection, card: ExpertCard) -> None:
        with self.typed_errors():
            conn.execute(update(experts_table).where(experts_table.c.name == card.name).values(**card.to_row()))

    def delete(self, conn: Connection, name: str) -> None:
        with self.typed_errors():
            conn.execute(delete(experts_table).where(experts_table.c.name == name))

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
