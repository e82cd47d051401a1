"""Build a RouterContext for a pool: the embedder, and an instruction writer over the serving engine."""

from __future__ import annotations

from collections.abc import Callable

from moerge.router.context import Calibration, RouterContext


def build_context(pool, complete: Callable[[list[dict], int], str] | None = None, *,
                  embedder_path: str | None = None, calibration: Calibration | None = None) -> RouterContext:
    """`complete(messages, max_tokens) -> text` runs the base model greedily (None: no glider-global)."""
    from moerge.models.embedder import get_embedder
    embedder = get_embedder(embedder_path)
    writer = None
    if complete is not None:
        from moerge.router.instruction import InstructionWriter
        writer = InstructionWriter(complete)
    return RouterContext(pool, embedder.encode, instruction_writer=writer, calibration=calibration)
