"""Helpers to call the scripts' main(argv) in-process."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def registered_script(name: str, module_name: str):
    """A script loaded as the module `module_name`, registered in sys.modules while in use (a script whose
    dataclasses look their module up there, as scripts/benchmark.py's do)."""
    spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(module_name, None)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
