"""The web UI API server: every endpoint in-process (FastAPI's TestClient), images equal to the scripts', errors as
one-line 422s, the FIFO queue, progress / skip / interrupt, and scripts/serve.py as a real process on loopback."""
from __future__ import annotations

import base64
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
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from microbatch.request import UsageError
from microbatch.server.webui import WEBUI_SAMPLERS, api_message, resolve_sampler, resolve_scheduler
from samplers import SAMPLERS
from tests.script_utils import REPO, load_script

HAVE_SERVE = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn", "httpx"))
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason='needs the serve extra: pip install -e ".[test,serve]"')

TINY = str(REPO / "configs" / "tiny" / "tiny-v1.yaml")
RUN = ["--precision", "full", "--quiet", "--device", "cpu", "--config", TINY]


# -- names -----------------------------------------------------------------------------------------------------------


def test_webui_sampler_and_scheduler_names_map_to_ours():
    assert resolve_sampler("Euler a", None) == ("euler_a", None)
    assert resolve_sampler("DPM++ 2M", "Karras") == ("dpmpp_2m", "karras")
    assert resolve_sampler("DPM++ 2M Karras", None) == ("dpmpp_2m", "karras")  # the pre-1.9 combined name
    assert resolve_sampler("dpm++ 2m sde exponential", "Automatic") == ("dpmpp_2m_sde", "exponential")
    assert resolve_sampler("DPM++ 2M Karras", "exponential") == ("dpmpp_2m", "exponential")  # explicit scheduler wins
    assert resolve_sampler("k_lms", None) == ("lms", None)
    assert resolve_sampler("DDIM", "uniform") == ("ddim", "uniform")
    assert resolve_sampler("unipc", None) == ("unipc", None)
    assert resolve_sampler(None, None) == ("euler", None)  # the web UI's sampler_index default
    for name in ("DPM++ SDE", "DPM++ 3M SDE", "DPM++ 2S a", "PLMS", "Heun", "DPM2", "Euler"):
        assert resolve_sampler(name, None)[0] in SAMPLERS
    assert {s.ours for s in WEBUI_SAMPLERS} <= set(SAMPLERS)
    assert resolve_scheduler("Automatic") is None and resolve_scheduler("Karras") == "karras"
    with pytest.raises(UsageError, match="unknown sampler_name 'Restart'"):
        resolve_sampler("Restart", None)
    with pytest.raises(UsageError, match="unknown scheduler 'sgm_uniform'"):
        resolve_scheduler("sgm_uniform")


def test_messages_name_the_api_fields():
    assert api_message("--ddim_steps must be a positive integer, got 0") == "steps must be a positive integer, got 0"
    assert api_message("--strength must be in (0, 1], got 0") == "denoising_strength must be in (0, 1], got 0"
    assert api_message("--H must be positive, got -1\n") == "height must be positive, got -1"


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    assert load_script("serve").main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: the server needs FastAPI and uvicorn: pip install -e ".[serve]"']


@needs_serve
@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "--port must be in 1..65535, got 0"),
    (["--max_steps", "0"], "--max_steps must be a positive integer, got 0"),
    (["--max_batch_size", "two"], "--max_batch_size must be a positive integer or auto, got 'two'"),
    (["--ckpt", "no/such.ckpt"], "checkpoint not found: no/such.ckpt"),
])
def test_serve_flags_are_checked_in_one_line(argv, message, capsys):
    assert load_script("serve").main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"]


# -- the app in-process ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    from microbatch import Pipeline

    return Pipeline.from_checkpoint(tiny_ckpt, config=TINY, device="cpu", precision="full")


LIMITS = dict(max_pixels=64 * 64, max_steps=30, max_images=6, max_body_bytes=200_000, max_input_pixels=128 * 128, max_queue=2)


@pytest.fixture(scope="module")
def client(pipe):
    if not HAVE_SERVE:
        pytest.skip('needs the serve extra: pip install -e ".[test,serve]"')
    from fastapi.testclient import TestClient

    from microbatch.server import ServerLimits, create_app

    with TestClient(create_app(pipe, ServerLimits(**LIMITS))) as c:
        yield c


def b64_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(images: list[str]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(s))) for s in images]


def pngs(folder: Path) -> list[Image.Image]:
    return [Image.open(p) for p in sorted((folder / "samples").glob("*.png"))]


def same(api: list[Image.Image], files: list[Image.Image]) -> None:
    assert len(api) == len(files) > 0
    for a, f in zip(api, files):
        assert a.size == f.size and a.tobytes() == f.tobytes()
        assert a.info["parameters"] == f.info["parameters"]


def post_ok(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_txt2img_gives_the_scripts_pixels_parameters_and_info(client, tiny_ckpt, tmp_path):
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "sampler_name": "Euler a", "steps": 3, "seed": 5, "width": 48,
            "height": 32, "cfg_scale": 3, "batch_size": 2, "n_iter": 2, "restore_faces": False, "do_not_save_grid": True}
    out = post_ok(client, "/sdapi/v1/txt2img", body)
    argv = ["--ckpt", str(tiny_ckpt), "--prompt", "a red circle", "--negative_prompt", "blurry", "--sampler", "euler_a", "--ddim_steps", "3",
            "--seed", "5", "--W", "48", "--H", "32", "--scale", "3", "--n_samples", "2", "--n_iter", "2", "--outdir", str(tmp_path), *RUN]
    assert load_script("txt2img").main(argv) == 0
    images = decode(out["images"])
    same(images, pngs(tmp_path))
    info = json.loads(out["info"])
    assert info["all_seeds"] == [5, 6, 7, 8] and info["seed"] == 5
    assert info["infotexts"] == [im.info["parameters"] for im in images]
    assert info["sampler_name"] == "Euler a" and info["scheduler"] == "karras" and (info["width"], info["height"]) == (48, 32)
    assert out["parameters"]["prompt"] == "a red circle" and out["parameters"]["seed"] == 5  # the request echoed
    # send_images false answers no images, the same info.
    quiet = post_ok(client, "/sdapi/v1/txt2img", {**body, "n_iter": 1, "send_images": False})
    assert quiet["images"] == [] and json.loads(quiet["info"])["all_seeds"] == [5, 6]


def test_random_seed_is_reported(client):
    out = post_ok(client, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "width": 32, "height": 32, "seed": -1, "batch_size": 2})
    info = json.loads(out["info"])
    assert 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    assert f"Seed: {info['seed']}" in decode(out["images"])[0].info["parameters"]


def test_img2img_and_inpainting_give_the_scripts_pixels(client, tiny_ckpt, tmp_path):
    rng = np.random.default_rng(0)
    init = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    mask = np.zeros((40, 56), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(init).save(tmp_path / "init.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--ckpt", str(tiny_ckpt), "--prompt", "a cat", "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "4", "--seed", "3", "--scale", "5", *RUN]
    body = {"prompt": "a cat", "batch_size": 2, "steps": 4, "seed": 3, "cfg_scale": 5, "sampler_name": "DDIM", "init_images": [b64_png(init)]}

    assert load_script("img2img").main(common + ["--init-img", str(tmp_path / "init.png"), "--strength", "0.5", "--outdir", str(tmp_path / "i")]) == 0
    out = post_ok(client, "/sdapi/v1/img2img", {**body, "denoising_strength": 0.5, "width": 56, "height": 40})
    same(decode(out["images"]), pngs(tmp_path / "i"))
    assert out["parameters"]["init_images"] is None  # not echoed back unless include_init_images

    assert load_script("inpaint").main(common + ["--init-img", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                                                 "--strength", "1.0", "--outdir", str(tmp_path / "p")]) == 0
    painted = post_ok(client, "/sdapi/v1/img2img", {**body, "denoising_strength": 1.0, "mask": b64_png(mask)})
    same(decode(painted["images"]), pngs(tmp_path / "p"))
    # inpainting_mask_invert repaints the other region: a black-for-repaint mask gives the same images.
    inverted = post_ok(client, "/sdapi/v1/img2img", {**body, "denoising_strength": 1.0, "mask": b64_png(255 - mask), "inpainting_mask_invert": 1})
    same(decode(inverted["images"]), pngs(tmp_path / "p"))


def test_img2img_resizes_the_init_image_to_width_and_height(client):
    init = np.full((24, 40, 3), 128, np.uint8)
    out = post_ok(client, "/sdapi/v1/img2img", {"init_images": [b64_png(init)], "steps": 2, "seed": 1, "width": 32, "height": 48})
    assert decode(out["images"])[0].size == (32, 48)
    r = client.post("/sdapi/v1/img2img", json={"init_images": [b64_png(init)], "steps": 2, "width": 32, "height": 48, "resize_mode": 1})
    assert r.status_code == 422 and "resize_mode 1 is not supported" in r.json()["detail"]


@pytest.mark.parametrize("path, body, status, detail", [
    ("txt2img", {"steps": 31}, 422, "steps 31 is more than this server's limit of 30 (--max_steps)"),
    ("txt2img", {"steps": 0}, 422, "steps must be a positive integer, got 0"),
    ("txt2img", {"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ("txt2img", {"batch_size": 4, "n_iter": 2}, 422, "batch_size 4 x n_iter 2 = 8 images is more than this server's limit of 6"),
    ("txt2img", {"width": 128, "height": 64}, 422, "128x64 = 8192 pixels is more than this server's limit of 4096 (--max_pixels)"),
    ("txt2img", {"sampler_name": "Restart"}, 422, "unknown sampler_name 'Restart'"),
    ("txt2img", {"scheduler": "beta"}, 422, "unknown scheduler 'beta'"),
    ("txt2img", {"enable_hr": True}, 422, "the hires pass's 128x128 = 16384 pixels is more than this server's limit of 4096 (--max_pixels)"),
    ("txt2img", {"enable_hr": True, "width": 32, "height": 32, "hr_scale": 0}, 422, "hr_scale must be a number > 0, got 0"),
    ("txt2img", {"enable_hr": True, "width": 32, "height": 32, "hr_second_pass_steps": 31}, 422, "hr_second_pass_steps 31 is more than"),
    ("txt2img", {"enable_hr": True, "width": 32, "height": 32, "hr_upscaler": "R-ESRGAN 4x+"}, 422, "unknown hires upscaler 'R-ESRGAN 4x+'"),
    ("txt2img", {"enable_hr": True, "hr_sampler_name": "DDIM"}, 422, "a hires pass with another sampler is not supported"),
    ("txt2img", {"enable_hr": True, "hr_prompt": "a dog"}, 422, "a hires pass with other prompts is not supported"),
    ("img2img", {"enable_hr": True, "denoising_strength": 0.5}, 422, "enable_hr (hires fix) applies to txt2img only"),
    ("txt2img", {"subseed_strength": 0.5}, 422, "variation seeds (subseed_strength 0.5) are not supported yet"),
    ("txt2img", {"seed": -2}, 422, "seed: Input should be greater than or equal to -1"),
    ("txt2img", {"cfg_scale": "nan"}, 422, "cfg_scale must be a finite number, got nan"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "other.safetensors"}}, 422, "model 'other.safetensors' is not loaded"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 2}}, 422, "CLIP_stop_at_last_layers 2 is not supported"),
    ("img2img", {"steps": 2}, 422, "img2img needs init_images"),
    ("img2img", {"init_images": ["/etc/hostname"]}, 422, "this server reads no URLs or file paths"),
    ("img2img", {"init_images": ["http://127.0.0.1/x.png"]}, 422, "this server reads no URLs or file paths"),
    ("img2img", {"init_images": ["bm90IGFuIGltYWdl"]}, 422, "init_images[0] is not a readable image"),
    ("img2img", {"init_images": ["a", "b"]}, 422, "one init image per request, got 2"),
    ("img2img", {"denoising_strength": 0}, 422, "denoising_strength must be in (0, 1], got 0"),
])
def test_bad_requests_are_one_line_422s(client, path, body, status, detail):
    if path == "img2img" and "init_images" not in body and "denoising_strength" in body:
        body = {**body, "init_images": [b64_png(np.zeros((16, 16, 3), np.uint8))]}
    r = client.post(f"/sdapi/v1/{path}", json={"steps": 2, **body})
    assert r.status_code == status, r.text
    text = r.json()["detail"]
    assert detail in text and "\n" not in text


def test_txt2img_hires_fix_gives_the_scripts_pixels(client, tiny_ckpt, tmp_path):
    body = {"prompt": "a red circle", "sampler_name": "DDIM", "steps": 3, "seed": 2, "width": 32, "height": 32, "batch_size": 2,
            "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 2, "denoising_strength": 0.6}
    out = post_ok(client, "/sdapi/v1/txt2img", body)
    argv = ["--ckpt", str(tiny_ckpt), "--prompt", "a red circle", "--sampler", "ddim", "--ddim_steps", "3", "--seed", "2", "--W", "32",
            "--H", "32", "--n_samples", "2", "--n_iter", "1", "--hr_scale", "2", "--hr_steps", "2", "--hr_denoising_strength", "0.6",
            "--outdir", str(tmp_path), *RUN]
    assert load_script("txt2img").main(argv) == 0
    images = decode(out["images"])
    same(images, pngs(tmp_path))
    assert images[0].size == (64, 64) and "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent" in images[0].info["parameters"]
    info = json.loads(out["info"])
    assert info["denoising_strength"] == 0.6 and (info["width"], info["height"]) == (32, 32)  # the first pass's, as the web UI
    # a resize target wins over hr_scale (whose default is 2), as in the web UI; the API's denoising_strength default is 0.75
    out = post_ok(client, "/sdapi/v1/txt2img", {**body, "batch_size": 1, "hr_resize_x": 48, "denoising_strength": 0.75})
    assert decode(out["images"])[0].size == (48, 48) and "Hires resize: 48x0" in decode(out["images"])[0].info["parameters"]
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["Lanczos", "Nearest"]
    assert {"Latent", "Latent (nearest)"} <= {m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()}


def test_big_images_and_bodies_are_refused_before_decoding(client):
    bomb = b64_png(np.zeros((200, 200, 3), np.uint8))  # small file, 40,000 pixels > max_input_pixels 16,384
    r = client.post("/sdapi/v1/img2img", json={"init_images": [bomb], "steps": 2})
    assert r.status_code == 422 and "is 200x200 = 40000 pixels; this server accepts at most 16384" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x" * 300_000})
    assert r.status_code == 413 and "200000 bytes" in r.json()["detail"]


def test_listing_endpoints(client, pipe):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "PLMS", "UniPC", "DPM++ 2M SDE", "LMS", "Heun", "DPM2"} <= set(names)
    assert all(resolve_sampler(n, None)[0] in SAMPLERS for n in names)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [s["name"] for s in schedulers][:1] == ["automatic"] and {"karras", "exponential", "uniform"} <= {s["name"] for s in schedulers}
    (model,) = client.get("/sdapi/v1/sd-models").json()
    assert model["title"] == f"tiny.ckpt [{pipe.loaded.model_hash}]" and model["filename"] == "tiny.ckpt" and model["hash"] == pipe.loaded.model_hash
    assert client.get("/sdapi/v1/sd-vae").json() == []
    assert client.get("/sdapi/v1/loras").json() == []
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_options_get_set_and_override(client, pipe):
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == f"tiny.ckpt [{pipe.loaded.model_hash}]" and options["eta_ancestral"] == 1.0
    body = {"prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 9, "sampler_name": "Euler a"}
    try:
        r = client.post("/sdapi/v1/options", json={"eta_ancestral": 0.5, "some_ui_option": True, "sd_model_checkpoint": "tiny.ckpt"})
        assert r.status_code == 200, r.text
        assert client.get("/sdapi/v1/options").json()["eta_ancestral"] == 0.5
        assert "Eta: 0.5," in json.loads(post_ok(client, "/sdapi/v1/txt2img", body)["info"])["infotexts"][0]
        # A request's override_settings and eta field win over the option, for that request only.
        assert "Eta: 0," in json.loads(post_ok(client, "/sdapi/v1/txt2img", {**body, "override_settings": {"eta_ancestral": 0}})["info"])["infotexts"][0]
        assert "Eta: 0.25," in json.loads(post_ok(client, "/sdapi/v1/txt2img", {**body, "eta": 0.25})["info"])["infotexts"][0]
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd-v1-5.safetensors", "eta_ancestral": 0.1})
        assert r.status_code == 422 and "is not loaded" in r.json()["detail"]
        assert client.get("/sdapi/v1/options").json()["eta_ancestral"] == 0.5  # a refused update changes nothing
        assert client.post("/sdapi/v1/options", json={"eta_ddim": -1}).status_code == 422
    finally:
        client.post("/sdapi/v1/options", json={"eta_ancestral": 1.0})


def test_png_info_reads_the_parameters(client):
    out = post_ok(client, "/sdapi/v1/txt2img", {"prompt": "a cat\non two lines", "negative_prompt": "dog", "steps": 2, "seed": 4, "width": 48, "height": 32})
    info = client.post("/sdapi/v1/png-info", json={"image": out["images"][0]}).json()
    assert info["info"] == json.loads(out["info"])["infotexts"][0]
    p = info["parameters"]
    assert p["Prompt"] == "a cat\non two lines" and p["Negative prompt"] == "dog" and p["Seed"] == "4"
    assert (p["Size-1"], p["Size-2"]) == ("48", "32")
    plain = client.post("/sdapi/v1/png-info", json={"image": b64_png(np.zeros((8, 8, 3), np.uint8))}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}


# -- queue, progress, skip and interrupt -----------------------------------------------------------------------------


class Gate:
    """Wraps pipe.run (the server's call per n_iter batch): the batch whose first image has index `at` waits at its
    first step until released."""

    def __init__(self, pipe, monkeypatch):
        self.original = pipe.run
        self.reached = {i: threading.Event() for i in range(8)}
        self.release = {i: threading.Event() for i in range(8)}
        self.gated: set[int] = set()
        self.calls: list[int] = []  # seed of each call's first image, in the order their first steps ran
        monkeypatch.setattr(pipe, "run", self.run)

    def run(self, request, on_image=None, callback=None, jobs=None, **kwargs):
        first = (jobs or request.jobs())[0]

        def step(event):
            if callback is not None:
                callback(event)
            if event.kind == "step" and event.step == 1:
                self.calls.append(first.seed)
                if first.index in self.gated:
                    self.reached[first.index].set()
                    assert self.release[first.index].wait(30)

        return self.original(request, on_image, step, jobs, **kwargs)


def in_thread(client, path, body):
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(r=client.post(path, json=body)))
    thread.start()
    return thread, out


def wait_for(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_progress_skip_and_interrupt(client, pipe, monkeypatch):
    body = {"prompt": "x", "steps": 4, "width": 32, "height": 32, "seed": 20, "batch_size": 1, "n_iter": 3}
    expected = decode(post_ok(client, "/sdapi/v1/txt2img", {**body, "seed": 21, "n_iter": 1})["images"])
    gate = Gate(pipe, monkeypatch)
    gate.gated = {0, 2}
    thread, out = in_thread(client, "/sdapi/v1/txt2img", body)
    assert gate.reached[0].wait(30)
    progress = client.get("/sdapi/v1/progress").json()
    state = progress["state"]
    assert (state["job"], state["job_count"], state["job_no"], state["sampling_step"], state["sampling_steps"]) == ("txt2img", 3, 0, 1, 4)
    assert progress["progress"] == pytest.approx(0.25 / 3) and progress["eta_relative"] > 0
    assert client.post("/sdapi/v1/skip").json() == {}  # batch 0 stops after this step; batch 1 runs
    gate.release[0].set()
    assert gate.reached[2].wait(30)
    assert client.post("/sdapi/v1/interrupt").json() == {}  # batch 2 stops; the request answers what it has
    gate.release[2].set()
    thread.join(30)
    r = out["r"]
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [21] and info["interrupted"] is True
    same(decode(r.json()["images"]), expected)
    assert client.get("/sdapi/v1/progress").json()["state"]["job"] == ""
    # An interrupt while idle does not stop the next request.
    client.post("/sdapi/v1/interrupt")
    assert len(post_ok(client, "/sdapi/v1/txt2img", {**body, "n_iter": 2})["images"]) == 2


def test_requests_run_first_come_first_served_and_the_queue_is_bounded(client, pipe, monkeypatch):
    """A request of another size waits until the running one is done; a later one of the running size does not
    pass it (first come, first served); beyond max_queue waiting requests: 503."""
    gate = Gate(pipe, monkeypatch)
    gate.gated = {0}
    body = {"prompt": "x", "steps": 2, "width": 32, "height": 32}
    worker = client.app.state.worker
    threads = [in_thread(client, "/sdapi/v1/txt2img", {**body, "seed": 100})]
    assert gate.reached[0].wait(30)
    for seed, width in ((200, 48), (300, 32)):
        waiting = worker.waiting
        threads.append(in_thread(client, "/sdapi/v1/txt2img", {**body, "seed": seed, "width": width}))
        wait_for(lambda: worker.waiting == waiting + 1)
    r = client.post("/sdapi/v1/txt2img", json={**body, "seed": 400})  # max_queue 2 are waiting
    assert r.status_code == 503 and r.headers["Retry-After"] == "10" and "--max_queue 2" in r.json()["detail"]
    gate.release[0].set()
    for thread, out in threads:
        thread.join(60)
        assert out["r"].status_code == 200
    assert gate.calls == [100, 200, 300]
    assert [json.loads(out["r"].json()["info"])["seed"] for _, out in threads] == [100, 200, 300]


# -- scripts/serve.py as a process on loopback -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, timeout: float = 60.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


@needs_serve
def test_serve_script_answers_over_loopback(tiny_ckpt, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}/sdapi/v1"
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "serve.py"), "--ckpt", str(tiny_ckpt), "--config", TINY, "--device", "cpu",
         "--precision", "full", "--port", str(port), "--max_steps", "10"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                status, options = http("GET", f"{base}/options", timeout=5)
                break
            except OSError:
                assert time.monotonic() < end, "server did not start: " + (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
        assert status == 200 and options["sd_model_checkpoint"].startswith("tiny.ckpt [")
        status, out = http("POST", f"{base}/txt2img", {"prompt": "a cat", "steps": 2, "width": 32, "height": 32, "seed": 1, "batch_size": 2})
        assert status == 200 and len(out["images"]) == 2 and json.loads(out["info"])["all_seeds"] == [1, 2]
        assert decode(out["images"])[0].size == (32, 32)
        with pytest.raises(urllib.error.HTTPError) as e:
            http("POST", f"{base}/txt2img", {"steps": 11})
        assert e.value.code == 422
        assert http("GET", f"{base}/progress")[1]["progress"] == 0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    # uvicorn shuts down cleanly, then re-raises SIGTERM (the exit status a supervisor expects).
    assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in text, text
    assert "Serving tiny.ckpt on http://127.0.0.1:" in text
