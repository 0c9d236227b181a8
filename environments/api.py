"""The tool-environment plugin contract: a prompt row in, tools out, tool calls executed, a score at the end.

An environment is an object with

* ``tools(row) -> list[dict]``: the JSON schemas the policy sees (the chat template's ``tools=[...]``);
* ``reset(row) -> state``: a fresh per-episode state (any picklable value; the environment object
  itself holds no episode state, so one instance serves many concurrent episodes);
* ``call(state, name, arguments) -> str``: run one tool call and return its output; raise
  :class:`ToolError` for a failure the policy should read (bad arguments, a refused action);
* ``score(state, row, answer) -> float | EpisodeScore``: the reward in [0, 1] once the policy has
  answered (``answer`` is its final turn without reasoning).

Limits come from :class:`ToolLimits` (per-call time, output size, turns, calls per turn). An
environment whose tools are untrusted or may hang keeps ``isolation = "process"`` (the default): every
call then runs in a forked child that is killed at the time limit. Built-ins that bound themselves
(the sandboxed Python tool, the data-file environments, the calculator) run ``"inline"``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kexaone_align.errors import KexaoneError


class ToolError(Exception):
    """A tool call failed in a way the policy should be told about (its text becomes the tool result)."""


@dataclass(frozen=True)
class ToolLimits:
    """Bounds on one episode's tool use."""

    max_turns: int = 4  # assistant turns per episode (the last one must answer)
    call_timeout_s: float = 10.0
    max_output_chars: int = 2000
    max_calls_per_turn: int = 4

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_output_chars", "max_calls_per_turn"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise KexaoneError(f"tool limit {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.call_timeout_s > 0:
            raise KexaoneError(f"tool limit call_timeout_s must be > 0, got {self.call_timeout_s!r}")


@dataclass(frozen=True)
class ToolCall:
    """One parsed ``<tool_call>`` of the policy; ``error`` is set when it could not be parsed."""

    name: str
    arguments: dict[str, Any]
    raw: str = ""
    error: str | None = None


@dataclass(frozen=True)
class EpisodeScore:
    """A reward in [0, 1], whether the task counts as passed, and why."""

    reward: float
    passed: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        reward = float(self.reward)
        if not 0.0 <= reward <= 1.0:
            raise KexaoneError(f"an environment score must be in [0, 1], got {self.reward!r}")
        object.__setattr__(self, "reward", reward)
        if self.passed is None:
            object.__setattr__(self, "passed", reward >= 1.0)


class Environment:
    """Base class for tool environments; subclasses override ``tools``, ``call`` and usually ``reset``
    and ``score``. The default ``score`` grades the answer with the verifier named by the row's task."""

    name: str = ""
    isolation: Literal["inline", "process"] = "process"

    def tools(self, row: Any) -> list[dict[str, Any]]:
        """Tool schemas for this row (the row's own ``tools`` when it carries some)."""
        return list(getattr(row, "tools", None) or [])

    def reset(self, row: Any) -> Any:
        """A fresh state for one episode of ``row``."""
        return None

    def call(self, state: Any, name: str, arguments: dict[str, Any]) -> str:
        raise ToolError(f"unknown tool {name!r}")

    def score(self, state: Any, row: Any, answer: str) -> float | EpisodeScore:
        """Grade the final answer with the verifier of ``row.task`` (reward in [0, 1])."""
        from kexaone_align.verifiers import Sample, get_verifier

        sample = Sample(row.messages, answer, row.reference, row.task, dict(row.metadata))
        return get_verifier(row.task).verify(sample).reward


# ------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, Callable[[], Environment]] = {}
_LOCK = threading.Lock()


def _register(name: str, factory: Callable[[], Environment], *, overwrite: bool = False) -> None:
    if not isinstance(name, str) or not name:
        raise KexaoneError(f"an environment name must be a non-empty string, got {name!r}")
    with _LOCK:
        old = _REGISTRY.get(name)
        if old is not None and not overwrite and not getattr(old, "entry_point_placeholder", False):
            raise KexaoneError(f"an environment named {name!r} is already registered")
        _REGISTRY[name] = factory


def register_environment(name: str, *, overwrite: bool = False) -> Callable[[Any], Any]:
    """Decorator registering an ``Environment`` class (built with no arguments) or a zero-argument factory."""

    def decorate(obj: Any) -> Any:
        if not callable(obj):
            raise TypeError(f"register_environment({name!r}) expects a class or a factory, got {obj!r}")
        _register(name, obj, overwrite=overwrite)
        return obj

    return decorate


def registered_environments() -> list[str]:
    """Names of built-in, decorated and installed (entry point) environments."""
    from kexaone_align.environments.loading import discover_entry_points

    discover_entry_points()
    with _LOCK:
        return sorted(_REGISTRY)


def get_environment(name: str) -> Environment:
    """Build the environment registered under ``name``."""
    with _LOCK:
        factory = _REGISTRY.get(name)
    if factory is None:
        from kexaone_align.environments.loading import discover_entry_points

        discover_entry_points()
        with _LOCK:
            factory = _REGISTRY.get(name)
    if factory is None:
        known = ", ".join(registered_environments()) or "none"
        raise KexaoneError(f"no tool environment named {name!r} is registered (known: {known})")
    return as_environment(factory(), name)


def as_environment(obj: Any, name: str) -> Environment:
    """Check that ``obj`` (an instance, or a class built with no arguments) is a usable environment."""
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as exc:
            raise KexaoneError(
                f"environment class {name!r} must be constructible with no arguments: {exc}"
            ) from exc
    missing = [m for m in ("tools", "reset", "call", "score") if not callable(getattr(obj, m, None))]
    if missing:
        raise KexaoneError(f"{name!r} is {type(obj).__name__}, not a tool environment: it lacks {missing}")
    if getattr(obj, "isolation", "process") not in ("inline", "process"):
        raise KexaoneError(f"environment {name!r}: isolation must be 'inline' or 'process'")
    if not getattr(obj, "name", None):
        try:
            obj.name = name
        except AttributeError:
            pass
    return obj
