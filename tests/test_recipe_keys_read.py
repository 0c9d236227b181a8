"""Every recipe key is read by something that runs: a key that is validated and then ignored is a bug.

The test walks the recipe schema (every leaf under every section) and looks for a read of the key in the
code that runs a stage (everything but the schema itself and ``plan``): the field name accessed as an
attribute or named as a string, in a file that also names the key's section. It is a static check, so it
can be fooled by an unrelated read of the same name in the same file; what it reliably catches is the
common bug, a key that no runtime file mentions at all. Keys only ``plan`` reads are listed below with the
reason, and the test fails if such a key starts being read (the list must stay honest).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from kexaone_align.config.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]

# key -> why only `kexaone-align plan` reads it
PLAN_ONLY = {
    "cluster.gpu_memory_gib": "a memory estimate input: plan warns when its estimate does not fit",
}
# sections consumed whole by one function
WHOLE_SECTIONS = {
    "model.architecture": "passed whole to transformers' ExaoneMoeConfig by ArchitectureConfig.to_hf_kwargs",
}


def recipe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [u for t in candidates for u in typing.get_args(t)]
        sub = next((t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)), None)
        keys += recipe_keys(sub, f"{prefix}{name}.") if sub is not None else [f"{prefix}{name}"]
    return keys


def runtime_sources() -> list[str]:
    files = [*ROOT.joinpath("kexaone_align").rglob("*.py"), *ROOT.joinpath("verifiers").rglob("*.py"),
             *ROOT.joinpath("reward_models").rglob("*.py")]  # fmt: skip
    schema = ROOT / "kexaone_align" / "config"
    keep = [p for p in files if p.parent != schema or p.name == "derive.py"]  # derive.py: runtime settings
    return [p.read_text(encoding="utf-8") for p in keep if p.name != "plan.py"]


def is_read(key: str, sources: list[str]) -> bool:
    *sections, name = key.split(".")
    leaf = re.compile(rf"\.{name}\b|[\"']{name}[\"']")
    head = sections[0] if sections else None
    # the stage's own section is also reached generically as ``recipe.algorithm``
    names = f"{head}|algorithm" if head in ("sft", "agapo", "grouper") else head
    section = re.compile(rf"\b({names})\b") if head else None
    return any(leaf.search(src) and (section is None or section.search(src)) for src in sources)


def test_every_recipe_key_is_read_at_run_time():
    sources = runtime_sources()
    keys = [k for k in recipe_keys() if not any(k.startswith(s + ".") for s in WHOLE_SECTIONS)]
    assert len(keys) > 80, "the walk reaches every section"
    unread = [k for k in keys if k not in PLAN_ONLY and not is_read(k, sources)]
    assert not unread, f"recipe keys that nothing reads at run time: {unread}"
    now_read = [k for k in PLAN_ONLY if is_read(k, sources)]
    assert not now_read, f"listed as plan-only but read at run time (update PLAN_ONLY): {now_read}"


def test_the_check_catches_an_unread_key():
    sources = runtime_sources()
    assert not is_read("rollout.no_such_key", sources)
    assert is_read("rollout.tensor_parallel_size", sources)
