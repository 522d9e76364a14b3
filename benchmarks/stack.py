"""Starting and measuring the stacks benchmarks run: processes, their CPU, ports, `tandem up`.

Shared by the benchmark scripts (overhead, idle, admission, sessions, stream_stall): each owns its
measurement; how a server is started, found and stopped lives here once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import BenchmarkError
from serving.config import DisaggMode, ModelSpec, ServingSpec
from serving.replicas.ports import listen_port

logger = logging.getLogger(__name__)

#: How long a started server may take to answer /v1/models.
READY_TIMEOUT_S = 300.0
#: How long an in-process engine's child processes may take to exit after shutdown.
_ENGINE_EXIT_TIMEOUT_S = 30.0


#: Process roles, by a substring of the process's command line (Ray and vLLM set process titles).
_ROLES = (
    ("haproxy", "haproxy (serve ingress)"),
    ("benchmarks.vllm_cli serve", "vllm serve api server"),
    ("ProxyActor", "serve proxy"),
    ("ServeReplica:tandem:ingress", "ingress"),
    ("ServeReplica", "engine replica (AsyncLLM)"),
    ("EngineCore", "vllm engine core"),
    ("Worker", "vllm worker"),
    ("ServeController", "serve controller"),
    ("gcs_server", "ray gcs"),
    ("raylet", "raylet"),
    ("dashboard", "ray dashboard"),
)


def role_of(cmdline: list[str]) -> str:
    cmd = " ".join(cmdline)
    return next((role for key, role in _ROLES if key in cmd), "other")


def stack_processes(root: int, marker: str | None = None) -> list[Any]:
    """`root`'s process tree, plus any process whose command line names `marker` (a Ray temp dir)."""
    import psutil

    procs: dict[int, Any] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        top = psutil.Process(root)
        for p in [top, *top.children(recursive=True)]:
            procs[p.pid] = p
    if marker:
        for p in psutil.process_iter(["cmdline"]):
            if any(marker in a for a in (p.info["cmdline"] or [])):
                procs.setdefault(p.pid, p)
    return list(procs.values())


def cpu_seconds(procs: list[Any]) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by each of `procs`, with its role."""
    import psutil

    out = {}
    for p in procs:
        try:
            with p.oneshot():
                t = p.cpu_times()
                cmd = p.cmdline()
        except psutil.Error:
            continue
        out[p.pid] = (role_of(cmd), t.user + t.system)
    return out


@contextmanager
def pool_env(env: Mapping[str, str]) -> Iterator[None]:
    """`env` applied to os.environ, restored afterwards (the replica gets it via runtime_env)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_for_exit(pids: set[int]) -> None:
    """Wait for the engine's processes (children started by this process) to be gone."""
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):  # it exited already: nothing to wait for
            proc = psutil.Process(pid)
            if "resource_tracker" not in " ".join(proc.cmdline()):
                procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=_ENGINE_EXIT_TIMEOUT_S)
    for proc in alive:
        logger.warning("engine process %d still alive after shutdown; terminating it", proc.pid)
        proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=10)
    for proc in alive:
        proc.kill()
    if alive:
        psutil.wait_procs(alive, timeout=10)


def child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def free_port() -> int:
    """A TCP port free right now, for a server started later: outside the ephemeral range, where an
    outgoing connection could take it first (serving.replicas.ports)."""
    return listen_port()


def single_model_spec(spec: ServingSpec, model: ModelSpec, port: int | None) -> ServingSpec:
    """`spec` serving only `model` (and its tiers), on free (or given) ports."""
    server = spec.server.model_copy(update={"port": port or free_port(), "dashboard_port": free_port()})
    tiers = [t for t in spec.tiers if t.model == model.name]
    names = {t.name for t in tiers}
    tiers = [t.model_copy(update={"fallback": [f for f in t.fallback if f in names]}) for t in tiers]
    routing = spec.routing.model_copy(
        update={
            "default_tier": tiers[0].name if tiers else None,
            "rules": [r for r in spec.routing.rules if r.tier in names],
        }
    )
    return spec.model_copy(update={"server": server, "models": [model], "tiers": tiers, "routing": routing})


@dataclass
class Server:
    """A server process (and its tree) under test."""

    name: str
    proc: subprocess.Popen
    url: str
    log: Path
    marker: str | None = None  # a string in the command line of its detached processes (Ray temp dir)

    def processes(self) -> list[Any]:
        return stack_processes(self.proc.pid, self.marker)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if self.name == "tandem" else signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def start_server(name: str, cmd: list[str], env: Mapping[str, str], url: str, log: Path) -> Server:
    import httpx

    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)  # fmt: skip
    server = Server(name, proc, url, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchmarkError(f"{name} exited ({proc.returncode}): see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return server
        time.sleep(2)
    server.stop()
    raise BenchmarkError(f"{name} did not answer within {READY_TIMEOUT_S:.0f} s: see {log}")


def start_tandem(spec: ServingSpec, model: ModelSpec, disagg: str, workdir: Path) -> Server:
    import yaml

    from serving.cli import ray_temp_dir

    if model.disaggregated and disagg == "on":
        model = model.model_copy(
            update={"disaggregation": model.disaggregation.model_copy(update={"mode": DisaggMode.ON})}
        )
    one = single_model_spec(spec, model, None)
    path = workdir / "tandem.yaml"
    path.write_text(yaml.safe_dump(one.model_dump(mode="json", exclude_defaults=True)))
    port = one.server.port
    cmd = [sys.executable, "-m", "serving.cli", "up", "--config", str(path), "--port", str(port),
           "--dashboard-port", str(one.server.dashboard_port)]  # fmt: skip
    server = start_server("tandem", cmd, {"TANDEM_STATE_DIR": str(workdir / "state")},
                    f"http://127.0.0.1:{port}", workdir / "tandem.log")  # fmt: skip
    server.marker = ray_temp_dir(port)
    return server
