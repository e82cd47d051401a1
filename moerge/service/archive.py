"""Read an uploaded tar or tar.gz of adapter files without trusting it.

Two passes over the archive. The first reads only the 512-byte tar headers and checks every
limit on them (member count, declared sizes, extension-header sizes) before any member's
data is read or the stream moves past it, while counting decompressed bytes against the
compression-ratio limit. So a tar bomb costs at most the limits, in time and in memory. The
second pass, through `tarfile`, checks each member's path and type and extracts plain files
only, flattened into one folder.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from moerge.experts.errors import (
    STORAGE_FULL_ERRNOS,
    PathOutsideStoreError,
    UnsafeArchiveError,
    UnsupportedMediaTypeError,
    UploadTooLargeError,
)

BLOCK = 512
ARCHIVE_SUFFIXES = {".tar.gz": "gzip", ".tgz": "gzip", ".tar": "tar"}
_EXTENSION_TYPES = {b"x": "pax", b"g": "pax global", b"L": "GNU long name", b"K": "GNU long link"}
_MAGIC = [(b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"PK\x03\x04", "zip"),
          (b"(\xb5/\xfd", "zstd")]
_KIND_NAMES = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
               tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
               tarfile.FIFOTYPE: "a FIFO", tarfile.GNUTYPE_SPARSE: "a sparse file",
               tarfile.CONTTYPE: "a contiguous file"}


@dataclass(frozen=True)
class ArchiveLimits:
    max_file_bytes: int                  # one member
    max_total_bytes: int                 # all members, uncompressed
    max_members: int = 32                # files and folders
    max_ratio: float = 100.0             # uncompressed / compressed ...
    ratio_floor_bytes: int = 1 << 20     # ... once more than this much has been decompressed
    max_name_chars: int = 255
    max_depth: int = 2                   # "folder/file"
    max_header_bytes: int = 16 << 10     # one pax or GNU long-name record

    @classmethod
    def for_upload(cls, max_file_bytes: int) -> "ArchiveLimits":
        """An adapter archive holds a config and one weights file: room for two files and headers."""
        return cls(max_file_bytes=max_file_bytes, max_total_bytes=2 * max_file_bytes + (1 << 20))


def archive_kind(filename: str) -> str | None:
    """What the file name claims: "gzip" or "tar" for an accepted archive name, else None."""
    lower = filename.lower()
    return next((kind for suffix, kind in ARCHIVE_SUFFIXES.items() if lower.endswith(suffix)), None)


def sniff(data: bytes) -> str:
    """What the bytes are: gzip, bzip2, xz, zip, zstd, tar (ustar) or unknown."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if len(data) >= BLOCK and data[257:262] == b"ustar":
        return "tar"
    return "unknown"


class _CountingReader(io.RawIOBase):
    """Decompressed bytes, counted against the total and the compression-ratio limits."""

    def __init__(self, raw, compressed_bytes: int, limits: ArchiveLimits, compressed: bool):
        self.raw = raw
        self.compressed_bytes = max(1, compressed_bytes)
        self.limits = limits
        self.compressed = compressed
        self.seen = 0
        # headers and padding come on top of the members' data
        self.cap = limits.max_total_bytes + (limits.max_members * 2 + 2) * (BLOCK + limits.max_header_bytes)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.seen += n
        if self.seen > self.cap:
            raise UploadTooLargeError(f"the archive expands to more than {self.cap / 2**20:.1f} MiB: "
                                      "upload only the adapter's files")
        ratio = self.seen / self.compressed_bytes
        if self.compressed and self.seen > self.limits.ratio_floor_bytes and ratio > self.limits.max_ratio:
            raise UnsafeArchiveError(f"the archive expands more than {self.limits.max_ratio:.0f}-fold "
                                     "(a compression bomb?): upload the adapter's files as they are")
        return n


def _open(data: bytes, kind: str, limits: ArchiveLimits) -> _CountingReader:
    raw = gzip.GzipFile(fileobj=io.BytesIO(data)) if kind == "gzip" else io.BytesIO(data)
    return _CountingReader(raw, len(data), limits, compressed=kind == "gzip")


def _read_exact(stream, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _header_size(block: bytes) -> int:
    field = block[124:136]
    if field[0] & 0x80:                   # base-256, for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise UnsafeArchiveError("the archive has a corrupt tar header (size field): "
                                 "create it again with tar") from None


def scan_headers(stream, limits: ArchiveLimits) -> int:
    """First pass: check every header against the limits, skipping data; return the member count."""
    members = total = 0
    while True:
        block = _read_exact(stream, BLOCK)
        if len(block) < BLOCK:
            raise UnsafeArchiveError("the archive ends in the middle of a tar header: upload the whole file")
        if block == bytes(BLOCK):
            return members
        kind, size = block[156:157], _header_size(block)
        if kind in _EXTENSION_TYPES:
            if size > limits.max_header_bytes:
                raise UnsafeArchiveError(
                    f"the archive has a {_EXTENSION_TYPES[kind]} header of {size} bytes, over the limit of "
                    f"{limits.max_header_bytes}: create the archive with short plain names")
        else:
            members += 1
            if members > limits.max_members:
                raise UnsafeArchiveError(f"the archive holds more than {limits.max_members} entries: "
                                         "upload only the adapter's files")
            if size > limits.max_file_bytes:
                raise UploadTooLargeError(f"an archive entry is {size / 2**20:.1f} MiB, over the limit of "
                                          f"{limits.max_file_bytes / 2**20:.1f} MiB")
            total += size
            if total > limits.max_total_bytes:
                raise UploadTooLargeError(f"the archive's files add up to more than "
                                          f"{limits.max_total_bytes / 2**20:.1f} MiB: upload only the adapter's files")
        padded = -(-size // BLOCK) * BLOCK
        if len(_read_exact(stream, padded)) < padded:
            raise UnsafeArchiveError("the archive is cut short inside an entry: upload the whole file")


def _member_path(m: tarfile.TarInfo, limits: ArchiveLimits) -> PurePosixPath:
    name = m.name
    if "\x00" in name:
        raise PathOutsideStoreError(f"archive entry {name!r} has a NUL byte in its name: use plain names")
    if len(name) > limits.max_name_chars:
        raise UnsafeArchiveError(f"archive entry name is {len(name)} characters, over the limit of "
                                 f"{limits.max_name_chars}: use short plain names")
    if "\\" in name:
        raise PathOutsideStoreError(f"archive entry {name!r} has a backslash in its path: "
                                    "create the archive on a POSIX system with plain names")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise PathOutsideStoreError(f"archive entry {name!r} is an absolute path, which points outside the "
                                    "upload folder: archive the files with relative names")
    if ".." in path.parts:
        raise PathOutsideStoreError(f"archive entry {name!r} uses '..', which points outside the upload "
                                    "folder: archive the files with relative names")
    if len(path.parts) > limits.max_depth:
        raise UnsafeArchiveError(f"archive entry {name!r} is nested {len(path.parts) - 1} folders deep: put the "
                                 "adapter's files at the top of the archive or in one folder")
    return path


def extract_archive(folder: Path, data: bytes, filename: str, limits: ArchiveLimits,
                    check_name=lambda name: name) -> list[str]:
    """Check and extract an uploaded archive into `folder` (flat); return the file names written."""
    claimed, actual = archive_kind(filename), sniff(data)
    if claimed is None:
        raise UnsupportedMediaTypeError(f"{filename!r} is not an accepted archive: upload a .tar.gz, .tgz or .tar")
    if actual != claimed:
        what = "not a tar or gzip archive" if actual == "unknown" else f"a {actual} file"
        raise UnsupportedMediaTypeError(f"{filename!r} claims to be {claimed} but is {what}: upload a .tar.gz "
                                        "made with tar -czf, or a plain .tar")
    try:
        scan_headers(_open(data, actual, limits), limits)
        written: list[str] = []
        top_folders: set[str] = set()
        with tarfile.open(fileobj=_open(data, actual, limits), mode="r|") as tar:
            for m in tar:
                written += _extract_member(tar, m, folder, limits, top_folders, written, check_name)
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as e:
        if isinstance(e, OSError) and e.errno in STORAGE_FULL_ERRNOS:
            raise        # the disk is full, the archive may be fine: the caller says so (507)
        raise UnsafeArchiveError(f"the upload is not a readable {claimed} archive ({e}): "
                                 "create it again with tar") from None
    return written


def _extract_member(tar, m: tarfile.TarInfo, folder: Path, limits: ArchiveLimits, top_folders: set[str],
                    written: list[str], check_name) -> list[str]:
    path = _member_path(m, limits)
    if not m.isdir() and m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = _KIND_NAMES.get(m.type, f"of tar type {m.type!r}")
        raise UnsafeArchiveError(f"archive entry {m.name!r} is {kind}: only plain files are accepted")
    if len(path.parts) == 2 or m.isdir():
        top_folders.add(path.parts[0] if path.parts else "")
        if len(top_folders) > 1:
            raise UnsafeArchiveError("the archive holds more than one folder: put the adapter's files in one "
                                     "folder, or at the top of the archive")
    if m.isdir() or not path.parts:
        return []
    if m.size > limits.max_file_bytes:     # a pax header can restate the size
        raise UploadTooLargeError(f"{m.name} is {m.size / 2**20:.1f} MiB, over the limit of "
                                  f"{limits.max_file_bytes / 2**20:.1f} MiB")
    name = check_name(path.name)
    if name in written:
        raise UnsafeArchiveError(f"the archive holds {name} twice: keep one copy")
    src = tar.extractfile(m)
    data = _read_exact(src, m.size)
    with open(folder / name, "xb") as fh:
        fh.write(data)
    return [name]
