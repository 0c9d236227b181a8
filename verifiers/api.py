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
    """Anything that grades a ``Sample``."""

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
        with _LOCK:
            if name in _REGISTRY and not overwrite:
                raise KexaoneError(f"a verifier named {name!r} is already registered")
            _REGISTRY[name] = factory
        return obj

    return decorate


def registered_names() -> list[str]:
    """Names registered so far (built-ins are registered when ``kexaone_align.verifiers`` is imported)."""
    with _LOCK:
        return sorted(_REGISTRY)


def get_verifier(name: str) -> Verifier:
    """Build the verifier registered under ``name``."""
    with _LOCK:
        factory = _REGISTRY.get(name)
    if factory is None:
        known = ", ".join(registered_names()) or "none"
        raise KexaoneError(f"no verifier named {name!r} is registered (known: {known})")
    verifier = factory()
    if not getattr(verifier, "name", None):
        verifier.name = name
    return verifier
