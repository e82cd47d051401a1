"""The bundled expert library (experts/library/ in the repo), loaded into a pool on first start."""

from __future__ import annotations

import json
from pathlib import Path

from moerge.experts.errors import NameTakenError

LIBRARY = Path(__file__).resolve().parent / "library"


def library_entries() -> list[dict]:
    index = LIBRARY / "library.json"
    if not index.exists():
        return []
    return json.loads(index.read_text())["experts"]


def load_bundled(pool, progress=print) -> list[str]:
    """Register every bundled expert the pool does not have yet; return the names added."""
    have = set(pool.names())
    added = []
    for entry in library_entries():
        if entry["name"] in have:
            _backfill(pool, entry)
            continue
        folder = LIBRARY / entry["name"]
        gate = folder / "gate.safetensors"
        try:
            card = pool.register_lora(folder, entry["name"], entry["description"], tags=entry.get("tags", []),
                                      examples=entry.get("examples", []),
                                      answered_examples=entry.get("answered_examples", []),
                                      extra={"bundled": True, "task": entry.get("task")},
                                      extra_blobs={"gate": gate.read_bytes()} if gate.exists() else None)
        except NameTakenError:  # a replica starting at the same time on the same registry registered it first
            continue
        added.append(card.name)
        progress(f"registered bundled expert {card.name}")
    return added


def _backfill(pool, entry: dict) -> None:
    """A bundled expert registered before the library carried answered examples gets them (its routing
    text and weights are untouched); one the user changed, or that is not the bundled one, is left alone."""
    card = pool.registry.get(entry["name"])
    if (card is None or card.answered_examples or not entry.get("answered_examples")
            or not (card.extra or {}).get("bundled") or card.examples != entry.get("examples", [])):
        return
    pool.update(entry["name"], answered_examples=entry["answered_examples"])
