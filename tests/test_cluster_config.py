"""cluster.yaml is a valid Ray cluster-launcher config (the JSON schema shipped inside `ray`)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema():
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(load_cluster(), json.loads(schema_path.read_text()))


def test_schema_check_catches_a_bad_config():
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    broken = {**load_cluster(), "max_worker": 8}  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(schema_path.read_text()))


def test_cluster_yaml_shape():
    cluster = load_cluster()
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    # what `ray up` checks beyond the schema: worker bounds are consistent
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cluster["max_workers"]
    assert all(
        t.get("min_workers", 0) <= t.get("max_workers", 0)
        for name, t in types.items()
        if name != cluster["head_node_type"]
    )
    setup = " ".join(cluster["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install -q -e ." in setup
    # no dashboard open to the world: bound to localhost, reached over SSH
    starts = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "0.0.0.0" not in starts
    # SSH is the only ingress, from a configured range, never the world
    (rule,) = cluster["provider"]["security_group"]["IpPermissions"]
    assert (rule["FromPort"], rule["ToPort"]) == (22, 22)
    ranges = [r["CidrIp"] for r in rule["IpRanges"]]
    assert ranges and "0.0.0.0/0" not in ranges
