"""Reward models: rubric LLM judges, judge backends, reward combination and a scalar classifier RM.

Imported as ``kexaone_align.reward_models``. Nothing here imports Ray or loads a model at import time.
"""

from kexaone_align.reward_models.backends import (
    BackendError,
    JudgeBackend,
    OpenAICompatibleBackend,
    RayJudgeBackend,
    TransformersJudgeBackend,
)
from kexaone_align.reward_models.classifier import SequenceClassifierRM
from kexaone_align.reward_models.combine import CombinationSpec, RewardCombiner
from kexaone_align.reward_models.judge import JudgeStats, JudgeTimeout, RubricJudge
from kexaone_align.reward_models.parsing import ParsedScores, ParseFailure, parse_scores
from kexaone_align.reward_models.rubric import (
    BUILTIN_RUBRICS,
    Rubric,
    RubricDimension,
    load_rubric,
    rubric_from_dict,
)

__all__ = [
    "BUILTIN_RUBRICS",
    "BackendError",
    "CombinationSpec",
    "JudgeBackend",
    "JudgeStats",
    "JudgeTimeout",
    "OpenAICompatibleBackend",
    "ParseFailure",
    "ParsedScores",
    "RayJudgeBackend",
    "RewardCombiner",
    "Rubric",
    "RubricDimension",
    "RubricJudge",
    "SequenceClassifierRM",
    "TransformersJudgeBackend",
    "load_rubric",
    "parse_scores",
    "rubric_from_dict",
]
