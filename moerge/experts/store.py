"""Content-addressed artifact store on disk.

Blobs live at `blobs/<aa>/<sha256>`; a blob is written to `staging/`, fsynced, and renamed
into place, so a reader never sees a partial file. Blobs are immutable and shared between
cards. Garbage (unreferenced blobs, stale staging files) is swept under the pool lock.

`open_store` gives this store, or with a URL (`MOERGE_POOL_URL=s3://bucket/prefix`) the fsspec-backed
one of moerge.experts.remote_store, which keeps the blobs remote and stages and caches them here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

from moerge.experts.errors import PathOutsideStoreError

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_digest(digest: str) -> str:
    if not _DIGEST_RE.match(digest or ""):
        raise PathOutsideStoreError(f"{digest!r} is not a sha256 digest")
    return digest


def is_digest(name: str) -> bool:
    return bool(_DIGEST_RE.match(name))


def write_local_blob(staged: Path, final: Path) -> Path:
    """Rename a finished (fsynced) file to `final`, read-only, and fsync its folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    os.chmod(final, 0o444)
    _fsync_dir(final.parent)
    return final


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.staging = self.root / "staging"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest)[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def size(self, digest: str) -> int:
        """The blob's size in bytes (OSError if it is missing)."""
        return self.path(digest).stat().st_size

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def stage_bytes(self, data: bytes) -> tuple[str, Path]:
        """Write data to a staging file (fsynced); return (digest, staged path)."""
        digest = hashlib.sha256(data).hexdigest()
        tmp = self.staging / f"{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return digest, tmp

    def stage_file(self, src: Path, chunk: int = 1 << 20) -> tuple[str, Path]:
        """Copy a file into staging while hashing it; return (digest, staged path)."""
        h = hashlib.sha256()
        tmp = self.staging / f"{uuid.uuid4().hex}.part"
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(chunk):
                h.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        return h.hexdigest(), tmp

    def publish(self, digest: str, staged: Path) -> Path:
        """Move a staged file to its content address (atomic rename; no-op if present)."""
        final = self.path(digest)
        if final.exists():
            staged.unlink(missing_ok=True)
            return final
        return write_local_blob(staged, final)

    def all_digests(self) -> set[str]:
        return {p.name for p in self.blobs.glob("*/*") if is_digest(p.name)}

    def remove(self, digest: str) -> None:
        p = self.path(digest)
        p.unlink(missing_ok=True)
        try:
            p.parent.rmdir()
        except OSError:
            pass

    def clear_staging(self) -> None:
        """Delete every staging leftover. Call under the pool lock."""
        for p in self.staging.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def sweep(self, referenced: set[str]) -> list[str]:
        """Delete staging leftovers and blobs no card references. Call under the pool lock."""
        self.clear_staging()
        removed = sorted(self.all_digests() - referenced)
        for d in removed:
            self.remove(d)
        return removed


def open_store(root: Path, url: str | None = None, storage_options: dict | None = None) -> ArtifactStore:
    """The pool's artifact store: on disk under `root`, or with `url` an fsspec (S3-compatible) store whose
    staging files, lock and read cache stay under `root`. An unusable URL raises ArtifactStoreUnavailableError."""
    if not url:
        return ArtifactStore(root)
    from moerge.experts.remote_store import RemoteArtifactStore
    return RemoteArtifactStore(root, url, storage_options)
