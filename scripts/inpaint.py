"""Inpainting: python scripts/inpaint.py --init-img in.png --mask mask.png --prompt "a bench in a park"

White in the mask is repainted. With an inpainting checkpoint (SD 2 inpainting, 9 UNet input channels) the model
sees the mask and the masked image; with an ordinary checkpoint the known region is blended in at every step.
"""
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from microbatch.cli import main_for  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for("inpaint", None, argv)


if __name__ == "__main__":
    sys.exit(main())
