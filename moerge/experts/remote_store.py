"""The artifact store on S3-compatible storage (or any fsspec filesystem), with a local read-through cache.

`MOERGE_POOL_URL=s3://bucket/prefix` puts the blobs at `<url>/blobs/<aa>/<sha256>`. Everything else of the
pool stays in the local pool folder: `.lock`, `staging/` (a blob is hashed and fsynced there before it is
uploaded) and `cache/blobs/<aa>/<sha256>`, the blobs this replica has read or written. `path(digest)` answers
with the cached file (downloading it first if need be), so `ExpertPool.adapter_dir` can hard-link it and
peft or vLLM read ordinary local files.

Uploads are one `put_file` straight to the blob's final key, with no temporary key and no copy: S3 has no
rename (a "rename" is a server-side copy plus a delete, twice the writes), and it never shows a partial
object. A single PUT becomes visible whole or not at all, and s3fs sends files past its part size as a
multipart upload, which appears only on CompleteMultipartUpload (and is aborted on any error). The key is
the sha256 of the content, so two writers of one key write the same bytes, and a cache download is checked
against the key before it is renamed into place. A replica killed mid-upload leaves at most an incomplete
multipart upload, which no listing shows (a bucket lifecycle rule AbortIncompleteMultipartUpload frees it).

The registry stays the commit point. The pool uploads a registration's blobs under the pool lock, then commits
its row. A failure before that removes the blobs this call uploaded; a crash leaves only blobs no row
references, which the next start sweeps (`sweep` deletes them from the bucket and from this replica's cache).
Replicas on several hosts sharing one bucket must share a PostgreSQL registry: its advisory lock is what keeps
one replica's sweep from deleting the blobs another is halfway through registering (docs/deployment.md).

Credentials and endpoint come from where s3fs (botocore) looks: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(or AWS_PROFILE, ~/.aws, an instance role), AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for MinIO, Ceph and the
like, AWS_DEFAULT_REGION; `storage_options` (MOERGE_POOL_STORAGE_OPTIONS, JSON) are passed to the fsspec
filesystem as keyword arguments and win (`{"endpoint_url": ..., "key": ..., "secret": ...}`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from moerge.experts.errors import ExpertError
from moerge.experts.store import ArtifactStore, check_digest, is_digest, write_local_blob

# a cache download older than this is a leftover of a dead process, removed by the next sweep
STALE_DOWNLOAD_S = 3600.0


class ArtifactStoreUnavailableError(ExpertError):
    """The remote artifact store (MOERGE_POOL_URL) is unreachable, refuses the credentials, or has no such
    bucket. Nothing is registered, and moerge never falls back to local disk."""
    status = 503
    retry_after = 5


def _reason(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return "access denied (wrong or missing credentials, or no permission on the bucket)"
    if isinstance(exc, FileNotFoundError):
        return "no such bucket"
    return "unreachable or failing"


class RemoteArtifactStore(ArtifactStore):
    """ArtifactStore's interface over an fsspec URL; staging and the read cache under the local `root`."""

    def __init__(self, root: Path, url: str, storage_options: dict | None = None):
        self.root = Path(root)
        self.url = url.rstrip("/")
        self.staging = self.root / "staging"
        self.blobs = self.root / "cache" / "blobs"  # the local copies: ArtifactStore.blobs's role
        self.downloads = self.root / "cache" / "tmp"
        for d in (self.staging, self.blobs, self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        try:
            import fsspec
            # no listings cache: has() and all_digests() must see other replicas' writes at once; no instance
            # cache: a store made after the credentials changed uses the new ones
            options = {"use_listings_cache": False, "skip_instance_cache": True, **(storage_options or {})}
            self.fs, base = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as e:
            raise ArtifactStoreUnavailableError(
                f"the artifact store {self.url} needs fsspec's driver for it: {e}; for s3:// install moerge[s3] "
                "(pip install 'moerge[s3]')") from e
        except ValueError as e:
            raise ArtifactStoreUnavailableError(f"the artifact store URL {self.url} is not usable: {e}") from e
        self.remote_blobs = base.rstrip("/") + "/blobs"
        self.all_digests()  # a wrong bucket, credential or endpoint fails here, at start-up

    @contextlib.contextmanager
    def _remote(self, doing: str, missing_is_error: bool = False) -> Iterator[None]:
        """Any failure of the remote but a missing blob (FileNotFoundError, as on disk) becomes
        ArtifactStoreUnavailableError, naming the URL."""
        try:
            yield
        except ExpertError:
            raise
        except FileNotFoundError as e:
            if not missing_is_error:
                raise
            raise self._unavailable(doing, e) from e
        except Exception as e:
            raise self._unavailable(doing, e) from e

    def _unavailable(self, doing: str, e: Exception) -> ArtifactStoreUnavailableError:
        return ArtifactStoreUnavailableError(
            f"the artifact store {self.url} failed while {doing}: {_reason(e)} ({type(e).__name__}: {e}). "
            "Check MOERGE_POOL_URL, the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) "
            "and the endpoint (AWS_ENDPOINT_URL, or endpoint_url in MOERGE_POOL_STORAGE_OPTIONS)")

    def remote_path(self, digest: str) -> str:
        return f"{self.remote_blobs}/{check_digest(digest)[:2]}/{digest}"

    def path(self, digest: str) -> Path:
        """The blob's local copy, downloaded into the cache (checked against its digest) if not there yet."""
        local = self.blobs / check_digest(digest)[:2] / digest
        if local.exists():
            return local
        tmp = self.downloads / f"{digest}.{os.getpid()}.{uuid.uuid4().hex}.part"
        try:
            with self._remote(f"downloading blob {digest}"):
                self.fs.get_file(self.remote_path(digest), str(tmp))
            h = hashlib.sha256()
            with open(tmp, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                os.fsync(f.fileno())
            if h.hexdigest() != digest:
                raise ArtifactStoreUnavailableError(
                    f"the artifact store {self.url} holds a corrupt blob {digest} (its content hashes to "
                    f"{h.hexdigest()}); remove that object and register the expert again")
            return write_local_blob(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def size(self, digest: str) -> int:
        """From the cached copy, or the object's metadata: sizing a blob never downloads it."""
        local = self.blobs / check_digest(digest)[:2] / digest
        if local.exists():
            return local.stat().st_size
        with self._remote(f"reading the size of blob {digest}"):
            return int(self.fs.size(self.remote_path(digest)))

    def has(self, digest: str) -> bool:
        with self._remote(f"looking for blob {digest}"):
            return self.fs.exists(self.remote_path(digest))

    def publish(self, digest: str, staged: Path) -> Path:
        """Upload a staged file to its content address (one PUT, or a multipart upload that appears whole;
        a no-op if the object exists), then keep it as this replica's cached copy."""
        local = self.blobs / check_digest(digest)[:2] / digest
        if not self.has(digest):
            with self._remote(f"uploading blob {digest}"):
                self.fs.put_file(str(staged), self.remote_path(digest))
        if local.exists():
            staged.unlink(missing_ok=True)
            return local
        return write_local_blob(staged, local)

    def all_digests(self) -> set[str]:
        with self._remote("listing the blobs", missing_is_error=True):  # a missing bucket, not an empty one
            return {p.rsplit("/", 1)[-1] for p in self.fs.find(self.remote_blobs) if is_digest(p.rsplit("/", 1)[-1])}

    def remove(self, digest: str) -> None:
        with self._remote(f"deleting blob {digest}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.remote_path(digest))
        self._uncache(digest)

    def _uncache(self, digest: str) -> None:
        p = self.blobs / digest[:2] / digest
        p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            p.parent.rmdir()

    def cached_digests(self) -> set[str]:
        return {p.name for p in self.blobs.glob("*/*") if is_digest(p.name)}

    def sweep(self, referenced: set[str]) -> list[str]:
        """Delete staging leftovers, blobs no card references (remote and cached), and dead downloads."""
        removed = super().sweep(referenced)
        for d in self.cached_digests() - referenced:
            self._uncache(d)
        for p in self.downloads.iterdir():
            with contextlib.suppress(OSError):
                if time.time() - p.stat().st_mtime > STALE_DOWNLOAD_S:
                    p.unlink()
        return removed
