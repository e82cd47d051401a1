"""Shared fixtures: a tiny random Llama (shapes only) and the real base model (prepared once)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tests.helpers import make_lora, tiny_llama_folder  # noqa: E402


@pytest.fixture(scope="session")
def real_settings(tmp_path_factory):
    """Settings on a per-session MOERGE_HOME whose models folder is shared with the user's cache.

    The converted base model is reused from MOERGE_HOME (or ~/.cache/moerge) so tests do not
    convert the GGUF again; pools and registries always live in fresh temporary folders.
    """
    from moerge.config import Settings
    from moerge.assets import ensure_base_model

    home = Path(os.environ.get("MOERGE_HOME", os.path.expanduser("~/.cache/moerge")))
    shared = Settings(home=home, bundled_pool=False)
    ensure_base_model(shared)
    pool_dir = tmp_path_factory.mktemp("pool")
    return Settings(home=home, pool_dir=pool_dir, bundled_pool=False, executor="reference")


@pytest.fixture(scope="session")
def base_model_dir(real_settings) -> Path:
    return real_settings.base_model_dir


@pytest.fixture(scope="session")
def real_spec(base_model_dir, real_settings):
    from moerge.experts.lora import base_spec_from_folder
    return base_spec_from_folder(str(base_model_dir), real_settings.base_model_id)


@pytest.fixture(scope="session")
def embedder():
    from moerge.models.embedder import get_embedder
    return get_embedder()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_spec(tiny_base):
    from moerge.experts.lora import base_spec_from_folder
    return base_spec_from_folder(str(tiny_base), "tiny/llama")


@pytest.fixture
def tiny_adapter(tmp_path, tiny_base) -> Path:
    return make_lora(tiny_base, tmp_path / "adapter", base_name="tiny/llama", seed=0)


@pytest.fixture
def tiny_pool(tmp_path, tiny_spec, embedder):
    from moerge.experts.pool import ExpertPool
    root = tmp_path / "pool"
    pool = ExpertPool(root, f"sqlite:///{root}/registry.sqlite", tiny_spec, embed=embedder.encode)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def tiny_chat_base(tmp_path_factory, base_model_dir):
    """A tiny random Llama with the real tokenizer and chat template (vocab 49152)."""
    import shutil
    folder = tiny_llama_folder(tmp_path_factory.mktemp("tinychat"), hidden=32, layers=2, vocab=49152)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base_model_dir / f, folder / f)
    return folder


# `make test` runs on two pytest-xdist workers (`-n 2 --dist loadfile`, with the scheduler below). Each file runs
# whole in one worker (its module fixtures start once). The files that start a vLLM engine, vLLM servers, the
# eval CLI or the deployment stack, or that assert a timing, run one after another in one worker: two vLLM
# engines at once would each pin their threads to both cores and slow each other several times over, and two
# of them may need 16 GB. The other worker takes the rest, one file at a time, on one torch thread.
ENGINE_FILES = {
    "tests/executors/test_vllm.py", "tests/executors/test_batch_independence.py",
    "tests/executors/test_vllm_faults.py", "tests/executors/test_vllm_moe.py",
    "tests/executors/test_vllm_servers.py", "tests/service/test_load.py", "tests/service/test_remote_model.py",
    "tests/eval/test_harness.py", "tests/eval/test_library_content.py", "tests/stack/test_stack.py",
    "tests/stack/test_compose.py",          # may run `scripts/stack.sh install` (apt), as test_stack may
    "tests/experts/test_replicas.py", "tests/experts/test_pool_faults.py", "tests/service/test_backpressure.py",
    "tests/service/test_security.py",
}
ENGINE_GROUP = "engines"


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to under xdist: the engine group, the router package (its package
    fixture `served_library` starts once), or its own file."""
    path = nodeid.split("::", 1)[0]
    if path in ENGINE_FILES:
        return ENGINE_GROUP
    if path.startswith("tests/router/"):
        return "tests/router"
    return path


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the engine files as one unit (xdist's own `loadgroup` cannot be used: it
    renames items through `Item._nodeid`, which pytest 9.2 no longer reads)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return Units(config, log)


def pytest_collection_modifyitems(config, items):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # the engine unit first, so the longest unit starts at once; each file's tests stay in order
        items.sort(key=lambda it: work_unit(it.nodeid) != ENGINE_GROUP)


def pytest_runtest_setup(item):
    """Under xdist the other worker's tests run on one torch thread, leaving a core to the engine files."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(2 if work_unit(item.nodeid) == ENGINE_GROUP else 1)

