"""Serve the AUTOMATIC1111 web UI's API: python scripts/serve.py --ckpt model.safetensors --port 7860"""
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from microbatch.server.cli import main as serve_main  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
