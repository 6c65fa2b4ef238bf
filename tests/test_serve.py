"""melo-dist serve: real HTTP requests on the loopback address against a Ray Serve deployment."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import original_ids
from ray import serve
from starlette.requests import Request

from melo_dist import ColdStartModel
from melo_dist.errors import InputError
from melo_dist.inference import serve as serving_module
from melo_dist.inference.batching import InFlight
from melo_dist.inference.serve import (
    HAPROXY_FILE_VARIABLES,
    HAPROXY_PORT_VARIABLES,
    HAPROXY_SETTINGS,
    MAX_CANDIDATES,
    SERVE_SETTINGS,
    ColdStartService,
    build_app,
    free_port,
    serving,
)
from melo_dist.training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def server(trained, ray_session):
    port = free_port()
    with serving("127.0.0.1", port):
        serve.run(
            build_app(str(trained), max_batch_size=8, batch_wait_ms=20, cpus_per_replica=0.5),
            name="melo-dist",
            route_prefix="/",
        )
        yield f"http://127.0.0.1:{port}"


def call(url: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_served_predictions_are_the_api_s_and_concurrent_requests_batch(
    server, trained, synthetic_dir
):
    model = ColdStartModel.load(trained)
    names = original_ids(synthetic_dir)[1:]
    status, health = call(f"{server}/health")
    assert (
        status == 200
        and health["model"]["regime"] == "melo"
        and health["model"]["iteration"] == load_checkpoint(trained)["iteration"]
    )
    requests = [
        {
            "history": {"items": names[k : k + 6], "ratings": [5, 1, 4, 2, 3, 5]},
            "candidates": names[50:53],
            "user_id": f"u{k}",
        }
        for k in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:  # concurrent: they are adapted in shared batches
        replies = list(
            pool.map(lambda r: call(f"{server}/predict", json.dumps(r).encode()), requests)
        )
    assert max(reply["batch_size"] for _, reply in replies) > 1
    for request, (status, reply) in zip(requests, replies):
        assert status == 200 and reply["model"] == health["model"] and reply["compute_ms"] > 0
        expected = model.adapt(
            request["history"]["items"], request["history"]["ratings"], request["user_id"]
        )
        np.testing.assert_allclose(
            reply["predictions"], expected.predict(request["candidates"]), rtol=1e-5
        )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (
            b'{"history": {"items": ["?"], "ratings": [4]}, "candidates": ["?"]}',
            400,
            "item '?' at position 0",
        ),
        (b'{"history": {"items": [], "ratings": []}, "candidates": ["x"]}', 400, "empty"),
        (
            b'{"history": {"items": ["a"], "ratings": ["five"]}, "candidates": ["x"]}',
            400,
            "must be numbers",
        ),
        (b'{"candidates": ["x"]}', 400, "expected"),
        (
            json.dumps(
                {
                    "history": {"items": ["a"], "ratings": [4]},
                    "candidates": ["x"] * (MAX_CANDIDATES + 1),
                }
            ).encode(),
            413,
            "at most",
        ),
        (b"x" * 1_000_001, 413, "over"),
    ],
)
def test_bad_requests_get_a_4xx_with_the_reason(server, body, status, message):
    got, reply = call(f"{server}/predict", body)
    assert got == status and message in reply["error"] and "model" in reply


def haproxy_sessions() -> int:
    """Connections HAProxy has passed to the replicas of `server` (not to its fallback proxy)."""
    stats = f"http://127.0.0.1:{os.environ['RAY_SERVE_HAPROXY_STATS_PORT']}/stats;csv"
    with urllib.request.urlopen(stats, timeout=30) as response:
        rows = csv.DictReader(io.StringIO(response.read().decode().lstrip("# ")))
        return sum(
            int(row["stot"])
            for row in rows
            if row["pxname"] == "http-melo-dist"
            and row["svname"] not in ("FRONTEND", "BACKEND")
            and row["bck"] == "0"
        )


def test_requests_reach_the_replica_through_haproxy_where_it_is_there(server):
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        pytest.skip("no HAProxy binary, or opted out: Serve's own HTTP proxy serves")
    before = haproxy_sessions()
    assert call(f"{server}/health")[0] == 200
    assert haproxy_sessions() > before


def fake_serve(monkeypatch, applications: dict) -> list[str]:
    """Serve's calls `serving` makes, recorded, with `applications` already deployed."""
    calls = []
    monkeypatch.setattr("melo_dist.distributed.train.connect", lambda: calls.append("connect"))
    monkeypatch.setattr(serve, "start", lambda **options: calls.append("start"))
    monkeypatch.setattr(serve, "status", lambda: types.SimpleNamespace(applications=applications))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(f"delete {name}"))
    return calls


def test_serving_shuts_serve_down_on_sigterm(monkeypatch):
    calls = fake_serve(monkeypatch, {})
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, serving("127.0.0.1", free_port()):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert stopped.value.code == 128 + signal.SIGTERM
    assert calls == ["connect", "start", "shutdown"]
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back


def test_serving_on_a_shared_serve_deletes_only_its_own_applications(monkeypatch):
    applications = {"theirs": None}
    calls = fake_serve(monkeypatch, applications)
    with serving("127.0.0.1", free_port()):
        applications["melo-dist"] = None  # what the block deploys
    assert calls == ["connect", "start", "delete melo-dist"]


@pytest.mark.parametrize(
    ("binary", "user_settings", "behind"),
    [
        (True, {}, True),
        (False, {}, False),
        (True, {"RAY_SERVE_ENABLE_HA_PROXY": "0"}, False),
        (True, {"RAY_SERVE_ENABLE_HA_PROXY": "false"}, False),  # Serve reads only "1" as on
        (True, {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}, False),
    ],
)
def test_serve_settings_keep_the_user_s_and_give_haproxy_its_own_ports_and_folder(
    monkeypatch, tmp_path, binary, user_settings, behind
):
    settings = {*SERVE_SETTINGS, *HAPROXY_SETTINGS, *HAPROXY_PORT_VARIABLES}
    settings |= set(HAPROXY_FILE_VARIABLES)
    environ = {name: value for name, value in os.environ.items() if name not in settings}
    environ |= {"RAY_SERVE_LOG_TO_STDERR": "1", **user_settings}  # the user's
    monkeypatch.setattr(os, "environ", environ)
    monkeypatch.setattr(serving_module, "haproxy_available", lambda: binary)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    serving_module.serve_environment()
    assert os.environ["RAY_SERVE_LOG_TO_STDERR"] == "1"  # stays
    assert os.environ["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    assert serving_module.behind_haproxy() == behind
    for name, value in user_settings.items():
        assert os.environ[name] == value
    ports = [os.environ.get(name) for name in HAPROXY_PORT_VARIABLES]
    files = [os.environ.get(name) for name in HAPROXY_FILE_VARIABLES]
    if behind:  # none of Serve's fixed ports
        assert len(set(ports)) == len(ports)
        (folder,) = tmp_path.iterdir()  # this user's, not the machine's /tmp/haproxy-serve
        assert folder.stat().st_mode & 0o777 == 0o700
        assert all(Path(path).is_relative_to(folder) for path in files)
    else:
        assert ports == [None] * len(ports) and files == [None] * len(files)
        assert os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == user_settings.get(
            "RAY_SERVE_ENABLE_DIRECT_INGRESS"
        )


def test_bad_settings_are_refused(trained):
    with pytest.raises(InputError, match="max_batch_size must be at least 1"):
        build_app(str(trained), max_batch_size=0)


def test_a_batch_expects_the_recent_peak_of_requests_in_flight():
    now = [0.0]
    in_flight = InFlight(1.0, clock=lambda: now[0])
    assert [in_flight.arrive() for _ in range(3)] == [1, 2, 3]  # a burst: batches grow with it
    for _ in range(3):
        in_flight.leave()
    now[0] = 0.5
    assert in_flight.arrive() == 3  # its clients come back within the second: wait for all
    in_flight.leave()
    now[0] = 0.9
    assert [in_flight.arrive() for _ in range(2)] == [3, 3]
    for _ in range(2):
        in_flight.leave()
    now[0] = 1.5
    assert in_flight.arrive() == 2  # the peak of 3 has passed, the later one of 2 has not
    in_flight.leave()
    now[0] = 2.0
    assert in_flight.arrive() == 1  # the load is over: a lone request closes its batch at once


class StubBatch:
    """In place of the `@serve.batch` method: records the batch sizes set, then answers (or
    fails) once released."""

    def __init__(self, fail: bool = False) -> None:
        self.sizes, self.fail, self.release = [], fail, asyncio.Event()

    def set_max_batch_size(self, size: int) -> None:
        self.sizes.append(size)

    async def __call__(self, parsed: tuple) -> dict:
        await self.release.wait()
        if self.fail:
            raise RuntimeError("the stub fails")
        return {"predictions": [], "batch_size": 1, "compute_ms": 0.0}


def post(body: bytes) -> Request:
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
    return Request({**scope, "query_string": b""}, receive)


def test_each_request_sets_its_batch_at_the_peak_and_leaves_the_count(trained, synthetic_dir):
    service = object.__new__(ColdStartService.func_or_class)  # the handler, without a replica
    service.model, service.version, service.max_batch = ColdStartModel.load(trained), {}, 2
    service.in_flight = InFlight(60.0)
    names = original_ids(synthetic_dir)[1:]
    request = {"history": {"items": names[:3], "ratings": [5, 1, 4]}, "candidates": names[5:6]}
    body = json.dumps(request).encode()

    async def scenario(stub: StubBatch, cancel: bool = False) -> list[int]:
        service.predict_batch = stub
        calls = [asyncio.create_task(service(post(body))) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert service.in_flight.count == 3
        if cancel:
            for call in calls:
                call.cancel()
        stub.release.set()
        replies = await asyncio.gather(*calls, return_exceptions=True)
        assert service.in_flight.count == 0  # every path leaves the count
        return [getattr(reply, "status_code", None) for reply in replies]

    ok = StubBatch()
    assert asyncio.run(scenario(ok)) == [200] * 3
    assert ok.sizes == [1, 2, 2]  # the peak so far, capped at the max batch size
    assert asyncio.run(scenario(StubBatch(fail=True))) == [500] * 3
    assert asyncio.run(scenario(StubBatch(), cancel=True)) == [None] * 3
