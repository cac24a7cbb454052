"""`scripts/serve.py`: load a model, then serve the web UI's `/sdapi/v1` API with uvicorn.

Listens on 127.0.0.1 unless --listen (all interfaces) or --host says otherwise; any address but a loopback one needs
credentials (--api-auth USER:PASS, as the AUTOMATIC1111 web UI, or --api-key KEY) or an explicit --insecure. Model
flags are the scripts' (`microbatch.cli`); without --ckpt, the default path or the demo model, as the scripts.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

from ldm.checkpoint import CheckpointError
from ldm.modules.attention_backends import BACKENDS
from microbatch.cli import OneLineParser, _HelpFormatter, _int_or_auto, exit_code_for
from microbatch.loading import DEFAULT_CKPT
from microbatch.request import ModelOptions, UsageError
from microbatch.server.security import SecurityOptions, parse_api_auth

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
    g.add_argument("--embeddings_dir", type=str, default="embeddings", help="textual-inversion embeddings prompts may name (.pt, .bin, .safetensors, searched recursively)")
    g = p.add_argument_group("network")
    g.add_argument("--host", type=str, default=None, help="address to listen on (default 127.0.0.1); anything but a loopback address lets other machines use the server and needs --api-auth, --api-key or --insecure")
    g.add_argument("--port", type=int, default=7860, help="TCP port")
    g.add_argument("--listen", action="store_true", help="listen on all interfaces (0.0.0.0), as the web UI's --listen; needs --api-auth, --api-key or --insecure")
    g.add_argument("--api-auth", dest="api_auth", type=str, default=None, metavar="USER:PASS[,USER:PASS]", help="HTTP basic authentication on every route (the API, the web page, /docs), as the web UI's --api-auth")
    g.add_argument("--api-key", dest="api_key", type=str, default=None, metavar="KEY", help="a key accepted on every route as 'Authorization: Bearer KEY' or an 'X-API-Key: KEY' header")
    g.add_argument("--insecure", action="store_true", help="allow --listen / a non-loopback --host without authentication")
    g.add_argument("--cors-allow-origins", dest="cors_allow_origins", type=str, default=None, metavar="ORIGIN[,ORIGIN]", help="web origins whose pages may call the API from a browser (e.g. http://localhost:5173); default: none, CORS off")
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


def security_options(args: argparse.Namespace) -> tuple[str, SecurityOptions]:
    """(the address to listen on, the credentials and CORS origins) from the flags; a UsageError when they
    disagree or when a non-loopback address would serve without authentication and without --insecure."""
    if args.listen and args.host is not None:
        raise UsageError(f"--listen (all interfaces) and --host {args.host} both say where to listen; give one")
    host = "0.0.0.0" if args.listen else (args.host or "127.0.0.1")
    users = parse_api_auth(args.api_auth) if args.api_auth is not None else ()
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key must not be empty")
    keys = (args.api_key.strip(),) if args.api_key is not None else ()
    origins: tuple[str, ...] = ()
    if args.cors_allow_origins is not None:
        origins = tuple(o.strip() for o in args.cors_allow_origins.split(",") if o.strip())
        if not origins:
            raise UsageError("--cors-allow-origins takes ORIGIN[,ORIGIN] (e.g. http://localhost:5173), got nothing")
    security = SecurityOptions(users=users, api_keys=keys, cors_origins=origins)
    if not is_loopback(host) and not security.auth_required and not args.insecure:
        flag = "--listen" if args.listen else f"--host {host}"
        raise UsageError(
            f"{flag} lets other machines use the server: give --api-auth USER:PASS or --api-key KEY, or --insecure to serve "
            f"without authentication"
        )
    return host, security


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

        host, security = security_options(args)
        limits = ServerLimits(args.max_pixels, args.max_steps, args.max_images, args.max_body_bytes, max_queue=args.max_queue)
        max_batch_size = _int_or_auto(args.max_batch_size)
        if max_batch_size is not None and max_batch_size != "auto" and max_batch_size < 1:
            raise UsageError(f"--max_batch_size must be a positive integer or auto, got {max_batch_size}")
        options = ModelOptions(
            ckpt=args.ckpt, config=args.config, vae=args.vae, device=args.device, precision=args.precision, attention=args.attention,
            offload=args.offload,
        )
        check_port_free(host, args.port)  # before the model loads: a busy port fails in a second, not a minute
        pipeline = Pipeline.load(options, on_note=print)
        if args.embeddings_dir != "embeddings" and not Path(args.embeddings_dir).is_dir():
            raise UsageError(f"--embeddings_dir {args.embeddings_dir}: no such folder")
        app = create_app(pipeline, limits, max_batch_size, args.embeddings_dir, security, batching=args.batching == "on")
    except (KeyboardInterrupt, UsageError, CheckpointError, ValueError, FileNotFoundError) as e:
        return exit_code_for(e, args.verbose)
    if not is_loopback(host) and not security.auth_required:
        print(f"warning: listening on {host} without authentication (--insecure): anyone who can reach this machine can use the server", file=sys.stderr)
    elif not is_loopback(host):
        print(f"note: listening on {host}; credentials travel in clear text over HTTP: put a TLS proxy in front across untrusted networks", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    model = pipeline.loaded.ckpt.name if pipeline.loaded.ckpt else "the model"
    print(f"Serving {model} on http://{shown}:{args.port} (web page: /, API: /sdapi/v1, docs: /docs)", flush=True)
    uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level="debug" if args.verbose else "info")).run()
    return 0
