"""Run a forward in another thread and hold it inside a module, to test what a concurrent call does."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

WAIT_S = 300  # only against a hang when the held call fails; no test depends on timing


def in_thread(call: Callable[[], Any], name: str = "other") -> dict[str, Any]:
    """Run ``call`` in a new thread and wait for it: ``{"value": ...}`` or ``{"error": exception}``."""
    result: dict[str, Any] = {}
    thread = threading.Thread(target=_store, args=(call, result), name=name)
    thread.start()
    thread.join(WAIT_S)
    return result


def _store(call: Callable[[], Any], result: dict[str, Any]) -> None:
    try:
        result["value"] = call()
    except Exception as error:  # handed to the test
        result["error"] = error


@contextlib.contextmanager
def held_inside(module: nn.Module, call: Callable[[], Any]) -> Iterator[dict[str, Any]]:
    """Start ``call`` in thread "held" and keep it waiting when it reaches ``module`` (a forward pre-hook), until
    the ``with`` block ends; the yielded dict gets ``call``'s value or error once the thread has finished."""
    inside, release = threading.Event(), threading.Event()

    def hold(*_: Any) -> None:
        if threading.current_thread().name == "held":
            inside.set()
            release.wait(WAIT_S)

    handle = module.register_forward_pre_hook(hold)
    result: dict[str, Any] = {}
    thread = threading.Thread(target=_store, args=(call, result), name="held")
    thread.start()
    try:
        if not inside.wait(WAIT_S):
            raise AssertionError(f"the held call never reached the module: {result}")
        yield result
    finally:
        release.set()
        thread.join(WAIT_S)
        handle.remove()
