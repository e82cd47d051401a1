"""Hostile uploads are refused with a clear 4xx before anything reaches the pool: tar bombs, huge
headers, deep nesting, links and devices, path tricks, wrong types, slow bodies."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import socket
import tarfile
import time
import zipfile

import httpx
import pytest

from moerge.experts import errors as E
from moerge.service.uploads import extract_tar
from tests.helpers import make_lora, tree_snapshot
from tests.service.test_openai_client import ServerThread

MiB = 2**20
LIMIT = 1 * MiB            # max_upload_mb=1: one file ≤ 1 MiB, an archive's files ≤ 3 MiB in all
ADMIN = {"Authorization": "Bearer admin-secret"}
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **attrs):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, data


def tar_bytes(members, compress: str = "gz", fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    return {"gz": gzip.compress, "bz2": bz2.compress, "": lambda b: b}[compress](raw)


def _half_random(n: int) -> bytes:
    """Compresses about 2:1, like nothing a ratio limit should refuse."""
    return os.urandom(n // 2) + bytes(n - n // 2)


CFG = b'{"peft_type": "LORA"}'
ZIP = io.BytesIO()
with zipfile.ZipFile(ZIP, "w") as _z:
    _z.writestr("adapter_config.json", CFG)

# case -> (archive file name, archive bytes, error, HTTP status, words the message must hold)
ARCHIVES = {
    "bomb: one member over the file limit": (
        "a.tar.gz", tar_bytes([member("adapter_model.safetensors", bytes(2 * MiB))]),
        E.UploadTooLargeError, 413, "over the limit of 1.0 mib"),
    "bomb: members add up over the total": (
        "a.tar.gz", tar_bytes([member(f"f{i}.bin", _half_random(900 * 1024)) for i in range(4)]),
        E.UploadTooLargeError, 413, "add up to more than"),
    "bomb: compression ratio": (
        "a.tar.gz", tar_bytes([member(f"f{i}.bin", bytes(900 * 1024)) for i in range(3)]),
        E.UnsafeArchiveError, 400, "100-fold"),
    "bomb: member count": (
        "a.tar.gz", tar_bytes([member(f"f{i}.json", b"{}") for i in range(40)]),
        E.UnsafeArchiveError, 400, "more than 32 entries"),
    "huge pax header": (
        "a.tar.gz", tar_bytes([member("adapter_config.json", CFG, pax_headers={"comment": "x" * 20000})]),
        E.UnsafeArchiveError, 400, "pax header of"),
    "long name": (
        "a.tar.gz", tar_bytes([member("a" * 300 + ".json", CFG)], fmt=tarfile.GNU_FORMAT),
        E.UnsafeArchiveError, 400, "over the limit of 255"),
    "deep nesting": (
        "a.tar.gz", tar_bytes([member("a/b/c/d/adapter_config.json", CFG)]),
        E.UnsafeArchiveError, 400, "nested 4 folders deep"),
    "symlink": (
        "a.tar.gz", tar_bytes([member("adapter_model.safetensors", kind=tarfile.SYMTYPE, linkname="/etc/passwd")]),
        E.UnsafeArchiveError, 400, "symbolic link"),
    "hard link": (
        "a.tar.gz", tar_bytes([member("adapter_config.json", CFG),
                               member("adapter_model.safetensors", kind=tarfile.LNKTYPE,
                                      linkname="adapter_config.json")]),
        E.UnsafeArchiveError, 400, "hard link"),
    "character device": (
        "a.tar.gz", tar_bytes([member("adapter_config.json", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)]),
        E.UnsafeArchiveError, 400, "character device"),
    "block device": (
        "a.tar.gz", tar_bytes([member("adapter_config.json", kind=tarfile.BLKTYPE, devmajor=8, devminor=0)]),
        E.UnsafeArchiveError, 400, "block device"),
    "fifo": (
        "a.tar.gz", tar_bytes([member("adapter_config.json", kind=tarfile.FIFOTYPE)]),
        E.UnsafeArchiveError, 400, "fifo"),
    "absolute path": (
        "a.tar.gz", tar_bytes([member("/tmp/adapter_config.json", CFG)]),
        E.PathOutsideStoreError, 400, "absolute path"),
    "dot-dot": (
        "a.tar.gz", tar_bytes([member("../../escape.json", CFG)]),
        E.PathOutsideStoreError, 400, "uses '..'"),
    "backslash": (
        "a.tar.gz", tar_bytes([member("..\\..\\escape.json", CFG)]),
        E.PathOutsideStoreError, 400, "backslash"),
    "nul in name": (
        "a.tar.gz", tar_bytes([member("x.json", CFG, pax_headers={"path": "adapter\x00config.json"})]),
        E.PathOutsideStoreError, 400, "nul byte"),
    "duplicate name": (
        "a.tar.gz", tar_bytes([member("adapter_config.json", CFG), member("adapter_config.json", b"{}")]),
        E.UnsafeArchiveError, 400, "adapter_config.json twice"),
    "duplicate after flattening": (
        "a.tar.gz", tar_bytes([member("adapter_config.json", CFG), member("x/adapter_config.json", b"{}")]),
        E.UnsafeArchiveError, 400, "adapter_config.json twice"),
    "two folders": (
        "a.tar.gz", tar_bytes([member("a/adapter_config.json", CFG), member("b/adapter_model.safetensors", b"x")]),
        E.UnsafeArchiveError, 400, "more than one folder"),
    "truncated": (
        "a.tar.gz", tar_bytes([member("adapter_config.json", os.urandom(40000))])[:20000],
        E.UnsafeArchiveError, 400, "create it again"),
    "tar.gz that is bzip2": (
        "a.tar.gz", tar_bytes([member("adapter_config.json", CFG)], compress="bz2"),
        E.UnsupportedMediaTypeError, 415, "claims to be gzip but is a bzip2 file"),
    "tar that is gzip": (
        "a.tar", tar_bytes([member("adapter_config.json", CFG)]),
        E.UnsupportedMediaTypeError, 415, "claims to be tar but is a gzip file"),
    "tar.gz that is noise": (
        "a.tgz", os.urandom(4096), E.UnsupportedMediaTypeError, 415, "not a tar or gzip archive"),
}


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_hostile_archive_is_refused_with_its_reason_and_nothing_escapes(case, tmp_path):
    filename, data, error, _, needle = ARCHIVES[case]
    folder = tmp_path / "upload"
    folder.mkdir()
    with pytest.raises(error) as info:
        extract_tar(folder, data, LIMIT, filename=filename)
    assert needle in info.value.message.lower(), info.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]   # nothing written beside the folder
    assert all(p.is_file() and not p.is_symlink() for p in folder.rglob("*"))


def test_plain_archive_in_one_folder_is_flattened(tmp_path):
    data = tar_bytes([member("pirate/", kind=tarfile.DIRTYPE), member("pirate/adapter_config.json", CFG),
                      member("pirate/adapter_model.safetensors", b"weights")])
    extract_tar(tmp_path, data, LIMIT, filename="pirate.tgz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "adapter_config.json").read_bytes() == CFG


# -- over HTTP: the same archives and hostile multipart requests, and the pool is untouched --------------

@pytest.fixture(scope="module")
def upload_server(real_settings, tmp_path_factory, base_model_dir):
    from moerge.service.app import create_app
    from moerge.service.factory import build_runtime
    s = real_settings.model_copy(update={
        "pool_dir": tmp_path_factory.mktemp("upload-pool"), "admin_key": "admin-secret", "api_keys": ["user-key"],
        "routing_method": "embed", "max_upload_mb": LIMIT / MiB, "max_esft_upload_mb": LIMIT / MiB,
        "max_request_bytes": 1 * MiB,
        "body_timeout_s": 2.0})
    runtime = build_runtime(s, progress=lambda m: None)
    keeper = make_lora(base_model_dir, tmp_path_factory.mktemp("keeper") / "k", base_name=BASE_ID, r=2,
                       targets=("q_proj",))
    runtime.pool.register_lora(keeper, "keeper", "already in the pool")
    with ServerThread(create_app(runtime)) as url:
        yield url, runtime


def _assert_refused(resp, status: int, needle: str):
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == str(status)
    assert needle in err["message"].lower(), err["message"]


@pytest.mark.real
@pytest.mark.parametrize("case", list(ARCHIVES))
def test_hostile_archive_upload_gets_4xx_and_pool_is_unchanged(case, upload_server):
    url, runtime = upload_server
    filename, data, _, status, needle = ARCHIVES[case]
    before = tree_snapshot(runtime.pool.root)
    resp = httpx.post(f"{url}/v1/experts", data={"name": "hostile"}, headers=ADMIN, timeout=60,
                      files=[("file", (filename, data, "application/gzip"))])
    _assert_refused(resp, status, needle)
    assert runtime.pool.names() == ["keeper"]
    assert tree_snapshot(runtime.pool.root) == before


def _weights() -> bytes:
    header = json.dumps({"__metadata__": {}}).encode()
    return len(header).to_bytes(8, "little") + header


MULTIPART = {
    "safetensors that is a pickle": (
        [("files", ("adapter_config.json", CFG, "application/json")),
         ("files", ("adapter_model.safetensors", b"\x80\x04K\x01.", "application/octet-stream"))],
        415, "not a safetensors file"),
    "config sent as an image": (
        [("files", ("adapter_config.json", CFG, "image/png")),
         ("files", ("adapter_model.safetensors", _weights(), "application/octet-stream"))],
        415, "sent as 'image/png'"),
    "a zip archive": ([("file", ("adapter.zip", ZIP.getvalue(), "application/zip"))], 415, "is a zip archive"),
    "the same file twice": (
        [("files", ("adapter_config.json", CFG, "application/json")),
         ("files", ("adapter_config.json", CFG, "application/json"))],
        400, "uploaded twice"),
    "too many parts": ([("files", (f"f{i}.json", b"{}", "application/json")) for i in range(17)], 400, "too many"),
    "archive and files together": (
        [("file", ("a.tar.gz", tar_bytes([member("adapter_config.json", CFG)]), "application/gzip")),
         ("files", ("adapter_config.json", CFG, "application/json"))],
        400, "not both"),
    "a path as a file name": (
        [("files", ("../adapter_config.json", CFG, "application/json"))], 400, "not allowed"),
}


@pytest.mark.real
@pytest.mark.parametrize("case", list(MULTIPART))
def test_hostile_multipart_upload_gets_4xx_and_pool_is_unchanged(case, upload_server):
    url, runtime = upload_server
    files, status, needle = MULTIPART[case]
    before = tree_snapshot(runtime.pool.root)
    resp = httpx.post(f"{url}/v1/experts", data={"name": "hostile"}, files=files, headers=ADMIN, timeout=60)
    _assert_refused(resp, status, needle)
    assert runtime.pool.names() == ["keeper"]
    assert tree_snapshot(runtime.pool.root) == before


@pytest.mark.real
def test_wrong_request_content_type_is_415(upload_server):
    url, _ = upload_server
    resp = httpx.post(f"{url}/v1/experts", content=b"name=x", headers={**ADMIN, "content-type": "text/plain"})
    _assert_refused(resp, 415, "'text/plain' is not accepted")


@pytest.mark.real
def test_body_over_the_limit_without_content_length_is_413(upload_server):
    url, runtime = upload_server
    before = tree_snapshot(runtime.pool.root)

    def chunks(prefix=b""):     # no Content-Length: the limit is enforced while the body arrives
        yield prefix
        for _ in range(40):     # 5 MiB: over the admin's 4 MiB of room for an upload
            yield b"x" * (128 * 1024)

    part = (b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="a.tar.gz"\r\n'
            b"Content-Type: application/gzip\r\n\r\n")
    resp = httpx.post(f"{url}/v1/experts", content=chunks(part), timeout=60,
                      headers={**ADMIN, "content-type": "multipart/form-data; boundary=zzz"})
    _assert_refused(resp, 413, "over the limit")
    chat = httpx.post(f"{url}/v1/chat/completions", content=chunks(), timeout=60,
                      headers={"Authorization": "Bearer user-key", "content-type": "application/json"})
    _assert_refused(chat, 413, f"over the limit of {MiB} bytes")
    assert tree_snapshot(runtime.pool.root) == before


@pytest.mark.real
def test_a_user_key_gets_the_chat_body_limit_on_uploads_and_the_admin_key_gets_room_for_an_adapter(upload_server):
    url, _ = upload_server
    body = b"x" * (2 * MiB)       # over max_request_bytes, under an adapter upload's room
    headers = {"content-type": "multipart/form-data; boundary=zzz"}
    user = httpx.post(f"{url}/v1/experts", content=body, headers={**headers, "Authorization": "Bearer user-key"})
    _assert_refused(user, 413, "over the limit")
    admin = httpx.post(f"{url}/v1/experts", content=body, headers={**headers, **ADMIN})
    assert admin.status_code == 400, admin.text     # past the size limit: the multipart parser refuses it


def _slow_request(url: str, body_sent: bytes, declared: int) -> tuple[bytes, float]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (f"POST /v1/experts HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer admin-secret\r\n"
                f"Content-Type: multipart/form-data; boundary=zzz\r\nContent-Length: {declared}\r\n\r\n")
        t0 = time.monotonic()
        sock.sendall(head.encode() + body_sent)        # then send nothing more
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply, time.monotonic() - t0


@pytest.mark.real
def test_slow_upload_gets_408_with_the_envelope_after_the_deadline(upload_server):
    url, runtime = upload_server
    before = tree_snapshot(runtime.pool.root)
    reply, elapsed = _slow_request(url, b"--zzz\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nslow", 10_000)
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), reply[:200]
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "408" and "did not arrive within 2 s" in body["error"]["message"]
    assert 1.5 < elapsed < 20
    assert tree_snapshot(runtime.pool.root) == before
    assert httpx.get(f"{url}/healthz").status_code == 200     # and the server still answers
