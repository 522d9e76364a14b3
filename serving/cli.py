"""`tandem` command line: build the local models, run the stack, show its status, check a spec.

tandem model build [--dir DIR] [--force]
tandem up [--config FILE] [--host H] [--port P]
tandem status [--config FILE] [--dashboard URL]
tandem config check FILE
tandem templates check FILE [--config SPEC]   (a template library file, before it goes into a ConfigMap)
tandem key new --tenant NAME [--scope S] [--model M]   (prints a new API key and the entry to store)
tandem key hash < key-file          (the key on stdin, or typed at a hidden prompt; not on argv)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import get_args

from serving.config import (
    KeyScope,
    ServingSpec,
    SpecError,
    default_config_path,
    default_model_dir,
    load_spec,
)

logger = logging.getLogger("tandem")

APP_NAME = "tandem"


def _build_models(model_dir: Path, names: list[str] | None, force: bool) -> dict[str, Path]:
    from serving.local_model import build_local_models

    return build_local_models(model_dir, names=names, force=force)


def cmd_model_build(args: argparse.Namespace) -> int:
    model_dir = Path(args.dir or default_model_dir()).expanduser()
    built = _build_models(model_dir, args.name or None, args.force)
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0


def _local_models_needed(spec: ServingSpec) -> list[str]:
    return [n for m in spec.models if (n := m.local_model_name()) is not None]


def ray_temp_dir(port: int) -> str:
    """A Ray temp dir of our own (the default one is machine-wide); short, for Ray's socket paths."""
    return os.path.join(tempfile.gettempdir(), f"tandem-{os.getuid()}-{port}")


def local_haproxy_ports() -> dict[str, str]:
    """Free ports for the HAProxy data plane's metrics and stats listeners of a local cluster.

    NOTE(why): Serve's HAProxy binds fixed ports (9101 metrics, 8404 stats) on every interface, so a
    second local cluster on the machine (another `tandem up`, a test cluster) failed to start its
    proxy. Each local cluster gets its own (a port already set in the environment is kept).
    """
    from serving.replicas.ports import listen_port

    def free() -> str:
        return str(listen_port())  # outside the ephemeral range: HAProxy binds it later

    return {"RAY_SERVE_HAPROXY_METRICS_PORT": free(), "RAY_SERVE_HAPROXY_STATS_PORT": free()}


def start_local_ray(spec: ServingSpec, num_cpus: int | None = None) -> None:
    """Start (or join, with server.ray_address) Ray, and Serve's HTTP proxy on server.host:port.

    `num_cpus` overrides the logical CPUs of a fresh local cluster (default: the machine's).
    """
    import ray
    from ray import serve

    if spec.server.ray_address is None:
        # A fresh local cluster owned by this process; it stops when this process does.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Read by Serve's controller and replicas at start: set before Ray starts them.
        for key, value in {**spec.server.ray_env(), **local_haproxy_ports()}.items():
            os.environ.setdefault(key, value)
        ray.init(
            address="local",
            namespace=APP_NAME,
            _temp_dir=ray_temp_dir(spec.server.port),
            _node_ip_address="127.0.0.1",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=spec.server.dashboard_port,
            log_to_driver=True,
            num_cpus=num_cpus,
        )
    else:
        ray.init(address=spec.server.ray_address, namespace=APP_NAME)
    serve.start(http_options={"host": spec.server.host, "port": spec.server.port})


def cmd_up(args: argparse.Namespace) -> int:
    from ray import serve

    from serving.app import run_app

    spec = load_spec(args.config)
    overrides = {
        k: v
        for k, v in (("host", args.host), ("port", args.port), ("dashboard_port", args.dashboard_port))
        if v is not None
    }
    if overrides:
        spec = spec.model_copy(update={"server": spec.server.model_copy(update=overrides)})
    needed = _local_models_needed(spec)
    if needed:
        _build_models(Path(spec.model_dir).expanduser(), needed, force=False)

    import ray

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        logger.info("received signal %d, shutting down", signum)
        stop.set()

    start_local_ray(spec)
    try:
        # SIGTERM (Ray installs its own handler in ray.init) and Ctrl-C both end in a clean stop.
        signal.signal(signal.SIGTERM, _on_signal)
        run_app(spec, APP_NAME, route_prefix="/")
        signal.signal(signal.SIGINT, _on_signal)
        if stop.is_set():
            return 0
        url = f"http://{spec.server.host}:{spec.server.port}"
        print(
            f"Tandem is serving the OpenAI API at {url}/v1 (models: "
            f"{', '.join(m.name for m in spec.models)})",
            flush=True,
        )
        if spec.server.ray_address is None:
            print(f"Ray dashboard: http://127.0.0.1:{spec.server.dashboard_port}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        # A timed wait keeps the main thread responsive to signals.
        while not stop.wait(0.5):
            continue
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        print("Tandem stopped.", flush=True)
    return 0


def fetch_status(dashboard: str, timeout_s: float = 5.0) -> dict:
    """Serve application details from the Ray dashboard's REST API."""
    url = dashboard.rstrip("/") + "/api/serve/applications/"
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.load(resp)


def format_status(details: dict) -> str:
    """Pools, replicas and their health, one line per deployment."""
    lines = []
    apps = details.get("applications") or {}
    if not apps:
        return "no Tandem application is deployed"
    for app_name, app in apps.items():
        lines.append(f"application {app_name}: {app.get('status')}")
        for dep_name, dep in sorted((app.get("deployments") or {}).items()):
            replicas = dep.get("replicas") or []
            running = sum(1 for r in replicas if r.get("state") == "RUNNING")
            target = dep.get("target_num_replicas", len(replicas))
            states = ", ".join(sorted({r.get("state", "?") for r in replicas})) or "-"
            lines.append(
                f"  {dep_name:<32} {dep.get('status', '?'):<10} replicas {running}/{target} "
                f"running  [{states}]"
            )
            msg = dep.get("message")
            if msg and dep.get("status") != "HEALTHY":
                lines.append(f"      {msg.splitlines()[0]}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    dashboard = args.dashboard
    if dashboard is None:
        spec = load_spec(args.config)
        dashboard = f"http://127.0.0.1:{spec.server.dashboard_port}"
    try:
        details = fetch_status(dashboard)
    except (urllib.error.URLError, OSError) as e:
        print(f"cannot reach the Ray dashboard at {dashboard}: {e}. Is `tandem up` running?", file=sys.stderr)
        return 1
    print(format_status(details))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    pools = sum(len(m.pools) for m in spec.models)
    print(f"{args.file}: ok ({len(spec.models)} models, {pools} pools, {len(spec.tiers)} tiers)")
    return 0


def cmd_templates_check(args: argparse.Namespace) -> int:
    from serving.http.templates import parse_library, to_library

    spec = load_spec(args.config)
    router = spec.tier_router()
    try:
        text = Path(args.file).read_text()
    except OSError as e:
        print(f"error: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    library = to_library(parse_library(text, args.file, router.tiers, router.tasks))
    refs = sorted(f"{n}@{v}" for n, versions in library.templates.items() for v in versions)
    print(f"{args.file}: ok ({len(refs)} templates: {', '.join(refs)}; {len(library.bindings)} bindings)")
    return 0


def cmd_key_new(args: argparse.Namespace) -> int:
    from serving.config import ApiKey
    from serving.http.auth import hash_key, new_key

    scopes = sorted(set(args.scope or ["inference"]))
    models = list(dict.fromkeys(args.model)) if args.model else None
    ApiKey(tenant=args.tenant, sha256="0" * 64, scopes=scopes, models=models)  # validates the names
    key = new_key()
    print(f"key (give it to the tenant; it is not stored anywhere): {key}")
    print("add to auth.keys in the spec, or to the keys file of the Secret:")
    extra = f", scopes: [{', '.join(scopes)}]" if scopes != ["inference"] else ""
    extra += f", models: [{', '.join(models)}]" if models else ""
    print(f"  - {{tenant: {args.tenant}, sha256: {hash_key(key)}{extra}}}")
    return 0


def cmd_key_hash(args: argparse.Namespace) -> int:
    from serving.http.auth import hash_key

    key = args.key
    if key is not None:
        print(
            "warning: a key on the command line lands in the shell history and `ps`; "
            "pipe it in instead: tandem key hash < key-file",
            file=sys.stderr,
        )
    elif sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key (not echoed): ")
    else:
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        print("error: no key given (pipe it on stdin: tandem key hash < key-file)", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from serving.replicas.placement import format_plan, plan

    print(format_plan(plan(load_spec(args.config))))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description="Disaggregated LLM serving on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="local tiny models").add_subparsers(dest="action", required=True)
    build = model.add_parser("build", help="build the tiny local models (skips ones already built)")
    build.add_argument("--dir", help="model directory (default $TANDEM_MODEL_DIR or ~/.cache/tandem/models)")
    build.add_argument("--name", action="append", help="build only this model (repeatable)")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(func=cmd_model_build)

    up = sub.add_parser("up", help="start Ray locally, deploy, serve until Ctrl-C")
    up.add_argument("--config", default=str(default_config_path()), help="deployment spec (YAML)")
    up.add_argument("--host", help="override server.host")
    up.add_argument("--port", type=int, help="override server.port")
    up.add_argument("--dashboard-port", type=int, help="override server.dashboard_port")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="pools, replicas and their health")
    status.add_argument("--config", default=str(default_config_path()), help="spec (for the dashboard port)")
    status.add_argument("--dashboard", help="Ray dashboard URL (default from the spec)")
    status.set_defaults(func=cmd_status)

    plan = sub.add_parser("plan", help="per pool: placement-group bundles, GPUs per replica and in total")
    plan.add_argument("--config", default=str(default_config_path()), help="deployment spec (YAML)")
    plan.set_defaults(func=cmd_plan)

    config = sub.add_parser("config", help="deployment specs").add_subparsers(dest="action", required=True)
    check = config.add_parser("check", help="validate a spec")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)

    templates = sub.add_parser("templates", help="prompt template libraries").add_subparsers(
        dest="action", required=True
    )
    tcheck = templates.add_parser("check", help="validate a library file against a spec's tiers and tasks")
    tcheck.add_argument("file")
    tcheck.add_argument("--config", default=str(default_config_path()), help="deployment spec (YAML)")
    tcheck.set_defaults(func=cmd_templates_check)

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="action", required=True)
    new = key.add_parser("new", help="make an API key for a tenant; prints the key and its hash entry")
    new.add_argument("--tenant", required=True)
    new.add_argument(
        "--scope",
        action="append",
        choices=list(get_args(KeyScope)),
        help="what the key may call (repeatable; default inference): metrics for a Prometheus scraper, "
        "debug (with inference) for an operator: x-tandem-route's replicas and the x-tandem-disagg header",
    )
    new.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="a model or tier the key may call (repeatable; default: every one)",
    )
    new.set_defaults(func=cmd_key_new)
    hsh = key.add_parser("hash", help="the SHA-256 of a key read from stdin, as the spec stores it")
    hsh.add_argument("key", nargs="?", help="deprecated: the key (it lands in shell history); use stdin")
    hsh.set_defaults(func=cmd_key_hash)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # pydantic's ValidationError names the field
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
