"""Test-only fault injection: SIGKILL this process, or pause it, at the Nth call of a named
function.

A process started with this folder on ``PYTHONPATH`` reads ``AMALGAM_TEST_KILL`` at start-up:
``module:Qual.name:N`` kills the process on the Nth call of ``Qual.name`` (looked up in
``module``), before the call runs; ``module:Qual.name:N:after`` just after it returns (a
coroutine function: once awaited). The
function is replaced on its owner (module or class) when ``module`` is first imported, so
the product code carries no hook. Calls are counted over all threads of the process.

With ``AMALGAM_TEST_KILL_ONCE=<file>`` only the first process to reach the point dies: it
creates the file (holding its pid) first, so that a retried task in another process (a
Ray worker) survives the same point.

``AMALGAM_TEST_PAUSE`` names a point the same way; with ``AMALGAM_TEST_PAUSE_DIR=<folder>``
the process reaching it creates ``<folder>/paused`` (holding its pid) and waits there until
``<folder>/resume`` exists: a test breaks something at exactly that point of the run, however
slow the machine, then lets it go on.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def _die(once: str | None) -> None:
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _pause(folder: str) -> None:
    with open(os.path.join(folder, "paused.tmp"), "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(os.path.join(folder, "paused.tmp"), os.path.join(folder, "paused"))
    while not os.path.exists(os.path.join(folder, "resume")):
        time.sleep(0.02)


def _patch(module: Any, qualname: str, nth: int, after: bool, act: Callable[[], None]) -> None:
    *path, attr = qualname.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, attr)
    calls = [0]
    lock = threading.Lock()

    def count() -> bool:
        """Count the call; act now if it is the one; True if it is and acts on return."""
        with lock:
            calls[0] += 1
            hit = calls[0] == nth
        if hit and not after:
            act()
        return hit and after

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        act_after = count()
        result = original(*args, **kwargs)
        if act_after:
            act()
        return result

    @functools.wraps(original)
    async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
        act_after = count()
        result = await original(*args, **kwargs)
        if act_after:
            act()
        return result

    setattr(owner, attr, async_wrapper if inspect.iscoroutinefunction(original) else wrapper)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches the target right after its module has run, before anyone imports from it."""

    def __init__(self, module: str, patch: Any):
        self.module = module
        self.patch = patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            self.patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _install(spec: str, act: Callable[[], None]) -> None:
    module, qualname, nth, *when = spec.split(":")

    def patch(mod: Any) -> None:
        _patch(mod, qualname, int(nth), when == ["after"], act)

    if module in sys.modules:
        patch(sys.modules[module])
    else:
        sys.meta_path.insert(0, _PatchOnImport(module, patch))


if os.environ.get("AMALGAM_TEST_KILL"):
    _install(
        os.environ["AMALGAM_TEST_KILL"], lambda: _die(os.environ.get("AMALGAM_TEST_KILL_ONCE"))
    )
if os.environ.get("AMALGAM_TEST_PAUSE"):
    _install(os.environ["AMALGAM_TEST_PAUSE"], lambda: _pause(os.environ["AMALGAM_TEST_PAUSE_DIR"]))
