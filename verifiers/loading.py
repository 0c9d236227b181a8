"""Finding verifiers users bring: installed entry points, ``module:attr`` and ``path/file.py:attr``.

``resolve_verifier`` is the one door a recipe's verifier reference goes through, so every way of
naming a verifier gives the same kind of object and the same kind of error.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from kexaone_align.verifiers.api import (
    FunctionVerifier,
    Verifier,
    _is_registered,
    _register_factory,
    get_verifier,
)

from kexaone_align.errors import KexaoneError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kexaone_align.verifiers"

_DISCOVERED = False
_DISCOVER_LOCK = threading.RLock()
_FILE_LOCK = threading.Lock()


def as_verifier(obj: Any, name: str) -> Verifier:
    """Turn a class (built with no arguments), a verifier instance or a plain function into a Verifier."""
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as exc:
            raise KexaoneError(
                f"verifier class {name!r} must be constructible with no arguments: {exc}"
            ) from exc
    verify = getattr(obj, "verify", None)
    if callable(verify):
        if not getattr(obj, "name", None):
            try:
                obj.name = name
            except AttributeError:
                pass
        return obj
    if callable(obj):
        return FunctionVerifier(name, obj)
    raise KexaoneError(
        f"{name!r} is {type(obj).__name__}, not a verifier: expected a class with verify(sample), "
        "an object with verify(sample), or a function (sample) -> float | VerifyResult"
    )


def _entry_point_factory(ep: EntryPoint) -> Callable[[], Verifier]:
    loaded: list[Any] = []
    lock = threading.Lock()

    def factory() -> Verifier:
        with lock:
            if not loaded:
                try:
                    loaded.append(ep.load())
                except Exception as exc:
                    raise KexaoneError(
                        f"verifier plugin {ep.name!r} ({ep.value}) from entry point group "
                        f"{ENTRY_POINT_GROUP!r} failed to load: {type(exc).__name__}: {exc}"
                    ) from exc
        return as_verifier(loaded[0], ep.name)

    factory.entry_point_placeholder = True  # type: ignore[attr-defined]
    return factory


def discover_entry_points(*, refresh: bool = False) -> list[str]:
    """Register every installed ``kexaone_align.verifiers`` entry point lazily (loaded on first use).

    Names already taken by built-ins or ``@register_verifier`` code win; the clash is logged.
    Returns the names this call registered.
    """
    global _DISCOVERED
    with _DISCOVER_LOCK:
        if _DISCOVERED and not refresh:
            return []
        _DISCOVERED = True
        added = []
        try:
            eps = entry_points(group=ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken dist-info must not break listing
            logger.warning("could not read entry points of group %s: %s", ENTRY_POINT_GROUP, exc)
            return []
        for ep in eps:
            if _is_registered(ep.name):
                logger.debug("verifier entry point %r ignored: the name is already registered", ep.name)
                continue
            _register_factory(ep.name, _entry_point_factory(ep))
            added.append(ep.name)
        return added


def _load_module_attr(module_name: str, attr: str, ref: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KexaoneError(
            f"verifier reference {ref!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    return plugin_attr(module, attr, ref, "verifier")


def plugin_attr(module: Any, attr: str, ref: str, kind: str) -> Any:
    """``module.<attr>`` for a dotted ``attr`` of a plugin reference; ``kind`` names it in the error."""
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise KexaoneError(
                f"{kind} reference {ref!r}: {getattr(module, '__name__', module)!r} has no attribute {attr!r}"
            ) from None
    return obj


def exec_plugin_file(path: Path, ref: str, kind: str) -> Any:
    """Run a user's plugin file once per process (so its ``@register_*`` calls run once) and return the
    module; ``kind`` ("verifier", "environment") names the reference in errors."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"_kexaone_user_{kind}_{path.stem}_{digest}"
    with _FILE_LOCK:
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise KexaoneError(f"{kind} reference {ref!r}: {str(path)!r} is not a Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise KexaoneError(
                    f"{kind} reference {ref!r}: running {str(path)!r} failed: {type(exc).__name__}: {exc}"
                ) from exc
    return module


def _load_file_attr(path_text: str, attr: str, ref: str, base_dir: Path | None) -> Any:
    path = Path(path_text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    path = path.resolve()
    if not path.is_file():
        raise KexaoneError(f"verifier reference {ref!r}: file {str(path)!r} does not exist")
    module = exec_plugin_file(path, ref, "verifier")
    return plugin_attr(module, attr, ref, "verifier")


def resolve_verifier(ref: Any, *, base_dir: str | Path | None = None) -> Verifier:
    """A verifier from a registered name, ``module:attr``, ``path/to/file.py:attr``, or an object.

    Relative file paths are taken from ``base_dir`` (a recipe's folder) when given, else the
    working directory. A bad reference raises ``KexaoneError`` saying what is wrong with it.
    """
    if not isinstance(ref, str):
        return as_verifier(ref, getattr(ref, "name", None) or getattr(ref, "__name__", type(ref).__name__))
    ref = ref.strip()
    if not ref:
        raise KexaoneError("empty verifier reference")
    if ":" not in ref:
        return get_verifier(ref)
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise KexaoneError(f"verifier reference {ref!r} must look like 'module:attr' or 'path/file.py:attr'")
    base = Path(base_dir) if base_dir is not None else None
    if target.endswith(".py") or "/" in target or "\\" in target:
        obj = _load_file_attr(target, attr, ref, base)
    else:
        obj = _load_module_attr(target, attr, ref)
    return as_verifier(obj, attr.rsplit(".", 1)[-1])
