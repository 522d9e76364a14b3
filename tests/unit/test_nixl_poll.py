"""The NIXL progress-thread fix: the spec's poll timeout reaches P/D vLLM engines, and the vLLM
plugin gives agents with a progress thread a non-zero poll timeout (no busy loop)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from serving.app import deployment_options
from serving.config import ModelSpec, Role
from serving.replicas.engines import vllm_plugin
from serving.replicas.engines.vllm_plugin import POLL_ENV, _patch_bindings


def _pd_model(**disagg: Any) -> ModelSpec:
    return ModelSpec(
        name="m",
        source="local:m",
        pools=[
            {"role": "prefill", "engine": "vllm", "env": {"A": "1"}},
            {"role": "decode", "engine": "vllm"},
        ],
        disaggregation=disagg,
    )


def _env(model: ModelSpec, role: str) -> dict[str, str]:
    opts = deployment_options(model.pool(Role(role)), model)
    return opts["ray_actor_options"].get("runtime_env", {}).get("env_vars", {})


def test_pd_vllm_pools_get_the_poll_timeout_from_the_spec() -> None:
    model = _pd_model(nixl_progress_poll_ms=7)
    assert _env(model, "prefill") == {"A": "1", POLL_ENV: "7000"}
    assert _env(model, "decode") == {POLL_ENV: "7000"}


def test_zero_keeps_nixl_busy_loop_and_pool_env_wins() -> None:
    assert POLL_ENV not in _env(_pd_model(nixl_progress_poll_ms=0), "decode")
    model = _pd_model()
    model.pools[1].env[POLL_ENV] = "123"
    assert _env(model, "decode")[POLL_ENV] == "123"


def test_colocated_pools_have_no_poll_setting() -> None:
    model = ModelSpec(name="m", source="local:m", pools=[{"role": "colocated", "engine": "vllm"}])
    assert POLL_ENV not in _env(model, "colocated")


class _Config:
    def __init__(self, prog_thread: bool, delay: int = 0) -> None:
        self.useProgThread = prog_thread
        self.pthrDelay = delay


def test_patch_sets_delay_only_for_busy_progress_threads() -> None:
    made: list[tuple[str, int]] = []
    bindings = SimpleNamespace(nixlAgent=lambda name, cfg: made.append((name, cfg.pthrDelay)) or name)
    assert _patch_bindings(bindings, 5000)
    assert bindings.nixlAgent("a", _Config(True)) == "a"
    bindings.nixlAgent("b", _Config(False))
    bindings.nixlAgent("c", _Config(True, delay=42))
    assert made == [("a", 5000), ("b", 0), ("c", 42)]
    # Loading the plugin twice does not wrap twice.
    assert not _patch_bindings(bindings, 9)
    bindings.nixlAgent("d", _Config(True))
    assert made[-1] == ("d", 5000)


@pytest.mark.parametrize("value", ["", "0", "-1", "abc"])
def test_register_does_nothing_without_a_valid_setting(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(POLL_ENV, value)
    imported: list[str] = []
    monkeypatch.setattr(vllm_plugin, "_patch_bindings", lambda *a: imported.append("patched") or True)
    vllm_plugin.register()
    assert imported == []


def test_register_patches_the_installed_nixl(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nixl._api")
    monkeypatch.setenv(POLL_ENV, "3000")
    seen: list[int] = []
    monkeypatch.setattr(vllm_plugin, "_patch_bindings", lambda b, us: seen.append(us) or True)
    vllm_plugin.register()
    assert seen == [3000]


def test_the_ray_environment_of_the_spec() -> None:
    """`tandem up` and the chart start Ray with the data plane and the worker niceness of the spec."""
    from serving.config import DATA_PLANE_ENV, DataPlane, ServerSpec

    env = ServerSpec().ray_env()
    assert env == {**DATA_PLANE_ENV[DataPlane.HAPROXY], "RAY_worker_niceness": "0"}
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    proxy = ServerSpec(data_plane="proxy", worker_niceness=15).ray_env()
    assert proxy["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and proxy["RAY_worker_niceness"] == "15"
