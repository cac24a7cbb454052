"""An HTTP server speaking the AUTOMATIC1111 web UI's `/sdapi/v1` API over one loaded Pipeline.

Needs the optional dependencies: `pip install -e ".[serve]"` (FastAPI and uvicorn). `create_app` builds the ASGI
app (`microbatch.server.app`); `scripts/serve.py` runs it (`microbatch.server.cli`).
"""
from typing import Any

__all__ = ["create_app", "ServerLimits"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that a missing FastAPI is reported where it is needed, as one line.
    if name == "create_app":
        from microbatch.server.app import create_app

        return create_app
    if name == "ServerLimits":
        from microbatch.server.service import ServerLimits

        return ServerLimits
    raise AttributeError(f"module 'microbatch.server' has no attribute {name!r}")
