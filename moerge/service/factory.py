"""Build the runtime a `moerge serve` process needs, from settings (through moerge.startup)."""

from __future__ import annotations

from moerge.config import Settings
from moerge.service.runtime import Runtime
from moerge.startup import start


def build_runtime(settings: Settings, progress=print) -> Runtime:
    return Runtime(start(settings, progress=progress))
