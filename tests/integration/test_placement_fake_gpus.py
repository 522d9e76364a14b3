"""Placement on a real (local, two-node) Ray cluster with fake H100s: the replicas of each pool are
scheduled with the bundles and strategies `serving.replicas.placement` plans.

The cluster runs in a child process (tests/integration/fake_gpu_cluster.py) with its own temp dir,
separate from the test session's Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def placed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fakegpu") / "placement.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.fake_gpu_cluster", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _pgs(placed: dict, name: str) -> list[dict]:
    return list(placed["scenarios"][name]["placement_groups"].values())


def _same_bundles(pg: dict, plan: list[dict]) -> bool:
    return [{k: float(v) for k, v in b.items()} for b in pg["bundles"]] == [
        {k: float(v) for k, v in b.items()} for b in plan
    ]


def test_two_nodes_with_fake_gpus(placed: dict) -> None:
    assert len(placed["nodes"]) == 2


def test_8b_tp1_replicas_take_one_gpu_without_a_placement_group(placed: dict) -> None:
    s = placed["scenarios"]["8b-int4-tp1"]
    assert len(s["replicas"]) == 2
    assert all(r["placement_group_id"] is None for r in s["replicas"])


def test_70b_prefill_tp4_x2_each_replica_strict_packed_on_one_node(placed: dict) -> None:
    s = placed["scenarios"]["70b-prefill-tp4-x2"]
    pgs = _pgs(placed, "70b-prefill-tp4-x2")
    assert len(s["replicas"]) == 2 and len(pgs) == 2
    for pg in pgs:
        assert pg["state"] == "CREATED" and pg["strategy"] == "STRICT_PACK"
        assert len(set(pg["bundle_nodes"])) == 1  # TP never leaves a node
        assert _same_bundles(pg, s["plan"]["bundles"])


def test_70b_decode_tp8_fills_one_node(placed: dict) -> None:
    (pg,) = _pgs(placed, "70b-decode-tp8")
    assert pg["strategy"] == "STRICT_PACK" and len(pg["bundles"]) == 8
    assert len(set(pg["bundle_nodes"])) == 1


def test_moe_dp8_ranks_are_a_gang_spread_across_nodes(placed: dict) -> None:
    s = placed["scenarios"]["moe-dp8-ep"]
    reps = s["replicas"]
    assert len(reps) == 8
    assert sorted(r["gang_rank"] for r in reps) == list(range(8))
    assert {r["gang_size"] for r in reps} == {8} and len({r["gang_id"] for r in reps}) == 1
    # Every rank learned the same DP group address from rank 0 (vLLM data_parallel_address/rpc port).
    assert len({tuple(r["dp_address"]) for r in reps}) == 1
    (pg,) = _pgs(placed, "moe-dp8-ep")  # one gang placement group holds every rank's bundle
    assert pg["strategy"] == "SPREAD" and len(pg["bundles"]) == 8
    assert len(set(pg["bundle_nodes"])) == 2
    assert len({r["node_id"] for r in reps}) == 2


def test_pp2_stages_span_nodes(placed: dict) -> None:
    s = placed["scenarios"]["pp2-tp8"]
    (pg,) = _pgs(placed, "pp2-tp8")
    assert pg["strategy"] == "PACK" and len(pg["bundles"]) == 16
    assert _same_bundles(pg, s["plan"]["bundles"])
    nodes = pg["bundle_nodes"]
    assert len(set(nodes)) == 2 and nodes.count(nodes[0]) == 8  # 8 GPUs per node, one stage each
