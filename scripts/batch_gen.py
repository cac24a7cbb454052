"""Exactly --n_samples images in micro-batches of at most --max_batch_size:
python scripts/batch_gen.py --prompt "a photograph of a cat" --n_samples 9 --max_batch_size 3"""
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from microbatch.cli import main_for  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    return main_for("batch_gen", None, argv)


if __name__ == "__main__":
    sys.exit(main())
