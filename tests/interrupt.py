"""Kill a real writer at a chosen rename: the state a SIGKILL leaves on disk, made by the code itself."""
from __future__ import annotations

import multiprocessing
import os
import re
from pathlib import Path
from typing import Callable


def _die_at_rename(write: Callable, args: tuple, source: str) -> None:
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if Path(src).is_dir() and re.search(source, Path(src).name):
            os._exit(17)  # no clean-up runs, as under SIGKILL
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
    write(*args)


def killed_at_rename(write: Callable, args: tuple, source: str) -> None:
    """Run `write(*args)` (a module-level function) in a fresh process that dies at its first rename of a folder
    whose name matches the regex `source` (e.g. r"\\.tmp-": a finished build about to be renamed into place,
    after the previous folder was renamed aside). Fails if the writer never reached that rename. A spawned
    process, not a fork: a forked child of a process whose torch thread pool runs can hang."""
    child = multiprocessing.get_context("spawn").Process(target=_die_at_rename, args=(write, args, source))
    child.start()
    child.join(300)
    assert child.exitcode == 17, f"the writer never renamed a {source!r} folder (exit code {child.exitcode})"
