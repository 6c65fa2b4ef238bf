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
    # token authentication on every node, with one token shared by the nodes and the job CLI
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = next(c for c in commands if " start " in c)
        assert start.startswith("RAY_AUTH_MODE=token ")
    assert cluster["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "disabled" not in (ROOT / "cluster.yaml").read_text()
    # the head takes part: Ray Data's reads and small jobs need CPUs there
    assert types[cluster["head_node_type"]]["resources"]["CPU"] > 0


def test_rayjob_manifest_runs_the_train_job_entry_point_with_auth_and_storage_at_uris():
    """rayjob.yaml (KubeRay) submits what `ray job submit` does, with token auth on, the
    project's dependencies, and the data, run folder and checkpoints at s3:// URIs."""
    job = yaml.safe_load((ROOT / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/train.py"] and (ROOT / entry[1]).exists()
    config = entry[entry.index("--config") + 1]
    assert (ROOT / config).exists()
    settings = dict(entry[i + 1].split("=", 1) for i, a in enumerate(entry) if a == "--set")
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime["excludes"] == [".venv", ".git", "runs", "data"]  # as `ray job submit`
    packages = runtime["pip"]["packages"]
    assert "torch==2.13.0" in packages  # pinned, from the CPU index
    assert any(p.startswith("--extra-index-url") and p.endswith("/whl/cpu") for p in packages)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package in packages[2:]:
        assert f'"{package}' in pyproject, package  # the project's own dependencies
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"  # token auth stays on
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        assert container["image"].startswith(f"rayproject/ray:{ray.__version__}")
        assert "volumeMounts" not in container and "volumes" not in pod["template"]["spec"]
        assert pod["template"]["spec"]["serviceAccountName"]  # the pod's own S3 credentials
    # every node reads and writes the same bucket: no shared volume; Ray's checkpoints go to
    # run.out/ray-checkpoints at the URI
    assert "--storage" not in entry
    for key in ("data.path", "run.out"):
        assert settings[key].startswith("s3://"), key
    assert runtime["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "60"
