"""Turn an HTTP upload (adapter files, or one tar.gz) into a folder, refusing anything unsafe.

Only plain files with plain names are accepted: no absolute paths, no '..', no links or
devices in archives, every file and the total under the size limit. Files land in a fresh
folder under the pool's staging area, which the caller removes after registration.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from moerge.experts.errors import (
    ExpertError,
    PathOutsideStoreError,
    UnsupportedMediaTypeError,
    UploadTooLargeError,
)
from moerge.service.archive import ArchiveLimits, archive_kind, extract_archive, sniff

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_FILES = 16


def _name_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if "\x00" in name:
        return "it has a NUL byte"
    if "/" in name or "\\" in name or ".." in name:
        return "it is a path, not a plain file name"
    if not _SAFE_NAME.match(name):
        return "use letters, digits, '.', '_' and '-', at most 128"
    return None


def _check_name(name: str) -> str:
    if why := _name_problem(name):
        raise PathOutsideStoreError(f"file name {name!r} is not allowed ({why}): upload plain files such as "
                                    "adapter_config.json and adapter_model.safetensors")
    return name


def new_upload_dir(staging: Path) -> Path:
    folder = staging / f"upload-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    return folder


def save_files(folder: Path, files: list[tuple[str, bytes]], max_bytes: int) -> Path:
    if len(files) > MAX_FILES:
        raise ExpertError(f"too many files ({len(files)}): upload the adapter's files only")
    seen: set[str] = set()
    for name, data in files:
        _check_name(name)
        if name in seen:
            raise ExpertError(f"{name} is uploaded twice: send each file once")
        seen.add(name)
        if len(data) > max_bytes:
            raise UploadTooLargeError(f"{name} is {len(data) / 2**20:.1f} MiB, over the limit of "
                                      f"{max_bytes / 2**20:.1f} MiB")
        (folder / name).write_bytes(data)
    return folder


def extract_tar(folder: Path, data: bytes, max_bytes: int, filename: str = "adapter.tar.gz") -> Path:
    """Extract a tar(.gz) of adapter files; a single top-level folder in the archive is flattened.

    Limits on members, sizes, compression ratio, names and entry types: moerge.service.archive."""
    extract_archive(folder, data, filename, ArchiveLimits.for_upload(max_bytes), check_name=_check_name)
    return folder


# what a multipart part may declare itself to be, by the kind of file its name says it is
_PART_TYPES = {
    "archive": {"application/gzip", "application/x-gzip", "application/x-tar", "application/x-gtar",
                "application/x-compressed-tar", "application/tar", "application/tar+gzip"},
    "json": {"application/json", "text/json", "text/plain"},
    "safetensors": {"application/safetensors", "application/x-safetensors"},
}
_ANY_BINARY = {"", "application/octet-stream", "binary/octet-stream", "application/x-binary"}


def _part_kind(name: str) -> str:
    if archive_kind(name):
        return "archive"
    return {"json": "json", "safetensors": "safetensors"}.get(name.rsplit(".", 1)[-1].lower(), "other")


def check_part(name: str, content_type: str | None, data: bytes) -> None:
    """Refuse a part whose declared type or content is not what its file name says it is."""
    kind = _part_kind(name)
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    actual = sniff(data)
    if kind == "other" and actual not in ("unknown", "tar"):
        raise UnsupportedMediaTypeError(f"part {name!r} is a {actual} archive: moerge accepts the adapter's files, "
                                        "or one .tar.gz, .tgz or .tar holding them")
    allowed = _PART_TYPES.get(kind, set()) | _ANY_BINARY
    if kind != "other" and declared not in allowed:
        raise UnsupportedMediaTypeError(f"part {name!r} is sent as {declared!r}, which is not a {kind} file: "
                                        f"send it as application/octet-stream or one of {sorted(_PART_TYPES[kind])}")
    if kind == "safetensors" and not _looks_like_safetensors(data):
        raise UnsupportedMediaTypeError(f"part {name!r} is not a safetensors file (no safetensors header): "
                                        "upload the adapter_model.safetensors that peft's save_pretrained wrote")


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"
