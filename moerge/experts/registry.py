"""The registry of expert cards: one table behind a SQLAlchemy URL (SQLite or PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Column, Float, MetaData, String, Table, Text, create_engine, delete, insert, select, update
from sqlalchemy.engine import Connection, Engine

from moerge.experts.card import ExpertCard

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
    def __init__(self, url: str):
        self.url = url
        kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
        self.engine: Engine = create_engine(url, future=True, **kwargs)
        metadata.create_all(self.engine)

    def begin(self):
        """A transaction: everything inside commits together or not at all."""
        return self.engine.begin()

    def get(self, name: str, conn: Connection | None = None) -> ExpertCard | None:
        stmt = select(experts_table.c.body).where(experts_table.c.name == name)
        if conn is None:
            with self.engine.connect() as c:
                row = c.execute(stmt).first()
        else:
            row = conn.execute(stmt).first()
        return ExpertCard.from_row(row[0]) if row else None

    def list(self) -> list[ExpertCard]:
        with self.engine.connect() as c:
            rows = c.execute(select(experts_table.c.body).order_by(experts_table.c.name)).all()
        return [ExpertCard.from_row(r[0]) for r in rows]

    def names(self) -> list[str]:
        with self.engine.connect() as c:
            return [r[0] for r in c.execute(select(experts_table.c.name).order_by(experts_table.c.name))]

    def insert(self, conn: Connection, card: ExpertCard) -> None:
        conn.execute(insert(experts_table).values(**card.to_row()))

    def replace(self, conn: Connection, card: ExpertCard) -> None:
        conn.execute(update(experts_table).where(experts_table.c.name == card.name).values(**card.to_row()))

    def delete(self, conn: Connection, name: str) -> None:
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
