"""Freezing the MoE routers during post-training.

K-EXAONE's RL keeps the router fixed so that expert assignment does not drift between the rollout
engine and the learner. In ExaoneMoe each MoE layer's router is ``model.layers.N.mlp.gate``
(``ExaoneMoeTopkRouter``): a trainable ``weight`` (num_experts x hidden) and ``e_score_correction_bias``,
which is a *buffer*, not a parameter, so no optimizer ever updates it; it is reported, not frozen.
Freeze before building the optimizer (and pass only ``requires_grad`` parameters to DeepSpeed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from kexaone_align.errors import KexaoneError


@dataclass
class RouterFreezeReport:
    """What ``freeze_router`` froze: router parameter names and their total size, plus untouched buffers."""

    parameter_names: list[str] = field(default_factory=list)
    num_parameters: int = 0
    buffer_names: list[str] = field(default_factory=list)
    num_routers: int = 0

    def __str__(self) -> str:
        lines = [
            f"froze {self.num_routers} MoE routers: {len(self.parameter_names)} tensors, "
            f"{self.num_parameters:,} parameters (requires_grad=False)"
        ]
        if self.buffer_names:
            lines.append(
                f"{len(self.buffer_names)} router buffers (e.g. {self.buffer_names[0]}) "
                "are not trainable anyway"
            )
        shown = self.parameter_names[:3]
        more = len(self.parameter_names) - len(shown)
        lines.append("parameters: " + ", ".join(shown) + (f", ... (+{more} more)" if more > 0 else ""))
        return "\n".join(lines)


def _is_router(name: str, module: nn.Module) -> bool:
    return type(module).__name__.endswith("TopkRouter") or name.endswith(".mlp.gate")


def freeze_router(model: nn.Module) -> RouterFreezeReport:
    """Set ``requires_grad=False`` on every MoE router parameter; raise if the model has no router."""
    report = RouterFreezeReport()
    for name, module in model.named_modules():
        if not _is_router(name, module):
            continue
        report.num_routers += 1
        for pname, param in module.named_parameters(prefix=name, recurse=True):
            param.requires_grad_(False)
            report.parameter_names.append(pname)
            report.num_parameters += int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3 partitions
        report.buffer_names.extend(bname for bname, _ in module.named_buffers(prefix=name, recurse=True))
    if report.num_routers == 0:
        raise KexaoneError(
            f"freeze_router: no MoE router found in {type(model).__name__} "
            "(looked for '*.mlp.gate' / *TopkRouter modules); is this a dense model?"
        )
    return report
