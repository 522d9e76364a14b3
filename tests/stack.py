"""One local Ray cluster + the Tandem app over real vLLM-CPU engines, per test session.

The `stack` fixture is registered in tests/conftest.py, so tests/integration and tests/faults share
the one stack a session starts (tests/faults run last: they kill and stall its parts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from serving.config import ServingSpec, TenantSpec, default_config_path, load_spec
from tests.conftest import free_port

#: The external model of the stack: an `engine: openai` pool over a `vllm serve` of tiny-intent that
#: tests/integration/test_external.py starts (and kills) on `Stack.upstream_port`.
EXTERNAL = "tiny-external"
#: The API key that `vllm serve` requires; Tandem reads it from a file (a mounted Secret's stand-in).
UPSTREAM_KEY = "tandem-test-upstream-key"
#: The example spec whose external model the stack serves.
EXTERNAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "external-vllm.yaml"

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
    #: Where the external model's `vllm serve` listens (started by test_external.py).
    upstream_port: int = 0
    #: The file holding the prompt template library the ingress reloads (templates.library_file).
    templates_file: Path | None = None

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
    # The template library from a file the ingress re-reads every second (as from a mounted ConfigMap).
    state = tmp_path_factory.mktemp("gateway")
    templates_file = state / "library.yaml"
    templates_file.write_text(yaml.safe_dump(base.templates.library.model_dump(mode="json")))
    templates = base.templates.model_copy(
        update={"library_file": str(templates_file), "reload_interval_s": 1.0}
    )
    # An external OpenAI-compatible server behind the ingress (down until test_external.py starts it),
    # degrading to the intent tier.
    upstream_port = free_port()
    key_file = state / "upstream-key"
    key_file.write_text(UPSTREAM_KEY + "\n")
    # The external model and its tier as configs/external-vllm.yaml gives them (the README's example),
    # on this run's port, the key from a file (a mounted Secret's stand-in), health checked every second.
    example = load_spec(EXTERNAL_CONFIG)
    external = example.model(EXTERNAL)
    upstream = external.external.model_copy(
        update={
            "endpoints": [f"http://127.0.0.1:{upstream_port}"],
            "api_key_env": None,
            "api_key_file": str(key_file),
            "health_period_s": 1.0,
        }
    )
    pool = external.serving_pool.model_copy(update={"upstream": upstream})
    external = external.model_copy(update={"pools": [pool]})
    tiers = [*base.tiers, example.tier("external")]
    # /openapi.json is off by default (http.docs); the fuzz test (test_fuzz_openapi.py) reads it.
    http = base.http.model_copy(update={"docs": True})
    spec = base.model_copy(
        update={
            "http": http,
            "server": server,
            "admission": admission,
            "sessions": sessions,
            "templates": templates,
            "models": [*base.models, external],
            "tiers": tiers,
        }
    )
    spec = ServingSpec.model_validate(spec.model_dump(mode="json"))  # validate the whole as a user's file
    _build_models(Path(spec.model_dir).expanduser(), None, force=False)
    # Logical CPUs only: room for the second app some tests deploy next to the main one.
    start_local_ray(spec, num_cpus=8)
    try:
        serve.run(build_app_from_spec(spec), name=APP_NAME, route_prefix="/")
        yield Stack(
            spec,
            f"http://127.0.0.1:{server.port}",
            f"http://127.0.0.1:{server.dashboard_port}",
            upstream_port,
            templates_file,
        )
    finally:
        serve.shutdown()
        ray.shutdown()
