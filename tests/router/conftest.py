"""One service on the real bundled library (reference engine), shared by the router tests that chat with
it (chain, verify): one start for all of them."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def served_library(real_settings, tmp_path_factory):
    """(url, runtime) of a server over a fresh pool of the bundled library."""
    from moerge.experts.bundled import library_entries
    from moerge.service.app import create_app
    from moerge.service.runtime import Runtime
    from moerge.startup import start
    from tests.service.test_openai_client import ServerThread
    assert len(library_entries()) == 12, "the bundled library is incomplete: run `moerge experts build`"
    system = start(real_settings, executor="reference", pool_dir=tmp_path_factory.mktemp("librarypool"), bundled=True,
                   progress=lambda m: None)
    runtime = Runtime(system)
    with ServerThread(create_app(runtime)) as url:
        yield url, runtime
    system.shutdown()
