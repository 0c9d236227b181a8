"""The loss registry: which objective a stage's learners minimise, chosen by name in the recipe.

``agapo.loss``, ``grouper.loss`` and ``sft.loss`` name an objective the way verifiers are named: a
registered name (built-ins ``agapo``, ``grouper``, ``sft``, anything decorated with ``@register_loss``,
installed ``kexaone_align.losses`` entry points), ``module:attr`` or ``path/to/file.py:attr``. An objective
is a function ``(token_logprobs [n, t], micro_batch, **options) -> (loss, metrics)`` (or just ``loss``);
``algorithms.objectives`` says what a micro-batch holds and how micro-batch losses combine.

``bind_loss`` checks the reference and its options in the driver, before any actor starts, and returns a
``BoundLoss``: a small picklable callable that the learner actors resolve again by reference, so a user's
plugin file never has to be importable under a module name.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from kexaone_align.algorithms import objectives
from kexaone_align.errors import KexaoneError

logger = logging.getLogger(__name__)

Aggregation = Literal["tokens", "sequences"]
ENTRY_POINT_GROUP = "kexaone_align.losses"
AGGREGATIONS = ("tokens", "sequences")

_LOCK = threading.RLock()
_REGISTRY: dict[str, tuple[Callable[..., Any], Aggregation]] = {}


def register_loss(
    name: str, *, aggregation: Aggregation = "sequences", overwrite: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register an objective under ``name``; ``aggregation`` says how micro-batches combine
    (``sequences`` for a mean over responses, ``tokens`` for a mean over supervised tokens)."""
    if aggregation not in AGGREGATIONS:
        raise KexaoneError(f"loss {name!r}: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise KexaoneError(f"register_loss({name!r}) expects a function, got {type(fn).__name__}")
        with _LOCK:
            if name in _REGISTRY and not overwrite and _REGISTRY[name][0] is not fn:
                raise KexaoneError(f"loss {name!r} is already registered (pass overwrite=True to replace it)")
            _REGISTRY[name] = (fn, aggregation)
        fn.loss_aggregation = aggregation  # type: ignore[attr-defined]
        return fn

    return decorate


register_loss("agapo", aggregation="sequences")(objectives.agapo_objective)
register_loss("grouper", aggregation="sequences")(objectives.grouper_objective)
register_loss("sft", aggregation="tokens")(objectives.sft_objective)


def registered_losses() -> list[str]:
    """Built-in, decorated and installed (entry point) loss names."""
    names = set(_entry_points())
    with _LOCK:
        names.update(_REGISTRY)
    return sorted(names)


def _entry_points() -> dict[str, Any]:
    try:
        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception as exc:  # a broken dist-info must not break a run that names a built-in
        logger.warning("could not read entry points of group %s: %s", ENTRY_POINT_GROUP, exc)
        return {}


def _attr(obj: Any, attr: str, ref: str) -> Any:
    from kexaone_align.verifiers.loading import plugin_attr

    return plugin_attr(obj, attr, ref, "loss")


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target


def _file_path(target: str, base_dir: str | None) -> Path:
    path = Path(target).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path.resolve()


def _load(ref: str, base_dir: str | None) -> Callable[..., Any]:
    """The function a reference names (see the module docstring)."""
    with _LOCK:
        if ref in _REGISTRY:
            return _REGISTRY[ref][0]
    if ":" not in ref:
        ep = _entry_points().get(ref)
        if ep is None:
            raise KexaoneError(
                f"unknown loss {ref!r}: registered losses are {registered_losses()}; "
                "or name one as 'module:attr' or 'path/to/file.py:attr'"
            )
        try:
            return ep.load()
        except Exception as exc:
            raise KexaoneError(
                f"loss plugin {ref!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise KexaoneError(f"loss reference {ref!r} must look like 'module:attr' or 'path/to/file.py:attr'")
    if _is_file_target(target):
        from kexaone_align.verifiers.loading import exec_plugin_file

        path = _file_path(target, base_dir)
        if not path.is_file():
            raise KexaoneError(f"loss reference {ref!r}: file {str(path)!r} does not exist")
        return _attr(exec_plugin_file(path, ref, "loss"), attr, ref)
    try:
        module = importlib.import_module(target)
    except ImportError as exc:
        raise KexaoneError(f"loss reference {ref!r}: cannot import {target!r}: {exc}") from exc
    return _attr(module, attr, ref)


def _resolve(ref: str, base_dir: str | None, origin: str | None) -> Callable[..., Any]:
    try:
        return _load(ref, base_dir)
    except KexaoneError:
        if origin is None:
            raise
    # A name registered by a decorator in the driver's code: importing that module here registers it too.
    importlib.import_module(origin)
    return _load(ref, base_dir)


@dataclass
class BoundLoss:
    """An objective with its options, as the learners call it: ``(token_logprobs, micro_batch) ->
    (loss, metrics)``. Pickles as its reference, resolved again in the process that calls it."""

    ref: str
    options: dict[str, Any] = field(default_factory=dict)
    aggregation: Aggregation = "sequences"
    base_dir: str | None = None
    origin: str | None = None  # the module whose import registers ``ref`` (a decorated name)
    _fn: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_fn"} | {"_fn": None}

    def __call__(self, logprobs: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if self._fn is None:
            self._fn = _resolve(self.ref, self.base_dir, self.origin)
        out = self._fn(logprobs, batch, **self.options)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise KexaoneError(
                f"loss {self.ref!r} must return a scalar tensor (or (loss, metrics)), got "
                f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}"
            )
        if not isinstance(metrics, Mapping):
            raise KexaoneError(f"loss {self.ref!r}: metrics must be a dict, got {type(metrics).__name__}")
        return loss.reshape(()), {str(k): float(v) for k, v in metrics.items()}


def bind_loss(
    ref: str,
    *,
    section: str,
    options: Mapping[str, Any] | None = None,
    stage_params: Mapping[str, Any] | None = None,
    default_aggregation: Aggregation = "sequences",
    base_dir: str | Path | None = None,
) -> BoundLoss:
    """Resolve ``ref`` now and check its options against its signature; errors name ``section``.

    ``stage_params`` are values the stage owns (AGAPO's ``is_cap``): passed to an objective that takes a
    parameter of that name, never settable through ``<section>.loss_options``.
    """
    base = str(base_dir) if base_dir is not None else None
    fn = _load(ref, base)
    options, stage_params = dict(options or {}), dict(stage_params or {})
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise KexaoneError(f"{section}.loss {ref!r}: cannot read its signature: {exc}") from exc
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise KexaoneError(
            f"{section}.loss {ref!r} must take (token_logprobs, micro_batch, **options); "
            f"its signature is {sig}"
        )
    named = {p.name: p for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    owned = sorted(set(options) & set(stage_params))
    if owned:
        raise KexaoneError(
            f"{section}.loss_options sets {owned}, which the stage passes itself: set {section}.{owned[0]}"
        )
    unknown = sorted(k for k in options if k not in named)
    if unknown and not takes_var_kw:
        raise KexaoneError(
            f"{section}.loss_options: loss {ref!r} takes no option {unknown[0]!r} "
            f"(its options: {sorted(named) or 'none'})"
        )
    merged = {k: v for k, v in stage_params.items() if k in named} | options
    missing = sorted(n for n, p in named.items() if p.default is p.empty and n not in merged)
    if missing:
        raise KexaoneError(f"{section}.loss {ref!r} needs {missing} in {section}.loss_options")
    aggregation = getattr(fn, "loss_aggregation", None) or default_aggregation
    if aggregation not in AGGREGATIONS:
        raise KexaoneError(
            f"{section}.loss {ref!r}: loss_aggregation must be one of {AGGREGATIONS}, got {aggregation!r}"
        )
    target, _, attr = ref.rpartition(":")
    if target and _is_file_target(target):  # absolute, so an actor with another working directory finds it
        ref = f"{_file_path(target, base)}:{attr}"
    module = getattr(fn, "__module__", None)
    origin = module if module and module != "__main__" and not module.startswith("_kexaone_user_") else None
    return BoundLoss(ref, merged, aggregation, base, origin, fn)


def stage_loss(recipe: Any, section: str, stage_params: Mapping[str, Any] | None = None) -> BoundLoss:
    """The objective ``recipe.<section>`` names (``loss``, ``loss_options``). A loaded recipe file has its
    relative loss file made absolute against the recipe's folder, as verifier files are."""
    cfg = getattr(recipe, section)
    default = "tokens" if section == "sft" else "sequences"
    return bind_loss(
        cfg.loss, section=section, options=cfg.loss_options, stage_params=stage_params,
        default_aggregation=default,
    )  # fmt: skip
