"""Finding environments: registered names, installed entry points, ``module:attr``, ``path/file.py:attr``
and data files (``path/to/env.json``, a stateful tool environment described as data).

``resolve_environment`` is the one door a prompt row's ``environment`` goes through.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from kexaone_align.environments.api import (
    Environment,
    _register,
    as_environment,
    get_environment,
)

from kexaone_align.errors import KexaoneError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kexaone_align.environments"
_DISCOVERED = False
_LOCK = threading.RLock()
_CACHE: dict[tuple[str, str], Environment] = {}


def discover_entry_points(*, refresh: bool = False) -> list[str]:
    """Register every installed ``kexaone_align.environments`` entry point lazily (loaded on first use)."""
    global _DISCOVERED
    from kexaone_align.environments.api import _LOCK as REG_LOCK
    from kexaone_align.environments.api import _REGISTRY

    with _LOCK:
        if _DISCOVERED and not refresh:
            return []
        _DISCOVERED = True
        try:
            eps = entry_points(group=ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken dist-info must not break listing
            logger.warning("could not read entry points of group %s: %s", ENTRY_POINT_GROUP, exc)
            return []
        added = []
        for ep in eps:
            with REG_LOCK:
                if ep.name in _REGISTRY:
                    continue

            def factory(ep: Any = ep) -> Environment:
                try:
                    return as_environment(ep.load(), ep.name)
                except KexaoneError:
                    raise
                except Exception as exc:
                    raise KexaoneError(
                        f"environment plugin {ep.name!r} ({ep.value}) failed to load: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc

            factory.entry_point_placeholder = True  # type: ignore[attr-defined]
            _register(ep.name, factory)
            added.append(ep.name)
        return added


def _attr(obj: Any, attr: str, ref: str) -> Any:
    from kexaone_align.verifiers.loading import plugin_attr

    return plugin_attr(obj, attr, ref, "environment")


def _load_file(path: Path, ref: str) -> Any:
    from kexaone_align.verifiers.loading import exec_plugin_file

    return exec_plugin_file(path, ref, "environment")


def resolve_environment(ref: Any, *, base_dir: str | Path | None = None) -> Environment:
    """An environment from a registered name, ``module:attr``, ``path/file.py:attr``, a ``.json`` data
    file, or an object. Built objects are cached per reference, so episodes share one instance."""
    if not isinstance(ref, str):
        return as_environment(ref, getattr(ref, "name", None) or type(ref).__name__)
    ref = ref.strip()
    if not ref:
        raise KexaoneError("empty environment reference")
    key = (ref, str(base_dir))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        env = _resolve(ref, base_dir)
        _CACHE[key] = env
        return env


def _resolve(ref: str, base_dir: str | Path | None) -> Environment:
    def local(text: str) -> Path:
        path = Path(text).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return path.resolve()

    if ref.endswith(".json") and ":" not in ref.rpartition(".json")[2]:
        from kexaone_align.environments.stateful import DataEnvironment

        path = local(ref)
        if not path.is_file():
            raise KexaoneError(f"environment data file {str(path)!r} does not exist")
        return DataEnvironment.from_file(path)
    if ":" not in ref:
        return get_environment(ref)
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise KexaoneError(
            f"environment reference {ref!r} must look like 'module:attr' or 'path/file.py:attr'"
        )
    if target.endswith(".py") or "/" in target:
        path = local(target)
        if not path.is_file():
            raise KexaoneError(f"environment reference {ref!r}: file {str(path)!r} does not exist")
        with _LOCK:
            obj = _attr(_load_file(path, ref), attr, ref)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise KexaoneError(f"environment reference {ref!r}: cannot import {target!r}: {exc}") from exc
        obj = _attr(module, attr, ref)
    return as_environment(obj, attr.rsplit(".", 1)[-1])
