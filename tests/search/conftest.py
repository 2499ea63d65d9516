"""Servers for the study tests: a real PostgreSQL (one per session) and a local Ray instance (one
per module that asks for it).

PostgreSQL: the URL in SEQLAB_TEST_POSTGRES_URL if set (CI starts one server for the whole run,
see .ci/run), else a server of the session's own when the binaries exist (tests/pgserver.py),
else the tests that need it skip, or fail where SEQLAB_REQUIRE_POSTGRES=1 (CI).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests import pgserver


@pytest.fixture(scope="session")
def study_pg_url():
    url = os.environ.get("SEQLAB_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    missing = pgserver.missing_tools()
    if missing:
        why = (
            f"no PostgreSQL for the study tests: SEQLAB_TEST_POSTGRES_URL is not set and "
            f"{', '.join(missing)} are not on PATH or in /usr/lib/postgresql/*/bin"
        )
        if os.environ.get("SEQLAB_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{why} (SEQLAB_REQUIRE_POSTGRES=1)")
        pytest.skip(why)
    folder = pgserver.make_folder()
    try:
        yield pgserver.start(folder)
    finally:
        pgserver.stop(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def study_ray():
    """A local Ray instance with 2 CPUs, connected to from this process; yields its address."""
    ray = pytest.importorskip("ray")
    # a folder of its own, short: Ray's unix sockets live in it
    folder = tempfile.mkdtemp(prefix="ray-")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        _temp_dir=folder,
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
