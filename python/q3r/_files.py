"""Atomic file writes: the experiment's outputs, run files and checkpoints, and the demo's JSON.

A process killed while writing (Ctrl-C, a preempted job, out of memory) must not leave a
truncated file behind (resuming an experiment reads its run files and checkpoints back), nor
destroy the previous file. So every file is written to a temporary name in the same folder
(same file system) and moved over the real name with ``os.replace``, which is atomic: a
reader sees the old file or the new one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield a temporary path to write to; on success it replaces ``path``.

    The name ends in ``.tmp`` and starts with a dot, so the ``*.json`` / ``*.pt`` globs that
    find finished runs and checkpoints never pick up a leftover one; the process id keeps
    worker processes that write at the same time apart.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
