"""Typed recipes: pydantic models of every section, YAML loading with dotted overrides, friendly errors.

Entry points: ``load_recipe(path, overrides)`` -> ``Recipe``; ``explain(Recipe, "agapo.group_size")``;
``recipe_to_yaml(recipe)``; ``load_pipeline_stages(pipeline_recipe)``; ``learner_settings(recipe, steps)``
(keyword arguments for the runtime's LearnerConfig).
"""

from kexaone_align.config.algorithms import (
    AgapoConfig,
    GrouperConfig,
    GrouperRewardConfig,
    JudgeConfig,
    RewardComponent,
    RewardGate,
    SftConfig,
    TaskReward,
)
from kexaone_align.config.derive import learner_settings, schedule_steps
from kexaone_align.config.infra import (
    CheckpointConfig,
    ClusterConfig,
    ColumnsConfig,
    DataConfig,
    GradingConfig,
    LearnersConfig,
    LoggingConfig,
    RolloutConfig,
    WandbConfig,
)
from kexaone_align.config.loading import (
    apply_overrides,
    load_pipeline_stages,
    load_recipe,
    parse_override,
    recipe_to_yaml,
    start_from_checkpoint,
)
from kexaone_align.config.model import ArchitectureConfig, ModelConfig, TokenizerConfig
from kexaone_align.config.recipe import PipelineEntry, Recipe
from kexaone_align.config.schema import FieldHelp, explain
from kexaone_align.config.summary import recipe_summary


def explain_key(path: str) -> FieldHelp:
    """Description, type and default of a recipe key such as 'agapo.group_size'."""
    return explain(Recipe, path)


__all__ = [
    "AgapoConfig",
    "ArchitectureConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "ColumnsConfig",
    "DataConfig",
    "FieldHelp",
    "GradingConfig",
    "GrouperConfig",
    "GrouperRewardConfig",
    "JudgeConfig",
    "LearnersConfig",
    "LoggingConfig",
    "ModelConfig",
    "PipelineEntry",
    "Recipe",
    "RewardComponent",
    "RewardGate",
    "RolloutConfig",
    "SftConfig",
    "TaskReward",
    "TokenizerConfig",
    "WandbConfig",
    "apply_overrides",
    "explain",
    "explain_key",
    "learner_settings",
    "load_pipeline_stages",
    "load_recipe",
    "parse_override",
    "recipe_summary",
    "recipe_to_yaml",
    "schedule_steps",
    "start_from_checkpoint",
]
