"""Fault injection points, for tests only.

The fault-tolerance tests need to kill a rollout worker while it generates, or a learner between two
steps, at a precise moment. Rather than monkey-patching internals, the runtime calls :func:`fire` at a
few named points, and a test registers a hook there with :func:`injected`. With no hook registered
(always, outside tests) :func:`fire` is one dictionary lookup.

Points (keyword arguments passed to the hook):

- ``"rollout.submitted"``: right after ``RolloutPool.submit`` (``runtime.rollout.pool``) launched its
  jobs (``pool``, ``jobs``).
- ``"stage.step_done"``: after a stage logged step ``run.step`` and took its checkpoint, if due
  (``run``, ``learners``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

POINTS = ("rollout.submitted", "stage.step_done")

_hooks: dict[str, Callable[..., None]] = {}


def fire(point: str, **context: Any) -> None:
    """Call the hook registered at ``point`` (if any) with ``context``."""
    hook = _hooks.get(point)
    if hook is not None:
        hook(**context)


@contextmanager
def injected(point: str, hook: Callable[..., None]) -> Iterator[None]:
    """Register ``hook`` at ``point`` for the duration of the ``with`` block (tests only)."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
    if point in _hooks:
        raise ValueError(f"a hook is already registered at {point!r}")
    _hooks[point] = hook
    try:
        yield
    finally:
        _hooks.pop(point, None)
