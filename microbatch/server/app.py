"""The HTTP application: the AUTOMATIC1111 web UI's `/sdapi/v1` API over one loaded `Pipeline`.

    app = create_app(Pipeline.from_checkpoint(...), ServerLimits(max_steps=100))   # an ASGI app (FastAPI)

Tests drive it in-process with FastAPI's TestClient; `scripts/serve.py` runs it with uvicorn. Generation requests
are admitted first come, first served and run together, their rows sharing UNet calls (`microbatch.server.worker`,
`microbatch.server.scheduler`); everything else answers at once, also while images are being made. Bad input is
HTTP 422 with a one-line `detail` (a body over the size limit 413, a full queue 503 with Retry-After); the OpenAPI
page is at /docs, the web page at /. With `SecurityOptions`, every route needs credentials
(`microbatch.server.security`) and CORS allows the given origins (else it is off).
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from microbatch.hires import UPSCALERS
from microbatch.pipeline import Pipeline
from microbatch.request import UsageError
from microbatch.server.payloads import Img2ImgRequest, OptionsUpdate, PngInfoRequest, Txt2ImgRequest
from microbatch.server.security import Authenticate, SecurityOptions, options_problem
from microbatch.server.service import VERSION, ServerLimits, Service
from microbatch.server.webpage import page_response
from microbatch.server.webui import api_message, samplers_list, schedulers_list
from microbatch.server.worker import QueueFull, ShuttingDown, Worker

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 10  # what a client told "queue full" should wait before trying again
DISCONNECT_POLL_S = 0.1  # how often a waiting request checks that its client is still there


class _BodyTooLarge(Exception):
    pass


class GenerationFailed(Exception):
    """An unexpected failure while making images (answered with HTTP 500 and one line; logged with its traceback)."""


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` (by its Content-Length or as it streams in) is answered
    with HTTP 413 before it is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        response = JSONResponse({"error": "BodyTooLarge", "detail": f"request body over this server's limit of {self.max_bytes} bytes (--max_body_bytes)"}, status_code=413)
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _error(status: int, kind: str, detail: str, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": " ".join(detail.split())}, status_code=status, headers=headers)


def add_security(app: FastAPI, security: SecurityOptions) -> None:
    """Authentication inside CORS: a browser's preflight (which carries no credentials) is answered by CORS for
    the allowed origins, everything else needs credentials; both outside the body limit, so a caller without
    credentials learns nothing, not even the limit."""
    if security.auth_required:
        app.add_middleware(Authenticate, users=security.users, api_keys=security.api_keys)
    if security.cors_origins:  # as the web UI's --cors-allow-origins
        app.add_middleware(CORSMiddleware, allow_origins=list(security.cors_origins), allow_methods=["*"], allow_headers=["*"], allow_credentials=True)


def create_app(
    pipeline: Pipeline,
    limits: Optional[ServerLimits] = None,
    max_batch_size: Any = None,
    embeddings_dir: str = "embeddings",
    security: Optional[SecurityOptions] = None,
    batching: bool = True,
) -> FastAPI:
    """The web UI API over `pipeline`. `limits`: what one request may ask for (default `ServerLimits()`);
    `max_batch_size`: most images in flight, whose rows share each UNet call (an int, "auto", or None for the
    scripts' default for the image size); `embeddings_dir`: the textual-inversion embeddings prompts may use
    (loaded now, and again by a request when its files changed); `security`: credentials every route needs and
    CORS origins (default: none, CORS off); `batching` False: one request at a time. Running requests finish
    before the app's shutdown completes."""
    limits = limits or ServerLimits()
    service = Service(pipeline, limits, max_batch_size, embeddings_dir, batching)
    worker = Worker(pipeline, limits.max_queue, on_stop=service.scheduler.admission.wake)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="microbatch-diffusion", version=VERSION, description=__doc__, lifespan=lifespan)
    app.state.service = service
    app.state.worker = worker
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    add_security(app, security or SecurityOptions())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error(422, "ValidationError", "; ".join(parts))

    @app.exception_handler(UsageError)
    async def _usage(request: Request, e: UsageError) -> JSONResponse:
        return _error(422, "UsageError", api_message(str(e)))

    @app.exception_handler(QueueFull)
    async def _full(request: Request, e: QueueFull) -> JSONResponse:
        return _error(503, "QueueFull", f"server busy: {e}; try again later", {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(ShuttingDown)
    async def _stopping(request: Request, e: ShuttingDown) -> JSONResponse:
        return _error(503, "ShuttingDown", str(e), {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(GenerationFailed)
    async def _failed(request: Request, e: GenerationFailed) -> JSONResponse:
        return _error(500, "GenerationFailed", str(e))

    async def generate(payload: Txt2ImgRequest, mode: str, http_request: Request) -> dict[str, Any]:
        built = await run_in_threadpool(service.build, payload, mode)
        future = worker.submit(lambda control: service.run(built, control), built.job, built.request.n_iter)
        answer = asyncio.wrap_future(future)
        try:
            # A client that goes away has its rows dropped at their next step (or leaves the queue).
            while not (await asyncio.wait({answer}, timeout=DISCONNECT_POLL_S))[0]:
                if await http_request.is_disconnected():
                    worker.disconnect(future.control)  # type: ignore[attr-defined]
                    break
            return await answer
        except (UsageError, ValueError) as e:  # found only when the model is at hand (an unreadable image...)
            raise UsageError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - one line to the client, the traceback to the log
            logger.exception("%s request failed", mode)
            raise GenerationFailed(f"{type(e).__name__}: {e}") from None

    @app.post("/sdapi/v1/txt2img", tags=["sdapi"])
    async def txt2img(payload: Txt2ImgRequest, http_request: Request) -> dict[str, Any]:
        """Text to image; answers images (base64 PNGs with their parameters chunk), parameters and info."""
        return await generate(payload, "txt2img", http_request)

    @app.post("/sdapi/v1/img2img", tags=["sdapi"])
    async def img2img(payload: Img2ImgRequest, http_request: Request) -> dict[str, Any]:
        """Image to image from init_images[0]; with mask, inpainting (white = repaint)."""
        return await generate(payload, "img2img", http_request)

    @app.get("/sdapi/v1/progress", tags=["sdapi"])
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        """The progress (0..1) of the earliest running request, its estimated seconds left and the web UI's state
        fields; `queued` counts the requests waiting."""
        control = worker.current()
        waiting = worker.waiting
        snap = control.progress if control else pipeline.progress()
        state = {
            "skipped": bool(control and control.skipped), "interrupted": bool(control and control.interrupted),
            "stopping_generation": False, "job": control.job if control else "", "job_count": control.batches if control else 0,
            "job_timestamp": control.timestamp if control else "0", "job_no": control.batch_no if control else 0,
            "sampling_step": snap.step if control else 0, "sampling_steps": snap.steps_total if control else 0, "queued": waiting,
        }
        textinfo = f"{waiting} waiting" if waiting else None
        if control is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": textinfo}
        fraction = (control.batch_no + (snap.fraction if snap.state == "running" else 0.0)) / max(1, control.batches)
        elapsed = max(0.0, time.time() - control.started)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        return {"progress": min(1.0, fraction), "eta_relative": eta, "state": state, "current_image": None, "textinfo": textinfo}

    @app.post("/sdapi/v1/interrupt", tags=["sdapi"])
    async def interrupt() -> dict[str, Any]:
        """Stop every running request after its current sampler step; each answers the images finished so far
        (waiting requests still run)."""
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip", tags=["sdapi"])
    async def skip() -> dict[str, Any]:
        """Stop every running request's current n_iter batch; each goes on with its next."""
        worker.skip()
        return {}

    @app.get("/microbatch/v1/batching", tags=["microbatch"])
    async def batching_stats() -> dict[str, Any]:
        """Cross-request batching counters: UNet calls, rows per call, calls holding rows of several requests
        (shared_calls), out-of-memory halvings, requests dropped at a step, and the queue."""
        return {**service.scheduler.stats(), "queued": worker.waiting, "running": len(worker.running())}

    @app.get("/sdapi/v1/samplers", tags=["sdapi"])
    async def samplers() -> list[dict[str, Any]]:
        return samplers_list()

    @app.get("/sdapi/v1/schedulers", tags=["sdapi"])
    async def schedulers() -> list[dict[str, Any]]:
        return schedulers_list()

    @app.get("/sdapi/v1/upscalers", tags=["sdapi"])
    async def upscalers() -> list[dict[str, Any]]:
        """The pixel upscalers a hires pass may use (hr_upscaler); the latent ones are /latent-upscale-modes."""
        return [
            {"name": webui, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for webui, mode in UPSCALERS.values() if mode is None
        ]

    @app.get("/sdapi/v1/latent-upscale-modes", tags=["sdapi"])
    async def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": webui} for webui, mode in UPSCALERS.values() if mode is not None]

    @app.get("/sdapi/v1/sd-models", tags=["sdapi"])
    async def sd_models() -> list[dict[str, Any]]:
        return service.sd_models()

    @app.get("/sdapi/v1/sd-vae", tags=["sdapi"])
    async def sd_vae() -> list[dict[str, Any]]:
        return service.sd_vaes()

    @app.get("/sdapi/v1/options", tags=["sdapi"])
    async def get_options() -> dict[str, Any]:
        return service.get_options()

    @app.post("/sdapi/v1/options", tags=["sdapi"])
    async def set_options(update: OptionsUpdate) -> None:
        """Set eta_ddim / eta_ancestral; the model, VAE, clip skip and format can only be set to what they are."""
        reason = options_problem(update.model_dump(exclude_unset=True))
        if reason:  # a file named with a path: refused before anything looks at it
            raise UsageError(reason)
        service.set_options(update)

    @app.get("/sdapi/v1/loras", tags=["sdapi"])
    async def loras() -> list[dict[str, Any]]:
        return []  # LoRA files come with the issue that adds them

    @app.get("/sdapi/v1/embeddings", tags=["sdapi"])
    async def embeddings() -> dict[str, Any]:
        """The textual-inversion embeddings loaded from the server's embeddings folder, and those skipped (another
        width), as the web UI lists them: {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}}."""
        return service.embeddings()

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def web_page() -> HTMLResponse:
        """The web page: prompt, settings, Generate, live progress, the images with their parameters."""
        return page_response()

    @app.post("/sdapi/v1/png-info", tags=["sdapi"])
    async def png_info(payload: PngInfoRequest) -> dict[str, Any]:
        """The parameters text of a PNG (as the scripts and web UIs write it), raw and parsed."""
        return await run_in_threadpool(service.png_info, payload.image)

    return app
