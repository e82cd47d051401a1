"""moerge: one OpenAI-compatible endpoint over a pool of LoRA experts and whole models,
routed per request and per token."""

__version__ = "0.1.0"
