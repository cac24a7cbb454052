"""Cross-request continuous batching in the server, over real HTTP on 127.0.0.1 (uvicorn in a thread, the demo
model in float32 on the CPU): concurrent requests with different prompts, seeds, samplers, step counts and scales
share UNet calls and give the images they give alone and the CLI's; a client that goes away has its rows dropped;
an out-of-memory UNet call is halved and loses nothing; batching off runs one request at a time; SIGTERM drains."""
from __future__ import annotations

import base64
import http.client
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from tests.script_utils import REPO, load_script

HAVE_SERVE = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn", "httpx"))
pytestmark = pytest.mark.skipif(not HAVE_SERVE, reason='needs the serve extra: pip install -e ".[test,serve]"')

# Four requests that can share UNet calls (same size, no LoRA) and differ in everything else.
BODIES = [
    {"prompt": "a red circle on a blue background", "sampler_name": "Euler a", "steps": 4, "cfg_scale": 2, "seed": 11, "batch_size": 1},
    {"prompt": "a green square", "negative_prompt": "blurry", "sampler_name": "DPM++ 2M", "scheduler": "Karras", "steps": 6,
     "cfg_scale": 5, "seed": 22, "batch_size": 2},
    {"prompt": "a yellow triangle", "sampler_name": "DDIM", "steps": 5, "cfg_scale": 7.5, "seed": 33, "batch_size": 1},
    {"prompt": "two blue circles", "sampler_name": "Heun", "steps": 3, "cfg_scale": 3.5, "seed": 44, "batch_size": 1},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """create_app(...) served by uvicorn on 127.0.0.1 in a thread of this process (so tests can look inside)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()

    @property
    def scheduler(self):
        return self.app.state.service.scheduler

    def call(self, method: str, path: str, body=None, timeout: float = 120.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")

    def txt2img(self, body: dict) -> dict:
        status, out = self.call("POST", "/sdapi/v1/txt2img", {"width": 64, "height": 64, **body})
        assert status == 200
        return out


@pytest.fixture(scope="module")
def pipe():
    from microbatch import Pipeline

    return Pipeline.from_checkpoint(None, device="cpu", precision="full")  # no checkpoint: the embedded demo model


@pytest.fixture(scope="module")
def server(pipe):
    from microbatch.server import ServerLimits, create_app

    live = LiveServer(create_app(pipe, ServerLimits(max_queue=8), max_batch_size=8))
    yield live
    live.close()


@pytest.fixture(scope="module")
def alone(server):
    """Each request served alone, one after another: [PNG bytes per image] per body."""
    return [[pixels(s) for s in server.txt2img(body)["images"]] for body in BODIES]


def pixels(b64: str) -> bytes:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return image.tobytes()


class HoldFirstCall:
    """Wraps the batcher's model call: the first UNet call waits until `participants` sampler loops are registered,
    so the requests started meanwhile certainly share the following calls. `oom_above`: calls of more rows raise
    an out-of-memory error (as torch does on a GPU)."""

    def __init__(self, batcher, participants: int, oom_above=None, release=None):
        self.batcher = batcher
        self.release = release  # an Event the first call also waits for
        self.original = batcher.apply_model
        self.participants = participants
        self.oom_above = oom_above
        self.first = True
        self.rows: list[int] = []
        batcher.apply_model = self

    def __call__(self, x, t, cond):
        if self.first:
            self.first = False
            end = time.monotonic() + 60
            while self.batcher.active < self.participants and time.monotonic() < end:
                time.sleep(0.01)
            if self.release is not None:
                self.release.wait(60)
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]} rows")
        self.rows.append(int(x.shape[0]))
        return self.original(x, t, cond)

    def restore(self) -> None:
        self.batcher.apply_model = self.original


def concurrently(server, bodies) -> list[dict]:
    out: list = [None] * len(bodies)

    def post(i):
        out[i] = server.txt2img(bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for th in threads:
        th.start()
        time.sleep(0.05)
    for th in threads:
        th.join(120)
        assert not th.is_alive()
    return out


def test_concurrent_requests_share_unet_calls_and_give_their_images_alone(server, alone, tmp_path):
    before = server.call("GET", "/microbatch/v1/batching")[1]
    hold = HoldFirstCall(server.scheduler.batcher, len(BODIES))
    try:
        answers = concurrently(server, BODIES)
    finally:
        hold.restore()
    for body, answer, reference in zip(BODIES, answers, alone):
        assert [pixels(s) for s in answer["images"]] == reference, body["sampler_name"]
        assert json.loads(answer["info"])["all_seeds"] == [body["seed"] + i for i in range(body["batch_size"])]
    stats = server.call("GET", "/microbatch/v1/batching")[1]
    assert stats["shared_calls"] - before["shared_calls"] >= 3
    assert max(hold.rows) == 2 * sum(b["batch_size"] for b in BODIES)  # every request's cond and uncond rows in one call
    assert stats["running"] == 0 and stats["queued"] == 0 and stats["participants"] == 0
    # The CLI with the same settings gives the same pixels.
    assert load_script("txt2img").main([
        "--prompt", BODIES[1]["prompt"], "--negative_prompt", "blurry", "--sampler", "dpmpp_2m", "--schedule", "karras",
        "--ddim_steps", "6", "--scale", "5", "--seed", "22", "--n_samples", "2", "--n_iter", "1", "--W", "64", "--H", "64",
        "--precision", "full", "--device", "cpu", "--quiet", "--outdir", str(tmp_path),
    ]) == 0
    files = sorted((tmp_path / "samples").glob("*.png"))
    assert [Image.open(f).tobytes() for f in files] == alone[1]


def test_out_of_memory_halves_the_call_and_loses_no_request(server, alone):
    before = server.call("GET", "/microbatch/v1/batching")[1]
    hold = HoldFirstCall(server.scheduler.batcher, 3, oom_above=3)
    try:
        answers = concurrently(server, BODIES[:3])
    finally:
        hold.restore()
    for answer, reference in zip(answers, alone[:3]):
        assert [pixels(s) for s in answer["images"]] == reference
    stats = server.call("GET", "/microbatch/v1/batching")[1]
    assert stats["oom_halvings"] > before["oom_halvings"] and max(hold.rows) <= 3
    server.scheduler.batcher._oom_rows.clear()  # forget the fake limit for the other tests


def test_a_client_that_disconnects_has_its_rows_dropped(server, alone):
    batcher = server.scheduler.batcher
    worker = server.app.state.worker
    rows_before = batcher.stats.rows
    release = threading.Event()
    hold = HoldFirstCall(batcher, 2, release=release)
    try:
        # A long request from a client that will go away, then a short one that stays.
        gone = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        gone.request("POST", "/sdapi/v1/txt2img", json.dumps({"prompt": "x", "steps": 40, "width": 64, "height": 64, "seed": 5}),
                     {"Content-Type": "application/json"})
        end = time.monotonic() + 30
        while batcher.active < 1:
            assert time.monotonic() < end
            time.sleep(0.01)
        out: dict = {}
        stays = threading.Thread(target=lambda: out.update(a=server.txt2img(BODIES[0])))
        stays.start()
        while batcher.active < 2:
            assert time.monotonic() < end
            time.sleep(0.01)
        controls = worker.running()
        gone.sock.shutdown(socket.SHUT_RDWR)
        gone.close()
        while not any(c.disconnected for c in controls):
            assert time.monotonic() < end, "the disconnect was not noticed"
            time.sleep(0.01)
        release.set()
        stays.join(60)
    finally:
        release.set()
        hold.restore()
    assert [pixels(s) for s in out["a"]["images"]] == alone[0]
    while worker.running() or batcher.active:
        assert time.monotonic() < end, "the dropped request did not stop"
        time.sleep(0.01)
    # 40 guided steps would be 80 rows; the request left within a step or two of its client.
    assert batcher.stats.rows - rows_before < 2 * 4 + 2 * 6


def test_batching_off_serves_one_request_at_a_time(pipe, alone):
    from microbatch.server import create_app

    live = LiveServer(create_app(pipe, max_batch_size=8, batching=False))
    try:
        answers = concurrently(live, BODIES[:2])
        stats = live.call("GET", "/microbatch/v1/batching")[1]
    finally:
        live.close()
    for answer, reference in zip(answers, alone[:2]):
        assert [pixels(s) for s in answer["images"]] == reference
    assert stats["batching"] is False and stats["shared_calls"] == 0 and stats["unet_calls"] > 0


def test_sigterm_drains_running_requests(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}/sdapi/v1"
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "serve.py"), "--device", "cpu", "--precision", "full", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
    )

    def call(method, path, body=None, timeout=120):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")

    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                call("GET", "/options", timeout=5)
                break
            except OSError:
                assert time.monotonic() < end, "server did not start"
                time.sleep(0.2)
        out: dict = {}
        running = threading.Thread(target=lambda: out.update(r=call("POST", "/txt2img", {"prompt": "a cat", "steps": 60, "batch_size": 2, "seed": 3})))
        running.start()
        while call("GET", "/progress")[1]["state"]["sampling_step"] < 1:
            assert time.monotonic() < end
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        running.join(120)
        status, answer = out["r"]
        assert status == 200 and len(answer["images"]) == 2 and json.loads(answer["info"])["interrupted"] is False
        rc = proc.wait(60)
        with pytest.raises(urllib.error.URLError):  # gone: new requests are refused
            call("GET", "/options", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in text, text
