"""Build a RouterContext for a pool: the embedder, and the base model as instruction writer."""

from __future__ import annotations

from pathlib import Path

from moerge.router.context import Calibration, RouterContext


def build_context(pool, base_dir: Path | None, *, embedder_path: str | None = None,
                  calibration: Calibration | None = None, with_writer: bool = True) -> RouterContext:
    from moerge.models.embedder import get_embedder
    embedder = get_embedder(embedder_path)
    writer = None
    if with_writer and base_dir is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from moerge.router.instruction import InstructionWriter
        tok = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        writer = InstructionWriter(model, tok)
    return RouterContext(pool, embedder.encode, instruction_writer=writer, calibration=calibration)
