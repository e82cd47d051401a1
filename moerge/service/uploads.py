"""Turn an HTTP upload (adapter files, or one tar.gz) into a folder, refusing anything unsafe.

Only plain files with plain names are accepted: no absolute paths, no '..', no links or
devices in archives, every file and the total under the size limit. Files land in a fresh
folder under the pool's staging area, which the caller removes after registration.
"""

from __future__ import annotations

import io
import re
import shutil
import tarfile
import uuid
from pathlib import Path

from moerge.experts.errors import ExpertError, PathOutsideStoreError, UploadTooLargeError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_FILES = 16


def _check_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or ".." in name or not _SAFE_NAME.match(name):
        raise PathOutsideStoreError(f"file name {name!r} is not allowed: upload plain files such as "
                                    "adapter_config.json and adapter_model.safetensors")
    return name


def new_upload_dir(staging: Path) -> Path:
    folder = staging / f"upload-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    return folder


def save_files(folder: Path, files: list[tuple[str, bytes]], max_bytes: int) -> Path:
    if len(files) > MAX_FILES:
        raise ExpertError(f"too many files ({len(files)}): upload the adapter's files only")
    for name, data in files:
        _check_name(name)
        if len(data) > max_bytes:
            raise UploadTooLargeError(f"{name} is {len(data) / 2**20:.1f} MiB, over the limit of "
                                      f"{max_bytes / 2**20:.1f} MiB")
        (folder / name).write_bytes(data)
    return folder


def extract_tar(folder: Path, data: bytes, max_bytes: int) -> Path:
    """Extract a tar(.gz) of adapter files; a single top-level folder in the archive is flattened."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except tarfile.TarError as e:
        raise ExpertError(f"the upload is not a readable tar or tar.gz archive ({e})") from None
    total = 0
    with tar:
        members = tar.getmembers()
        if len(members) > MAX_FILES * 2:
            raise ExpertError(f"the archive holds {len(members)} entries: upload the adapter's files only")
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or ".." in parts or any(p.startswith("..") for p in parts):
                raise PathOutsideStoreError(f"archive entry {m.name!r} points outside the upload folder")
            if m.isdir():
                continue
            if not m.isfile():
                raise PathOutsideStoreError(f"archive entry {m.name!r} is a link or device: only plain files "
                                            "are accepted")
            if len(parts) > 2:
                raise PathOutsideStoreError(f"archive entry {m.name!r} is nested too deep")
            _check_name(parts[-1])
            if m.size > max_bytes:
                raise UploadTooLargeError(f"{m.name} is {m.size / 2**20:.1f} MiB, over the limit of "
                                          f"{max_bytes / 2**20:.1f} MiB")
            total += m.size
            if total > 4 * max_bytes:
                raise UploadTooLargeError("the archive is too large")
            src = tar.extractfile(m)
            target = folder / parts[-1]
            if target.exists():
                raise ExpertError(f"the archive holds {parts[-1]} twice")
            with open(target, "wb") as fh:
                shutil.copyfileobj(src, fh)
    return folder
