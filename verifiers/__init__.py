"""Verifier plugins: ``Sample`` in, ``VerifyResult`` out. Imported as ``kexaone_align.verifiers``.

Importing this package registers the built-ins: ``math``, ``ifeval`` (alias ``instruction_following``),
``format``, ``choice`` (alias ``stem``) and, once it exists, ``code``. Installed plugins in the entry
point group ``kexaone_align.verifiers`` are found on first lookup.
"""

import logging

from kexaone_align.verifiers import choice, format, ifeval, math  # noqa: F401  (registers built-ins)
from kexaone_align.verifiers.adapters import (
    TRLRewardVerifier,
    VerlScoreVerifier,
    register_trl_reward,
    register_verl_compute_score,
    to_unit_interval,
)
from kexaone_align.verifiers.api import (
    FunctionVerifier,
    Sample,
    Verifier,
    VerifyResult,
    get_verifier,
    register_verifier,
    registered_names,
)
from kexaone_align.verifiers.batch import BatchResult, TaskRouter, TaskStats, score_batch
from kexaone_align.verifiers.loading import (
    ENTRY_POINT_GROUP,
    as_verifier,
    discover_entry_points,
    resolve_verifier,
)

try:  # the code sandbox lives in verifiers/code/ and registers ``code`` itself
    from kexaone_align.verifiers import code  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the other package's state
    logging.getLogger(__name__).debug("code verifier not available: %s", exc)

__all__ = [
    "ENTRY_POINT_GROUP",
    "BatchResult",
    "FunctionVerifier",
    "Sample",
    "TRLRewardVerifier",
    "TaskRouter",
    "TaskStats",
    "Verifier",
    "VerifyResult",
    "VerlScoreVerifier",
    "as_verifier",
    "discover_entry_points",
    "get_verifier",
    "register_trl_reward",
    "register_verifier",
    "register_verl_compute_score",
    "registered_names",
    "resolve_verifier",
    "score_batch",
    "to_unit_interval",
]
