"""`scripts/serve.py`: load a model, then serve the web UI's `/sdapi/v1` API with uvicorn.

Listens on 127.0.0.1 unless --host says otherwise (with a warning: the API has no authentication yet). Model
flags are the scripts' (`microbatch.cli`); without --ckpt, the default path or the demo model, as the scripts.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from typing import Optional, Sequence

from ldm.checkpoint import CheckpointError
from ldm.modules.attention_backends import BACKENDS
from microbatch.cli import OneLineParser, _HelpFormatter, _int_or_auto, exit_code_for
from microbatch.loading import DEFAULT_CKPT
from microbatch.request import ModelOptions, UsageError

logger = logging.getLogger(__name__)

INSTALL_HINT = 'the server needs FastAPI and uvicorn: pip install -e ".[serve]"'


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Serve the AUTOMATIC1111 web UI's /sdapi/v1 API (txt2img, img2img, progress...) over one model.", formatter_class=_HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", type=str, default=None, help=f"checkpoint (.ckpt or .safetensors); default {DEFAULT_CKPT}, else the embedded demo model")
    g.add_argument("--config", type=str, default=None, help="model yaml (default: the yaml beside the checkpoint, else inferred from the checkpoint)")
    g.add_argument("--vae", type=str, default=None, help="a VAE file replacing the checkpoint's own (default: <checkpoint stem>.vae.* beside the checkpoint, if any)")
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", type=str, choices=["full", "autocast"], default="autocast", help="autocast: half precision where it is safe and fast; full: float32")
    g.add_argument("--attention", type=str, default="auto", choices=list(BACKENDS), help="attention kernel")
    g.add_argument("--offload", type=str, default="none", choices=["none", "model", "sequential"], help="GPU memory saving (see the scripts' --offload)")
    g = p.add_argument_group("network")
    g.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on; anything but a loopback address lets other machines use the server")
    g.add_argument("--port", type=int, default=7860, help="TCP port")
    g = p.add_argument_group("limits and batching")
    g.add_argument("--max_batch_size", type=str, default=None, help="most images in flight, all requests together, whose rows share each UNet call; or auto (default: the scripts' for the image size)")
    g.add_argument("--batching", choices=["on", "off"], default="on", help="on: requests of the same size and LoRA set share UNet calls (continuous batching); off: one request at a time")
    g.add_argument("--max_pixels", type=int, default=1024 * 1024, help="most pixels (width x height) of an image a request may ask for")
    g.add_argument("--max_steps", type=int, default=150, help="most sampling steps a request may ask for")
    g.add_argument("--max_images", type=int, default=16, help="most images (batch_size x n_iter) per request")
    g.add_argument("--max_body_bytes", type=int, default=32 * 2**20, help="largest request body, in bytes")
    g.add_argument("--max_queue", type=int, default=64, help="most requests waiting behind the running one; beyond it HTTP 503")
    p.add_argument("--verbose", action="store_true", help="debug logs and tracebacks")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """A one-line UsageError when (host, port) cannot be bound (in use, no such address, a privileged port)."""
    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UsageError(f"--host {host}: cannot resolve it ({e.strerror or e})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, load, serve until SIGINT / SIGTERM (running and queued requests finish first); one-line errors."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        from microbatch.pipeline import Pipeline
        from microbatch.server.app import create_app
        from microbatch.server.service import ServerLimits

        limits = ServerLimits(args.max_pixels, args.max_steps, args.max_images, args.max_body_bytes, max_queue=args.max_queue)
        max_batch_size = _int_or_auto(args.max_batch_size)
        if max_batch_size is not None and max_batch_size != "auto" and max_batch_size < 1:
            raise UsageError(f"--max_batch_size must be a positive integer or auto, got {max_batch_size}")
        options = ModelOptions(
            ckpt=args.ckpt, config=args.config, vae=args.vae, device=args.device, precision=args.precision, attention=args.attention,
            offload=args.offload,
        )
        check_port_free(args.host, args.port)  # before the model loads: a busy port fails in a second, not a minute
        pipeline = Pipeline.load(options, on_note=print)
        app = create_app(pipeline, limits, max_batch_size, batching=args.batching == "on")
    except (KeyboardInterrupt, UsageError, CheckpointError, ValueError, FileNotFoundError) as e:
        return exit_code_for(e, args.verbose)
    if not is_loopback(args.host):
        print(
            f"warning: listening on {args.host}, not a loopback address: anyone who can reach this machine can use the "
            f"server, which has no authentication yet",
            file=sys.stderr,
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    model = pipeline.loaded.ckpt.name if pipeline.loaded.ckpt else "the model"
    print(f"Serving {model} on http://{host}:{args.port} (API: /sdapi/v1, docs: /docs)", flush=True)
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="debug" if args.verbose else "info")).run()
    return 0
