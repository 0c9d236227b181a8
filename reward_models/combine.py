"""Per-task combination of rule-based and rubric (judge) rewards, with gates.

For a sample of task ``t`` with spec ``CombinationSpec(components=[(c_i, w_i)], gates=[(g_j, th_j)])``:

    reward = gate * sum_i(w_i * r_i) / sum_i(w_i),   gate = 1 if every r_gj >= th_j else 0

Weights are non-negative and renormalised, so the reward stays in [0, 1]. Gates run first and a closed gate
skips the components (no judge call is spent on a response that failed its format check). Components and
gates are verifier names (``get_verifier``), names given in ``judges=``, or objects with
``verify(sample)``; objects with ``score_batch`` (a ``RubricJudge``) are called once per batch. A verifier
that raises counts as reward 0 with the error in ``details`` so one bad sample cannot stop a step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kexaone_align.verifiers.api import Sample, Verifier, VerifyResult, get_verifier

from kexaone_align.errors import KexaoneError

Ref = Any  # a verifier name or an object with verify(sample)


@dataclass(frozen=True)
class CombinationSpec:
    """Weighted components and threshold gates for one task."""

    components: Sequence[tuple[Ref, float]]
    gates: Sequence[tuple[Ref, float]] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.components:
            raise KexaoneError("a reward combination needs at least one component")
        for ref, weight in self.components:
            if not isinstance(weight, int | float) or weight < 0:
                raise KexaoneError(
                    f"reward component {_name(ref)!r}: weight must be a number >= 0, got {weight!r}"
                )
        if sum(w for _, w in self.components) <= 0:
            raise KexaoneError("reward component weights must not all be zero")
        for ref, threshold in self.gates:
            if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
                raise KexaoneError(
                    f"reward gate {_name(ref)!r}: threshold must be in [0, 1], got {threshold!r}"
                )


def _name(ref: Ref) -> str:
    return ref if isinstance(ref, str) else str(getattr(ref, "name", type(ref).__name__))


class RewardCombiner:
    """Turns ``{task: CombinationSpec}`` into one reward per sample; also a ``Verifier`` itself."""

    name = "combined"

    def __init__(
        self,
        per_task: Mapping[str, CombinationSpec],
        *,
        default: CombinationSpec | None = None,
        judges: Mapping[str, Verifier] | None = None,
    ) -> None:
        if not per_task and default is None:
            raise KexaoneError("RewardCombiner needs at least one task spec or a default")
        self.per_task = dict(per_task)
        self.default = default
        self._judges = dict(judges or {})
        self._resolved: dict[str, Verifier] = {}
        for spec in [*self.per_task.values(), *([default] if default else [])]:
            for ref, _ in [*spec.components, *spec.gates]:
                self._resolve(ref)  # unknown names fail now, not mid-training

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, judges: Mapping[str, Verifier] | None = None
    ) -> RewardCombiner:
        """Build from ``{task: {components: [{name, weight}], gates: [{name, threshold}]}}``.

        A task named ``default`` applies to tasks not listed.
        """
        specs: dict[str, CombinationSpec] = {}
        for task, raw in config.items():
            if not isinstance(raw, Mapping) or "components" not in raw:
                raise KexaoneError(
                    f"reward combination for task {task!r} must be a mapping with 'components'"
                )
            try:
                components = [(c["name"], float(c.get("weight", 1.0))) for c in raw["components"]]
                gates = [(g["name"], float(g.get("threshold", 1.0))) for g in raw.get("gates") or []]
            except (KeyError, TypeError, ValueError) as exc:
                raise KexaoneError(
                    f"reward combination for task {task!r}: bad component or gate ({exc})"
                ) from None
            specs[str(task)] = CombinationSpec(components, gates)
        default = specs.pop("default", None)
        return cls(specs, default=default, judges=judges)

    # -- public -----------------------------------------------------------------------------------------
    def spec_for(self, task: str) -> CombinationSpec:
        spec = self.per_task.get(task, self.default)
        if spec is None:
            raise KexaoneError(
                f"no reward combination for task {task!r} (configured: {', '.join(sorted(self.per_task))})"
            )
        return spec

    def score(self, sample: Sample) -> VerifyResult:
        return self.score_batch([sample])[0]

    def verify(self, sample: Sample) -> VerifyResult:
        return self.score(sample)

    def score_batch(self, samples: Sequence[Sample]) -> list[VerifyResult]:
        """One combined reward per sample; each (component, sample) pair is evaluated at most once."""
        specs = [self.spec_for(s.task) for s in samples]
        cache: dict[tuple[str, int], VerifyResult] = {}
        gate_refs = {_name(r): r for spec in specs for r, _ in spec.gates}
        for key, ref in gate_refs.items():
            idx = [i for i, spec in enumerate(specs) if any(_name(r) == key for r, _ in spec.gates)]
            self._run(key, ref, samples, idx, cache)
        open_ = [
            all(cache[(_name(r), i)].reward >= th for r, th in spec.gates) for i, spec in enumerate(specs)
        ]
        comp_refs = {_name(r): r for spec in specs for r, _ in spec.components}
        for key, ref in comp_refs.items():
            idx = [
                i
                for i, spec in enumerate(specs)
                if open_[i] and (key, i) not in cache and any(_name(r) == key for r, _ in spec.components)
            ]
            self._run(key, ref, samples, idx, cache)
        return [self._assemble(i, spec, open_[i], cache) for i, spec in enumerate(specs)]

    # -- internals --------------------------------------------------------------------------------------
    def _resolve(self, ref: Ref) -> Verifier:
        key = _name(ref)
        if key not in self._resolved:
            if not isinstance(ref, str):
                if not callable(getattr(ref, "verify", None)):
                    raise KexaoneError(f"reward component {ref!r} has no verify(sample) method")
                self._resolved[key] = ref
            elif ref in self._judges:
                self._resolved[key] = self._judges[ref]
            else:
                self._resolved[key] = get_verifier(ref)
        return self._resolved[key]

    def _run(
        self,
        key: str,
        ref: Ref,
        samples: Sequence[Sample],
        idx: list[int],
        cache: dict[tuple[str, int], VerifyResult],
    ) -> None:
        if not idx:
            return
        verifier = self._resolve(ref)
        batch_fn = getattr(verifier, "score_batch", None)
        if callable(batch_fn) and len(idx) > 1:
            try:
                results = batch_fn([samples[i] for i in idx])
                for i, res in zip(idx, results, strict=True):
                    cache[(key, i)] = res
                return
            except Exception:
                pass  # fall through to one-by-one so a single bad sample is isolated
        for i in idx:
            try:
                cache[(key, i)] = verifier.verify(samples[i])
            except Exception as exc:
                cache[(key, i)] = VerifyResult(0.0, {"error": f"{type(exc).__name__}: {exc}"})

    def _assemble(
        self, i: int, spec: CombinationSpec, gate_open: bool, cache: dict[tuple[str, int], VerifyResult]
    ) -> VerifyResult:
        gates = {}
        for ref, threshold in spec.gates:
            res = cache[(_name(ref), i)]
            gates[_name(ref)] = {
                "reward": res.reward,
                "threshold": threshold,
                "passed": res.reward >= threshold,
                "details": res.details,
            }
        components = {}
        total_w = sum(w for _, w in spec.components)
        weighted = 0.0
        for ref, weight in spec.components:
            res = cache.get((_name(ref), i))
            if res is None:
                components[_name(ref)] = {"reward": None, "weight": weight, "skipped": "gate closed"}
                continue
            weighted += weight * res.reward
            components[_name(ref)] = {"reward": res.reward, "weight": weight, "details": res.details}
        reward = min(1.0, max(0.0, weighted / total_w)) if gate_open else 0.0
        return VerifyResult(reward, {"components": components, "gates": gates, "gated": not gate_open})
