"""The web page at / in a real headless browser: Debian's Chromium (/usr/bin/chromium) driven by playwright, against
scripts/serve.py with the demo model on 127.0.0.1. Fill the prompt, Generate, watch the progress, read the images
and their parameters; the images equal the API's for the same settings.

MICROBATCH_WEBUI_SCREENSHOT=docs/webui.png also saves a screenshot of the page with its results (the README's).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import urllib.request
from pathlib import Path

import pytest


CHROMIUM = Path("/usr/bin/chromium")
HAVE_SERVE = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn"))

pytestmark = [
    pytest.mark.skipif(not HAVE_SERVE, reason='needs the serve extra: pip install -e ".[test,serve]"'),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium; .ci/run installs it)"),
]

PROMPT = "a red circle on a white background"
SETTINGS = {"sampler_name": "DDIM", "steps": 30, "width": 64, "height": 64, "seed": 1234, "cfg_scale": 2, "batch_size": 2}


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_web_page_generates_with_live_progress_in_headless_chromium(demo_server):
    from playwright.sync_api import sync_playwright

    samplers = [s["name"] for s in json.load(urllib.request.urlopen(demo_server.base + "/sdapi/v1/samplers", timeout=30))]
    problems: list[str] = []  # script errors and console errors (a Content-Security-Policy violation is one)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.set_default_timeout(60_000)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.goto(demo_server.base + "/")
            page.wait_for_function("() => document.querySelectorAll('#sampler option').length > 1")
            assert page.eval_on_selector_all("#sampler option", "options => options.map(o => o.value)") == samplers
            assert page.input_value("#sampler") == "Euler a"
            assert page.text_content("#model").startswith("demo-shapes.safetensors [")

            page.fill("#prompt", PROMPT)
            page.select_option("#sampler", SETTINGS["sampler_name"])
            for field in ("steps", "width", "height", "seed", "cfg_scale", "batch_size"):
                page.fill(f"#{field}", str(SETTINGS[field]))
            page.click("#generate")
            # While it runs: the bar and its text follow /sdapi/v1/progress, Generate waits, Interrupt is offered.
            page.wait_for_function("() => /^Step \\d+\\/\\d+ · \\d+%/.test(document.getElementById('progress-text').textContent)")
            assert page.is_disabled("#generate") and page.is_enabled("#interrupt")
            page.wait_for_selector("#results figure.result img", timeout=120_000)
            page.wait_for_function("() => !document.getElementById('generate').disabled")

            texts = page.locator("#results pre.infotext").all_inner_texts()
            assert len(texts) == 2
            for text, seed in zip(texts, (1234, 1235)):
                assert text.startswith(PROMPT + "\n") and f"Seed: {seed}," in text and "Steps: 30," in text and "Size: 64x64" in text
            assert int(page.get_attribute("#progress", "data-updates")) >= 1  # polls that saw the request running
            assert page.eval_on_selector("#progress", "bar => bar.value") == 1
            assert page.text_content("#progress-text").startswith("Done: 2 images in ")
            assert page.eval_on_selector_all("#results img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])") == [[64, 64]] * 2
            assert page.text_content("#error") == ""
            shown = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.src)")

            screenshot = os.environ.get("MICROBATCH_WEBUI_SCREENSHOT")
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)

            assert problems == []
            # A bad request shows the server's one-line message (and the browser logs the failed request).
            page.fill("#steps", "1000")
            page.click("#generate")
            page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
            assert "steps 1000 is more than this server's limit" in page.text_content("#error")
        finally:
            browser.close()
    assert [m for m in problems if "status of 422" not in m] == []
    # The page's images are the API's for the same settings, byte for byte.
    out = post(demo_server.base + "/sdapi/v1/txt2img", {"prompt": PROMPT, **SETTINGS})
    assert [s.split(",", 1)[1] for s in shown] == out["images"]
    assert base64.b64decode(out["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"
