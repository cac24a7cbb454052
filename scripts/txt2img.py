"""Text to image: python scripts/txt2img.py --prompt "a photograph of a cat" --plms --n_samples 3"""
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from microbatch.cli import main_for  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for("txt2img", None, argv)


if __name__ == "__main__":
    sys.exit(main())
