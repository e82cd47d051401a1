"""The expert pool on S3-compatible storage (MOERGE_POOL_URL), against a real S3 server: moto's server mode,
started as a subprocess on a free loopback port with IAM authentication on, so wrong credentials are refused
the way a real bucket refuses them.

Each test gets its own bucket; two ExpertPools with different local folders on one registry are two replicas
that share the bucket and nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="needs the s3 extra: pip install 'moerge[s3]'")
boto3 = pytest.importorskip("boto3")
if shutil.which("moto_server", path=str(Path(sys.executable).parent)) is None:
    pytest.skip("needs moto's server (the test extra: moto[server])", allow_module_level=True)

from moerge.config import Settings  # noqa: E402
from moerge.experts.pool import ExpertPool, open_pool  # noqa: E402
from moerge.experts.remote_store import ArtifactStoreUnavailableError, RemoteArtifactStore  # noqa: E402
from tests.helpers import make_lora, tree_snapshot  # noqa: E402

REGION = "us-east-1"
# the requests moto serves before it turns IAM authentication on: create_user, put_user_policy, create_access_key
SETUP_REQUESTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on loopback with one IAM user allowed everything; killed at the end of the module."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_REQUESTS))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start on port {port} (exit {proc.poll()})")
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="moerge")
        iam.put_user_policy(UserName="moerge", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="moerge")["AccessKey"]
        yield {"endpoint": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """No credentials or config from this machine's ~/.aws or environment leak into a test."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MOERGE_POOL_URL", "MOERGE_POOL_STORAGE_OPTIONS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3(s3_server, aws_env):
    """A fresh bucket: its pool URL, storage options with the good credentials, and a boto3 client."""
    client = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name=REGION,
                          aws_access_key_id=s3_server["key"], aws_secret_access_key=s3_server["secret"])
    bucket = f"pool-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    options = {"endpoint_url": s3_server["endpoint"], "key": s3_server["key"], "secret": s3_server["secret"]}
    return {"url": f"s3://{bucket}/moerge", "bucket": bucket, "options": options, "client": client, **s3_server}


def bucket_objects(s3) -> dict[str, str]:
    """key -> ETag of every object in the test's bucket."""
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"])
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def blob_key(digest: str) -> str:
    return f"moerge/blobs/{digest[:2]}/{digest}"


def replica(root: Path, registry: str, s3, tiny_spec, embedder, **options) -> ExpertPool:
    return ExpertPool(root, registry, tiny_spec, embed=embedder.encode, store_url=s3["url"],
                      storage_options=options or s3["options"])


@pytest.fixture
def registry(tmp_path) -> str:
    (tmp_path / "db").mkdir()
    return f"sqlite:///{tmp_path / 'db' / 'registry.sqlite'}"


def test_second_replica_reads_the_expert_through_s3(tmp_path, s3, registry, tiny_spec, tiny_base, tiny_adapter,
                                                   embedder, monkeypatch):
    a = replica(tmp_path / "a", registry, s3, tiny_spec, embedder)
    card = a.register_lora(tiny_adapter, "adder", "adds two numbers", examples=["what is 2 + 3?"])
    assert set(bucket_objects(s3)) == {blob_key(d) for d in card.artifacts.values()}
    assert not (tmp_path / "a" / "blobs").exists()  # nothing of the store on local disk but the cache
    a.close()

    # replica B: another local folder, configured the way a deployment is (MOERGE_POOL_URL and the AWS_* variables)
    monkeypatch.setenv("MOERGE_POOL_URL", s3["url"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    settings = Settings(pool_dir=tmp_path / "b", database_url=registry, bundled_pool=False)
    b = open_pool(settings, base_spec=tiny_spec, embed=embedder.encode)
    try:
        assert isinstance(b.store, RemoteArtifactStore) and b.store.url == s3["url"]
        assert b.store.cached_digests() == set()
        got = b.get("adder")
        # sizing a blob (the console's pool page) reads the object's metadata, never downloads it
        sizes = {d: b.store.size(d) for d in got.artifacts.values()}
        assert sizes == {d: s3["client"].head_object(Bucket=s3["bucket"], Key=blob_key(d))["ContentLength"]
                         for d in got.artifacts.values()} and b.store.cached_digests() == set()
        assert b.artifact_tensors(got, "example_embeddings")["embeddings"].shape == (1, 384)
        folder = b.adapter_dir(got)
        assert folder.parent == tmp_path / "b" / "adapters"
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (folder / name).read_bytes() == (tiny_adapter / name).read_bytes()
        cached = b.store.path(got.artifacts["adapter_weights"])
        assert cached.parent.parent == tmp_path / "b" / "cache" / "blobs"
        assert os.path.samefile(cached, folder / "adapter_model.safetensors")  # a hard link into the cache
        # B writes to the bucket too, and A, started again, reads B's expert
        other = make_lora(tiny_base, tmp_path / "other", base_name="tiny/llama", seed=1)
        b.register_lora(other, "other", "another adapter")
        assert sorted(c.name for c in b.list()) == ["adder", "other"]
    finally:
        b.close()
    a = replica(tmp_path / "a", registry, s3, tiny_spec, embedder)
    try:
        assert a.adapter_dir(a.get("other")).joinpath("adapter_model.safetensors").read_bytes() == \
            (other / "adapter_model.safetensors").read_bytes()
    finally:
        a.close()


def test_remove_deletes_the_remote_blobs_no_other_card_uses(tmp_path, s3, registry, tiny_spec, tiny_adapter,
                                                            embedder):
    a = replica(tmp_path / "a", registry, s3, tiny_spec, embedder)
    b = replica(tmp_path / "b", registry, s3, tiny_spec, embedder)
    try:
        x = a.register_lora(tiny_adapter, "x", "first")
        y = a.register_lora(tiny_adapter, "y", "second")  # same weights: blobs shared
        b.adapter_dir(b.get("x"))  # B has its copies in its cache
        a.remove("x")
        keys = set(bucket_objects(s3))
        assert blob_key(y.artifacts["adapter_weights"]) in keys
        assert blob_key(x.artifacts["card_embedding"]) not in keys
        assert not a.store.has(x.artifacts["card_embedding"])
        a.remove("y")
        assert bucket_objects(s3) == {}
        assert a.store.all_digests() == set() and a.store.cached_digests() == set()
        # B's stale copies go at its next sweep (the next write or start)
        b.store.sweep(b.registry.referenced_digests())
        assert b.store.cached_digests() == set()
    finally:
        a.close()
        b.close()


def test_failed_upload_leaves_bucket_and_registry_unchanged(tmp_path, s3, registry, tiny_spec, tiny_base,
                                                            tiny_adapter, embedder):
    """S3 refuses one blob of a registration (a bucket policy denies PutObject on its key): what the
    registration uploaded before it is deleted, no card is written, and the same registration succeeds
    once the bucket accepts it."""
    pool = replica(tmp_path / "a", registry, s3, tiny_spec, embedder)
    try:
        pool.register_lora(tiny_adapter, "kept", "an expert registered before")
        new = make_lora(tiny_base, tmp_path / "new", base_name="tiny/llama", r=8, seed=7)  # a new config too
        weights = hashlib.sha256((new / "adapter_model.safetensors").read_bytes()).hexdigest()
        config = hashlib.sha256((new / "adapter_config.json").read_bytes()).hexdigest()
        assert not pool.store.has(config)  # so the registration uploads it before it fails
        before, local_before = bucket_objects(s3), tree_snapshot(tmp_path / "a")
        deny = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
            "Resource": f"arn:aws:s3:::{s3['bucket']}/{blob_key(weights)}"}]}
        s3["client"].put_bucket_policy(Bucket=s3["bucket"], Policy=json.dumps(deny))
        with pytest.raises(ArtifactStoreUnavailableError, match=f"{s3['url']}.*uploading blob {weights}"):
            pool.register_lora(new, "new", "refused by the bucket")
        assert pool.names() == ["kept"]
        assert bucket_objects(s3) == before
        assert tree_snapshot(tmp_path / "a") == local_before
        s3["client"].delete_bucket_policy(Bucket=s3["bucket"])
        card = pool.register_lora(new, "new", "accepted now")
        assert blob_key(card.artifacts["adapter_weights"]) in bucket_objects(s3)
    finally:
        pool.close()


def test_a_crash_leaves_only_blobs_the_next_start_sweeps(tmp_path, s3, registry, tiny_spec, tiny_adapter,
                                                         embedder):
    """A replica killed between its upload and its commit left a blob no card references."""
    pool = replica(tmp_path / "a", registry, s3, tiny_spec, embedder)
    card = pool.register_lora(tiny_adapter, "kept", "an expert")
    pool.close()
    orphan = b"half a registration"
    digest = hashlib.sha256(orphan).hexdigest()
    s3["client"].put_object(Bucket=s3["bucket"], Key=blob_key(digest), Body=orphan)
    pool = replica(tmp_path / "b", registry, s3, tiny_spec, embedder)
    try:
        assert set(bucket_objects(s3)) == {blob_key(d) for d in card.artifacts.values()}
    finally:
        pool.close()


@pytest.mark.parametrize("fault", ["wrong secret", "unknown key", "no such bucket", "unreachable endpoint"])
def test_an_unusable_store_is_a_clear_error_not_local_disk(tmp_path, s3, registry, tiny_spec, embedder, fault):
    options = dict(s3["options"])
    url = s3["url"]
    if fault == "wrong secret":
        options["secret"] = "not-the-secret"
    elif fault == "unknown key":
        options["key"] = "AKIANOSUCHKEY0000000"
    elif fault == "no such bucket":
        url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/moerge"
    else:
        options["endpoint_url"] = f"http://127.0.0.1:{free_port()}"
    reason = {"wrong secret": "access denied", "unknown key": "access denied", "no such bucket": "no such bucket",
              "unreachable endpoint": "unreachable"}[fault]
    root = tmp_path / "pool"
    with pytest.raises(ArtifactStoreUnavailableError, match=reason) as err:
        ExpertPool(root, registry, tiny_spec, embed=embedder.encode, store_url=url, storage_options=options)
    assert url in err.value.message and "MOERGE_POOL_URL" in err.value.message
    assert err.value.status == 503
    assert not (root / "blobs").exists()


@pytest.mark.real
def test_real_lora_from_s3_loads_in_peft_on_another_replica(tmp_path, s3, registry, base_model_dir, real_spec,
                                                            embedder):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_lora(base_model_dir, tmp_path / "real", base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    a = ExpertPool(tmp_path / "a", registry, real_spec, embed=embedder.encode, store_url=s3["url"],
                   storage_options=s3["options"])
    a.register_lora(adapter, "real", "a real adapter")
    a.close()
    b = ExpertPool(tmp_path / "b", registry, real_spec, embed=embedder.encode, store_url=s3["url"],
                   storage_options=s3["options"])
    try:
        folder = b.adapter_dir(b.get("real"))
        base = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(folder))
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            with_lora = model(ids).logits
            with model.disable_adapter():
                without = model(ids).logits
        assert not torch.allclose(with_lora, without)  # the adapter read from S3 changes the output
    finally:
        b.close()
