"""The policy model: loading (tiny kit and real K-EXAONE alike), the offline tiny kit, router freezing."""

from kexaone_align.models.loading import (
    ParameterCount,
    count_parameters,
    load_policy,
    load_tokenizer,
    meta_model,
)
from kexaone_align.models.reference import K_EXAONE_236B_ARCHITECTURE, k_exaone_236b_config
from kexaone_align.models.router import RouterFreezeReport, freeze_router
from kexaone_align.models.tiny import TINY_ARCHITECTURE, build_tiny_checkpoint, tiny_config
from kexaone_align.models.tokenizer import CHAT_TEMPLATE, build_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "K_EXAONE_236B_ARCHITECTURE",
    "TINY_ARCHITECTURE",
    "ParameterCount",
    "RouterFreezeReport",
    "build_tiny_checkpoint",
    "build_tokenizer",
    "count_parameters",
    "freeze_router",
    "k_exaone_236b_config",
    "load_policy",
    "load_tokenizer",
    "meta_model",
    "tiny_config",
]
