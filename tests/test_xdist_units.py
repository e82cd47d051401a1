"""`make test`'s two xdist workers: the files that start engines, servers, the eval CLI or the stack share one
unit of work (tests/conftest.py), so no two of them ever run at once."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ENGINE_FILES, ENGINE_GROUP, work_unit

ROOT = Path(__file__).resolve().parent.parent
# what a test file does when it starts a vLLM engine or server, the eval CLI, or the deployment stack
STARTS_AN_ENGINE = re.compile(r'executor="vllm"|executor="servers"|vllm\.entrypoints|wait_ready\(|'
                              r'"moerge\.cli", "eval"|stack\.sh')


def test_every_file_that_starts_an_engine_is_in_the_engine_unit_and_every_listed_file_exists():
    starting = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                if p.name != Path(__file__).name and STARTS_AN_ENGINE.search(p.read_text())}
    assert starting and starting <= ENGINE_FILES, sorted(starting - ENGINE_FILES)
    assert all((ROOT / f).is_file() for f in ENGINE_FILES), sorted(f for f in ENGINE_FILES if not (ROOT / f).is_file())


def test_work_units_keep_files_whole_and_the_router_package_together():
    assert work_unit("tests/executors/test_vllm.py::test_x[base]") == ENGINE_GROUP
    assert work_unit("tests/stack/test_stack.py::test_y") == ENGINE_GROUP
    assert work_unit("tests/router/test_joint.py::test_z") == work_unit("tests/router/test_verify_library.py::t")
    assert work_unit("tests/kernels/test_reroute.py::test_a[1]") == work_unit("tests/kernels/test_reroute.py::test_b")
    assert work_unit("tests/kernels/test_reroute.py::t") != work_unit("tests/kernels/test_merge.py::t")
