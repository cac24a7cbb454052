"""File modes: files this project writes get the permissions of an ordinary `open()`, 0666 minus the umask.

Two writers create files with mode 0600 whatever the umask: `tempfile.mkstemp` (the atomic PNG writes) and
safetensors' `save_file` (converted checkpoints, the demo model). Under the usual umask 0022 that left images and
checkpoints unreadable to other users while the metrics JSON, written with `open()`, was 0644.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def current_umask() -> int:
    """The process's umask, read from /proc/self/status where it is shown (Linux 4.7+), else by setting and
    restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0666 & ~umask: the mode `open(path, "w")` would give a new file (0644 under umask 0022)."""
    return 0o666 & ~current_umask()


def honour_umask(path: Union[str, Path]) -> None:
    """Give a file this process created the mode an ordinary `open()` would have given it."""
    os.chmod(path, default_file_mode())
