"""melo-dist serve: real HTTP requests on the loopback address against a Ray Serve deployment."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import original_ids

from melo_dist import ColdStartModel
from melo_dist.errors import InputError
from melo_dist.inference.serve import MAX_CANDIDATES, InFlight, build_app, start_serve
from melo_dist.training.checkpoint import load_checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained, ray_session):
    from ray import serve

    port = free_port()
    start_serve("127.0.0.1", port)
    serve.run(
        build_app(str(trained), max_batch_size=8, batch_wait_ms=20, cpus_per_replica=0.5),
        name="melo-dist",
        route_prefix="/",
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


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
    now[0] = 1.6
    assert in_flight.arrive() == 1  # the burst is over: a lone request closes its batch at once
    assert in_flight.arrive() == 2
