"""Build a RouterContext for a pool: the embedder, and an instruction writer over the serving engine."""

from __future__ import annotations

from collections.abc import Callable

from moerge.router.context import Calibration, RouterContext


def build_context(pool, complete: Callable[[list[dict], int], str] | None = None, *,
                  embedder_path: str | None = None, calibration: Calibration | None = None,
                  complete_many: Callable[[list[list[dict]], int], list[str]] | None = None) -> RouterContext:
    """`complete(messages, max_tokens) -> text` runs the base model greedily (None: no glider-global);
    `complete_many` does it for many in one engine call (the writer's `prime`)."""
    from moerge.models.embedder import get_embedder
    embedder = get_embedder(embedder_path)
    writer = None
    if complete is not None:
        from moerge.router.instruction import InstructionWriter
        writer = InstructionWriter(complete, complete_many=complete_many)
    return RouterContext(pool, embedder.encode, instruction_writer=writer, calibration=calibration)
