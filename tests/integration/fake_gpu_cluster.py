"""Deploys placement scenarios on a local two-node Ray cluster with fake H100s; prints JSON.

Run as `python -m tests.integration.fake_gpu_cluster OUT.json` (its own process and its own Ray:
the test session's Ray cannot be re-initialised). Engines are the fake engine: what is checked is
where Ray Serve puts the replicas, not what they compute.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Serve's Python proxy here, whatever the test session's cluster uses: each scenario deploys an
# engine deployment, with Tandem's request router, as its app's ingress, which Serve refuses with
# the HAProxy data plane (in Tandem the ingress is always OpenAIIngress). Placement is the same.
from serving.config import DataPlane, ServerSpec  # noqa: E402

os.environ.update(ServerSpec(data_plane=DataPlane.PROXY).ray_env())

GPUS_PER_NODE = 8
SCENARIOS: dict[str, dict] = {
    "8b-int4-tp1": {"role": "colocated", "parallelism": {"tp": 1}, "replicas": {"min": 2, "max": 2},
                    "accelerator": "L4"},
    "70b-prefill-tp4-x2": {"role": "colocated", "parallelism": {"tp": 4}, "replicas": {"min": 2, "max": 2}},
    "70b-decode-tp8": {"role": "colocated", "parallelism": {"tp": 8}},
    "moe-dp8-ep": {"role": "colocated", "parallelism": {"dp": 8, "ep": True}},
    "pp2-tp8": {"role": "colocated", "parallelism": {"tp": 8, "pp": 2}},  # 16 GPUs: two nodes
}  # fmt: skip


def main(out: str) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util import placement_group_table

    from serving.app import deployment_name, deployment_options, engine_args_for
    from serving.config import ModelSpec
    from serving.replicas.deployments import EngineServer
    from serving.replicas.placement import place_pool

    tmp = tempfile.mkdtemp(prefix="tandem-fakegpu-")
    # Ray's test cluster writes its address file under the system temp dir: keep it in ours.
    os.environ["RAY_TMPDIR"] = tmp
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
    node = {"num_cpus": 8, "num_gpus": GPUS_PER_NODE}
    gpu = {"accelerator_type:H100": GPUS_PER_NODE, "accelerator_type:L4": GPUS_PER_NODE}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node,
            "resources": gpu,
            "temp_dir": os.path.join(tmp, "ray"),
            "include_dashboard": False,
        },
    )
    cluster.add_node(**node, resources=gpu)
    ray.init(address=cluster.address)
    results: dict = {"nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]], "scenarios": {}}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        for name, pool in SCENARIOS.items():
            pool = {"engine": "fake", "accelerator": "H100", "cpus_per_replica": 0.1, **pool}
            model = ModelSpec(name=name, source="fake", pools=[pool])
            p = model.pools[0]
            dep = serve.deployment(EngineServer).options(
                name=deployment_name(model, p), **deployment_options(p, model)
            )
            app = dep.bind(name, "fake", p.engine, engine_args_for(p, model), p.pool_name, p.role)
            t0 = time.monotonic()
            handle = serve.run(app, name=name, route_prefix=None)
            placed = place_pool(model, p)
            # Ask every replica where it runs (the router spreads calls; collect until all answered).
            seen: dict[str, dict] = {}
            deadline = time.monotonic() + 60
            while len(seen) < placed.max_replicas and time.monotonic() < deadline:
                info = handle.placement.remote().result()
                seen[info["replica"]] = info
            table = placement_group_table()
            pgs = {}
            for info in seen.values():
                pg = info["placement_group_id"]
                if pg and pg in table:
                    t = table[pg]
                    pgs[pg] = {
                        "strategy": t["strategy"],
                        "state": t["state"],
                        "bundles": list(t["bundles"].values()),
                        "bundle_nodes": list(t["bundles_to_node_id"].values()),
                    }
            results["scenarios"][name] = {
                "deploy_s": round(time.monotonic() - t0, 2),
                "plan": {"bundles": placed.bundles, "strategy": placed.strategy,
                         "gpus_per_replica": placed.gpus_per_replica, "replicas": placed.max_replicas},
                "replicas": list(seen.values()),
                "placement_groups": pgs,
            }  # fmt: skip
            serve.delete(name)
    finally:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
