"""Convert a checkpoint to .safetensors (tensors only, optionally fp16).

    python scripts/convert_checkpoint.py model.ckpt model.safetensors [--half]

Files that only hold tensors (and Lightning bookkeeping) convert safely. A .ckpt whose pickle needs arbitrary
code is refused unless you pass --trust-pickle, which unpickles it with full Python: only do that for files
you trust, once, and use the .safetensors output from then on.
"""
import argparse
import os
import pickle
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch
    from safetensors.torch import save_file

    from ldm.checkpoint import CheckpointError, check_readable, read_checkpoint, sniff_format
    from microbatch.files import honour_umask

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--half", action="store_true", help="store floating-point tensors as float16")
    p.add_argument("--trust-pickle", action="store_true", help="unpickle with full Python (runs code from the file!)")
    args = p.parse_args(argv)
    if not args.dst.endswith(".safetensors"):
        print("error: the output name must end in .safetensors", file=sys.stderr)
        return 2
    if os.path.exists(args.dst):
        print(f"error: {args.dst} exists; not overwriting", file=sys.stderr)
        return 2
    try:
        if args.trust_pickle and sniff_format(check_readable(args.src)) != "safetensors":
            obj = torch.load(args.src, map_location="cpu", weights_only=False)
            sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{args.src} does not hold a state dict")
            sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        else:
            sd, _ = read_checkpoint(args.src)
    except (CheckpointError, OSError, RuntimeError, EOFError, ValueError, KeyError, ImportError, AttributeError, pickle.UnpicklingError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    if args.half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    tmp = args.dst + ".partial"
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
    honour_umask(tmp)  # safetensors writes 0600; a converted checkpoint gets the umask's mode (0644 under 0022)
    os.replace(tmp, args.dst)
    print(f"wrote {len(sd)} tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
