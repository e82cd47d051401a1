"""Process memory as glibc holds it: resident size by kind of mapping, and giving free heap pages back.

A long-running engine worker frees as much as it allocates, yet its resident size can climb: glibc
returns freed memory in the middle of its heaps to the system only when told to (`malloc_trim`).
These helpers measure that (the load benchmark and `scripts/engine_memory.py` use them) and do it.
Linux with glibc only; elsewhere the trim is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_ARENA_MAX = -8          # mallopt parameter number in glibc's malloc.h


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim            # noqa: B018 - glibc only; musl and others lack it
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def smaps(pid: int | None = None) -> dict[tuple[str, str], tuple[float, float]]:
    """{(address range, path): (mapping size, resident)} in MiB, from /proc/PID/smaps ({} if unreadable)."""
    out, key, size = {}, None, 0.0
    try:
        with open(f"/proc/{pid or os.getpid()}/smaps") as f:
            for line in f:
                head = line.split()
                if not head:
                    continue
                if "-" in head[0] and not head[0].endswith(":"):        # a mapping's header line
                    key = (head[0], head[5] if len(head) > 5 else "")
                elif head[0] == "Size:":
                    size = int(head[1]) / 1024
                elif head[0] == "Rss:" and key is not None:
                    out[key] = (size, int(head[1]) / 1024)
    except OSError:
        pass
    return out


def rss_breakdown(pid: int | None = None) -> dict[str, float]:
    """Resident MiB of a process: total, the brk heap (glibc's main arena), anonymous mappings, files."""
    out = {"total": 0.0, "heap": 0.0, "anon": 0.0, "file": 0.0}
    for (_, path), (_, rss) in smaps(pid).items():
        out["total"] += rss
        out["heap" if path == "[heap]" else "file" if path.startswith("/") else "anon"] += rss
    return {k: round(v, 1) for k, v in out.items()}


def malloc_trim() -> bool:
    """Hand free pages of every malloc arena back to the system; False where glibc is not there."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


def limit_arenas(n: int) -> bool:
    """At most `n` malloc arenas from now on (glibc's M_ARENA_MAX): threads share arenas instead of
    each growing its own. Call it before the threads start. False where glibc is not there."""
    if _LIBC is None or n <= 0:
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, n))
