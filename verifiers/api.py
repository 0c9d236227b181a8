"""The verifier plugin contract: one rollout in (``Sample``), one graded result out (``VerifyResult``).

A verifier is anything with ``verify(sample) -> VerifyResult`` (the ``Verifier`` protocol), or a plain
function ``(sample) -> float | VerifyResult`` wrapped by ``register_verifier``. Rewards are in [0, 1].
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kexaone_align.errors import KexaoneError


@dataclass(frozen=True)
class Sample:
    """One rollout to grade. ``prompt`` is the user-visible prompt (text or chat messages)."""

    prompt: Any
    response: str
    reference: Any = None
    task: str = "math"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyResult:
    """A reward in [0, 1] and the evidence behind it (reason, timings, errors)."""

    reward: float
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        reward = float(self.reward)
        if not 0.0 <= reward <= 1.0 or reward != reward:
            raise ValueError(f"verifier reward must be in [0, 1], got {self.reward!r}")
        self.reward = reward


@runtime_checkable
class Verifier(Protocol):
    """Anything that grades a ``Sample``.

    A verifier may also define ``time_limit_s(sample) -> float``: the longest its ``verify`` can take
    under its own limits. ``score_batch`` then uses that (plus a grace) as the sample's time limit.
    """

    name: str

    def verify(self, sample: Sample) -> VerifyResult: ...


class FunctionVerifier:
    """Adapts ``fn(sample) -> float | VerifyResult`` to the ``Verifier`` protocol."""

    def __init__(self, name: str, fn: Callable[[Sample], float | VerifyResult]) -> None:
        self.name = name
        self.fn = fn

    def verify(self, sample: Sample) -> VerifyResult:
        out = self.fn(sample)
        if isinstance(out, VerifyResult):
            return out
        return VerifyResult(reward=float(out), details={})

    def __repr__(self) -> str:
        return f"FunctionVerifier({self.name!r}, {getattr(self.fn, '__qualname__', self.fn)!r})"


_REGISTRY: dict[str, Callable[[], Verifier]] = {}
_LOCK = threading.Lock()


def register_verifier(name: str, *, overwrite: bool = False) -> Callable[[Any], Any]:
    """Decorator registering a ``Verifier`` class (built with no arguments) or a plain function."""

    def decorate(obj: Any) -> Any:
        if isinstance(obj, type):
            factory: Callable[[], Verifier] = obj
        elif callable(obj):

            def factory(obj: Any = obj) -> Verifier:
                return FunctionVerifier(name, obj)
        else:
            raise TypeError(f"register_verifier({name!r}) expects a class or a function, got {obj!r}")
        _register_factory(name, factory, overwrite=overwrite)
        return obj

    return decorate


def _register_factory(name: str, factory: Callable[[], Verifier], *, overwrite: bool = False) -> None:
    """Add ``factory`` under ``name``; an entry-point placeholder may always be replaced by real code."""
    if not isinstance(name, str) or not name:
        raise KexaoneError(f"a verifier name must be a non-empty string, got {name!r}")
    with _LOCK:
        old = _REGISTRY.get(name)
        if old is not None and not overwrite and not getattr(old, "entry_point_placeholder", False):
            raise KexaoneError(f"a verifier named {name!r} is already registered")
        _REGISTRY[name] = factory


def _is_registered(name: str) -> bool:
    with _LOCK:
        return name in _REGISTRY


def _discover_plugins() -> None:
    # Imported here: loading.py imports this module.
    from kexaone_align.verifiers.loading import discover_entry_points

    discover_entry_points()


def registered_names() -> list[str]:
    """Registered names: built-ins, ``@register_verifier`` code, and installed entry-point plugins."""
    _discover_plugins()
    with _LOCK:
        return sorted(_REGISTRY)


def get_verifier(name: str) -> Verifier:
    """Build the verifier registered under ``name``."""
    with _LOCK:
        factory = _REGISTRY.get(name)
    if factory is None:
        _discover_plugins()
        with _LOCK:
            factory = _REGISTRY.get(name)
    if factory is None:
        known = ", ".join(registered_names()) or "none"
        raise KexaoneError(f"no verifier named {name!r} is registered (known: {known})")
    verifier = factory()
    if not getattr(verifier, "name", None):
        verifier.name = name
    return verifier
