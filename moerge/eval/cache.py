"""On-disk cache of generations (SQLite), so an interrupted evaluation resumes where it stopped
and methods that make the same plan for the same prompt share one generation."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path


class GenerationCache:
    def __init__(self, path: Path, namespace: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), check_same_thread=False)
        self.conn.execute("CREATE TABLE IF NOT EXISTS gen (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.conn.commit()
        self.namespace = namespace
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key(self, plan_signature: str, prompt: str, max_tokens: int) -> str:
        raw = json.dumps([self.namespace, plan_signature, prompt, max_tokens])
        return hashlib.sha256(raw.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self.conn.execute("SELECT value FROM gen WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put_many(self, items: dict[str, dict]) -> None:
        with self._lock:
            self.conn.executemany("INSERT OR REPLACE INTO gen (key, value) VALUES (?, ?)",
                                  [(k, json.dumps(v)) for k, v in items.items()])
            self.conn.commit()

    def close(self) -> None:
        self.conn.close()
