"""The server's security: 127.0.0.1 by default, --listen only with credentials (or --insecure), HTTP basic and API-key
authentication on every route compared in constant time, no file named with a path, CORS off unless asked for.
Over real HTTP on 127.0.0.1 (scripts/serve.py as a process with the demo model), plus the pieces in-process."""
from __future__ import annotations

import base64
import importlib.util
import json
import urllib.error
import urllib.request
from typing import Optional

import pytest

from microbatch.server import security
from microbatch.server.security import Credentials, name_problem, parse_api_auth, path_problem, prompt_problem
from tests.script_utils import load_script
from tests.server_process import free_port, serving

HAVE_SERVE = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn"))
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason='needs the serve extra: pip install -e ".[test,serve]"')

USERS = "alice:s3cret,bob:pa:ss"  # bob's password holds a colon
KEY = "k-0123456789"
ORIGIN = "http://allowed.test"


def request(url: str, method: str = "GET", body: Optional[dict] = None, headers: Optional[dict] = None, user: Optional[str] = None):
    """(status, headers, parsed JSON or text) of one request; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if user is not None:
        h["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, head, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, e.headers, e.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, head, json.loads(text)
    except ValueError:
        return status, head, text


# -- flags (in-process, before any model loads) ------------------------------------------------------------------------


@needs_serve
@pytest.mark.parametrize("argv, message", [
    (["--listen"], "--listen lets other machines use the server: give --api-auth USER:PASS or --api-key KEY, or --insecure to serve without authentication"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 lets other machines use the server: give --api-auth USER:PASS or --api-key KEY"),
    (["--listen", "--host", "127.0.0.1"], "--listen (all interfaces) and --host 127.0.0.1 both say where to listen; give one"),
    (["--listen", "--api-auth", "alice"], "--api-auth takes USER:PASS[,USER:PASS], each with a user and a password; got 'alice'"),
    (["--api-auth", "alice:s3cret,:nouser"], "--api-auth takes USER:PASS[,USER:PASS], each with a user and a password; got ':nouser'"),
    (["--api-auth", "alice:"], "--api-auth takes USER:PASS[,USER:PASS]"),
    (["--listen", "--api-key", " "], "--api-key must not be empty"),
    (["--cors-allow-origins", ","], "--cors-allow-origins takes ORIGIN[,ORIGIN]"),
])
def test_bad_security_flags_are_one_line_errors(argv, message, capsys):
    assert load_script("serve").main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err


@needs_serve
@pytest.mark.parametrize("flags", [["--api-key", KEY], ["--api-auth", USERS], ["--insecure"]])
def test_listen_passes_the_check_with_credentials_or_insecure(flags, capsys):
    # A missing checkpoint is the next check after the flags: reaching it shows --listen was accepted.
    argv = ["--device", "cpu", "--listen", *flags, "--port", str(free_port()), "--ckpt", "no/such.ckpt"]
    assert load_script("serve").main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: checkpoint not found: no/such.ckpt"]


# -- constant-time comparison and names (in-process) -------------------------------------------------------------------


def test_credentials_are_compared_against_every_pair_without_early_exit(monkeypatch):
    calls = []

    def counting(a, b):
        calls.append((len(a), len(b)))
        return original(a, b)

    original = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    creds = Credentials(parse_api_auth("alice:s3cret,bob:pa:ss,carol:x"), ["key-one", "a-much-longer-key-two"])
    for user, password, ok in [(b"alice", b"s3cret", True), (b"bob", b"pa:ss", True), (b"carol", b"x", True), (b"alice", b"x", False),
                               (b"mallory", b"s3cret", False), (b"", b"", False)]:
        calls.clear()
        assert creds.check_basic(user, password) is ok
        assert len(calls) == 6 and set(calls) == {(32, 32)}  # user and password of all three pairs, equal-length digests
    for key, ok in [(b"key-one", True), (b"a-much-longer-key-two", True), (b"key", False)]:
        calls.clear()
        assert creds.check_key(key) is ok
        assert len(calls) == 2 and set(calls) == {(32, 32)}


@pytest.mark.parametrize("name", ["../model.ckpt", "..\\model.ckpt", "/etc/passwd", "C:\\models\\x.safetensors", "C:x.ckpt",
                                  "sub/dir.ckpt", "..", "a\x00b"])
def test_names_with_a_path_are_refused(name):
    assert "is not a plain name" in name_problem("sd_vae", name)


@pytest.mark.parametrize("name", ["tiny.ckpt [0123456789]", "Automatic", "None", "my_lora-v1.2.safetensors", "demo-shapes"])
def test_plain_names_pass(name):
    assert name_problem("sd_model_checkpoint", name) is None


def test_prompt_tags_with_a_path_are_refused():
    for prompt in ["a cat <lora:../secret:1>", "<lora:/abs/x.safetensors:0.5>", "<lyco:sub\\x:1>", "<hypernet:../h:1> cat",
                   "<lora:x:1> <lora:..:1>"]:
        assert "names a path" in prompt_problem("prompt", prompt), prompt
    for prompt in ["a cat <lora:style_v2:0.8>", "<lora:x:te=0.5:unet=1>", "a 1/2 cat, (red:1.2)", "<lora:x.y:1>", ""]:
        assert prompt_problem("prompt", prompt) is None, prompt

    class Payload:
        prompt, negative_prompt = "x", "y"
        override_settings = {"sd_model_checkpoint": "../../m.ckpt"}

    assert path_problem(Payload()) .startswith("override_settings.sd_model_checkpoint '../../m.ckpt' is not a plain name")
    Payload.override_settings = {"sd_model_checkpoint": "m.ckpt"}
    Payload.hr_checkpoint_name = "/models/other.safetensors"  # the hires fix field, where a payload has it
    assert path_problem(Payload()).startswith("hr_checkpoint_name '/models/other.safetensors' is not a plain name")


# -- over HTTP -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    if not HAVE_SERVE:
        pytest.skip('needs the serve extra: pip install -e ".[test,serve]"')
    folder = tmp_path_factory.mktemp("secured")
    with serving(["--api-auth", USERS, "--api-key", KEY, "--cors-allow-origins", f"{ORIGIN},http://other.test"], folder) as server:
        yield server


TINY_TXT2IMG = {"prompt": "a red circle on a white background", "steps": 2, "seed": 1, "width": 64, "height": 64}


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/sdapi/v1/options"), ("GET", "/sdapi/v1/progress"),
    ("GET", "/sdapi/v1/samplers"), ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/interrupt"), ("POST", "/sdapi/v1/options"),
    ("GET", "/no/such/route"),
])
def test_every_route_needs_credentials(secured, method, path):
    status, headers, body = request(secured.base + path, method, TINY_TXT2IMG if method == "POST" else None)
    assert status == 401, body
    assert body == {"error": "Unauthorized", "detail": "Not authenticated"}
    challenges = headers.get_all("WWW-Authenticate")
    assert challenges[0].startswith("Basic realm=") and any(c.startswith("Bearer") for c in challenges)


@pytest.mark.parametrize("user, headers", [
    ("alice:wrong", None), ("bob:s3cret", None),  # another user's password
    ("mallory:s3cret", None), ("alice", None), ("alice:s3cret ", None), (None, {"Authorization": f"Bearer {KEY}x"}),
    (None, {"X-API-Key": "k-012345678"}), (None, {"Authorization": "Basic !!not-base64!!"}), (None, {"Authorization": f"Token {KEY}"}),
])
def test_wrong_credentials_are_refused(secured, user, headers):
    status, head, body = request(secured.base + "/sdapi/v1/options", user=user, headers=headers)
    assert status == 401 and body["detail"] == "Incorrect username or password" and head.get("WWW-Authenticate")


def test_right_credentials_open_every_route(secured):
    status, head, page = request(secured.base + "/", user="alice:s3cret")
    assert status == 200 and "<title>microbatch-diffusion</title>" in page and "script-src 'sha256-" in head["Content-Security-Policy"]
    assert request(secured.base + "/docs", user="bob:pa:ss")[0] == 200
    assert request(secured.base + "/sdapi/v1/options", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    assert request(secured.base + "/sdapi/v1/options", headers={"authorization": f"bearer {KEY}"})[0] == 200  # the scheme is case-insensitive
    status, _, out = request(secured.base + "/sdapi/v1/txt2img", "POST", TINY_TXT2IMG, headers={"X-API-Key": KEY})
    assert status == 200 and len(out["images"]) == 1 and json.loads(out["info"])["all_seeds"] == [1]
    # A LoRA tag with a plain name is looked up in the server's folder (none there: skipped), not refused.
    status, _, out = request(secured.base + "/sdapi/v1/txt2img", "POST", {**TINY_TXT2IMG, "prompt": "a cat <lora:nosuch:1>"}, user="alice:s3cret")
    assert status == 200, out


@pytest.mark.parametrize("path, body, detail", [
    ("txt2img", {"prompt": "a cat <lora:../../outside:1>"}, "prompt: the tag '<lora:../../outside:1>' names a path"),
    ("txt2img", {"negative_prompt": "<lora:/tmp/x.safetensors:1>"}, "negative_prompt: the tag '<lora:/tmp/x.safetensors:1>' names a path"),
    ("txt2img", {"prompt": "<lora:C:\\loras\\x:1>"}, "names a path"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../../model.ckpt"}}, "override_settings.sd_model_checkpoint '../../model.ckpt' is not a plain name"),
    ("txt2img", {"override_settings": {"sd_vae": "/etc/vae.pt"}}, "override_settings.sd_vae '/etc/vae.pt' is not a plain name"),
    ("img2img", {"init_images": ["/etc/hostname"]}, "this server reads no URLs or file paths"),
    ("img2img", {"init_images": ["file:///etc/hostname"]}, "this server reads no URLs or file paths"),
    ("img2img", {"init_images": ["../x.png"]}, "this server reads no URLs or file paths"),
    ("options", {"sd_model_checkpoint": "../x.safetensors"}, "sd_model_checkpoint '../x.safetensors' is not a plain name"),
    ("options", {"sd_vae": "..\\vae.pt", "eta_ancestral": 0.5}, "sd_vae '..\\\\vae.pt' is not a plain name"),
])
def test_no_request_names_a_file_outside_the_servers_folders(secured, path, body, detail):
    full = body if path == "options" else {**TINY_TXT2IMG, **body}
    status, _, out = request(f"{secured.base}/sdapi/v1/{path}", "POST", full, headers={"X-API-Key": KEY})
    assert status == 422, out
    assert detail in out["detail"] and "\n" not in out["detail"]
    if path == "options":  # a refused update changes nothing
        assert request(secured.base + "/sdapi/v1/options", headers={"X-API-Key": KEY})[2]["eta_ancestral"] == 1.0


def test_cors_allows_only_the_given_origins(secured):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    status, head, _ = request(secured.base + "/sdapi/v1/txt2img", "OPTIONS", headers=preflight)  # no credentials in a preflight
    assert status == 200 and head["Access-Control-Allow-Origin"] == ORIGIN and head["Access-Control-Allow-Credentials"] == "true"
    status, head, _ = request(secured.base + "/sdapi/v1/txt2img", "OPTIONS", headers={**preflight, "Origin": "http://evil.test"})
    assert status == 400 and head.get("Access-Control-Allow-Origin") is None
    status, head, _ = request(secured.base + "/sdapi/v1/options", headers={"Origin": "http://other.test", "X-API-Key": KEY})
    assert status == 200 and head["Access-Control-Allow-Origin"] == "http://other.test"
    status, head, _ = request(secured.base + "/sdapi/v1/options", headers={"Origin": "http://evil.test", "X-API-Key": KEY})
    assert status == 200 and head.get("Access-Control-Allow-Origin") is None
    status, head, _ = request(secured.base + "/sdapi/v1/options", headers={"Origin": ORIGIN})  # CORS is no way around the credentials
    assert status == 401 and head["Access-Control-Allow-Origin"] == ORIGIN


@needs_serve
def test_by_default_loopback_only_no_auth_and_cors_off(demo_server):
    assert f"Uvicorn running on {demo_server.base}" in demo_server.log_text()  # 127.0.0.1, not all interfaces
    status, head, options = request(demo_server.base + "/sdapi/v1/options", headers={"Origin": ORIGIN})
    assert status == 200 and "sd_model_checkpoint" in options and head.get("Access-Control-Allow-Origin") is None
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    status, head, _ = request(demo_server.base + "/sdapi/v1/txt2img", "OPTIONS", headers=preflight)
    assert status == 405 and head.get("Access-Control-Allow-Origin") is None
