"""The web page at `/`: one static HTML file with its script and style inline (`static/index.html`), no build step,
nothing loaded from elsewhere. It calls the API the page came from: GET /sdapi/v1/samplers, POST /sdapi/v1/txt2img,
GET /sdapi/v1/progress while the request runs (the progress bar and the preview), POST /sdapi/v1/interrupt.

The page is sent with a Content-Security-Policy that lets only its own inline script (by its sha256) run and lets it
connect only to this server: text shown from an answer (prompts, parameters) can never run as script, and the page
can send nothing elsewhere.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from starlette.responses import HTMLResponse

_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


@functools.lru_cache(maxsize=1)
def _page() -> tuple[str, str]:
    """(the HTML, its Content-Security-Policy)."""
    html = resources.files("microbatch.server").joinpath("static").joinpath("index.html").read_text(encoding="utf-8")
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii") + "'"
        for script in _SCRIPT.findall(html)
    )
    policy = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, policy


def page_response() -> HTMLResponse:
    """GET /: the page, not cached (a server update shows at the next load), with its security headers."""
    html, policy = _page()
    headers = {
        "Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return HTMLResponse(html, headers=headers)
