"""Ray cluster start-up and the learner group: N learner actors placed by a placement group.

Placement:
- ``"colocated"``: each learner's bundle is meant to be shared with a rollout worker on the same
  GPU (the learner takes ``gpu_fraction`` of it); ``LearnerGroup.placement_group`` is exposed so the
  rollout side can schedule into the same bundles. Bundles are packed onto as few nodes as possible.
- ``"disaggregated"``: learners own whole GPUs in their own placement group; rollout workers live
  elsewhere. Bundles are spread over nodes when possible.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.batching import select_rows, trim_columns
from kexaone_align.runtime.learner import LearnerConfig, LossFn, learner_actor_class
from kexaone_align.runtime.metric_reduce import combine
from kexaone_align.runtime.packed_micro import DEFAULT_COST_WIDTH, shard_rows_keeping_prefixes

PLACEMENTS = ("colocated", "disaggregated")


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Connect to a Ray cluster (``address``) or start a quiet local one (``None``); no-op if connected."""
    import ray

    if ray.is_initialized():
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": True}
    options["logging_level"] = "warning"
    options.update(kwargs)
    if address is None:
        ray.init(**options)
    else:
        options.pop("num_cpus", None)
        options.pop("num_gpus", None)
        ray.init(address=address, **options)


@dataclass
class LearnerResources:
    """What each learner asks Ray for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0  # per bundle; 0 on CPU machines
    gpu_fraction: float = 0.5  # colocated only: the learner's share of its bundle's GPU
    strategy: str | None = None  # override the placement-group strategy (PACK, SPREAD, STRICT_*)
    bundle_cpus: float | None = None  # CPUs of each bundle (colocated: room for a rollout actor too)
    simulated_gpus: bool = False  # GPUs declared to Ray, actors run on CPU (a rehearsal)


def _actor_env(config: LearnerConfig, num_gpus: float, simulated: bool = False) -> dict[str, Any]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if num_gpus == 0 or simulated:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return {"env_vars": env}


class LearnerGroup:
    """The N learner actors of one policy; methods fan out to all ranks and gather the results."""

    def __init__(
        self, actors: list[Any], placement_group: Any, config: LearnerConfig, nodes: list[dict]
    ) -> None:
        self.actors = actors
        self.placement_group = placement_group
        self.config = config
        self.nodes = nodes  # node_info() of each rank: node_id, ip, ...
        self.attention_cost_width = DEFAULT_COST_WIDTH  # the model's, once the learners are set up
        self.threads: list[int] = []  # each rank's torch threads, once set up (learners.threads)

    @property
    def num_learners(self) -> int:
        return len(self.actors)

    def _all(self, method: str, *args: Any) -> list[Any]:
        import ray

        return ray.get([getattr(actor, method).remote(*args) for actor in self.actors])

    def train_step(self, batch: dict[str, Tensor], loss_fn: LossFn) -> dict[str, float]:
        """Split ``batch`` by rank, take one optimizer step on every learner, combine the metrics."""
        import ray

        shards = self._shards(batch)
        results = ray.get([a.train_step.remote(s, loss_fn) for a, s in zip(self.actors, shards, strict=True)])
        first = results[0]
        out = {k: first[k] for k in ("loss", "grad_norm", "lr") if k in first}
        if "aux_loss" in first:
            out["aux_loss"] = first["aux_loss"]
        tokens = sum(r["learner_tokens"] for r in results)
        if all("computed_tokens" in r for r in results):  # padding included: what the ranks ran
            out["computed_tokens"] = sum(r["computed_tokens"] for r in results)
        slowest = max(r["step_time_s"] for r in results)
        out.update(
            learner_tokens=tokens,
            tokens_per_s=tokens / slowest if slowest > 0 else 0.0,
            step_time_s=slowest,
            micro_batches=max(r["micro_batches"] for r in results),
        )
        # loss_fn metrics, by name (runtime.metric_reduce): *_max / *_min are true extremes over all ranks
        out.update(
            combine(
                ({k: v for k, v in r.items() if k.startswith("loss/")}, r["loss_weight"]) for r in results
            )
        )
        return out

    def advance_lr_schedule(self) -> float:
        """Every rank's LR schedule one step on, without an optimizer step (see ``Learner``)."""
        return self._all("advance_lr_schedule")[0]

    def forward_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-token log-probs ``[N, T]`` of the whole batch, computed data-parallel."""
        import ray
        import torch

        plan = self._shard_plan(batch)
        shards = [select_rows(batch, rows) for rows in plan]
        parts = ray.get([a.forward_logprobs.remote(s) for a, s in zip(self.actors, shards, strict=True)])
        out = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        for rows, part in zip(plan, parts, strict=True):
            out[torch.as_tensor(rows, dtype=torch.long)] = part
        return out

    def _shards(self, batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """Each rank's rows (token-balanced with ``balance_ranks``), cut to the columns they use."""
        plan = self._shard_plan(batch)
        return [trim_columns(select_rows(batch, rows)) for rows in plan]

    def _shard_plan(self, batch: dict[str, Tensor]) -> list[list[int]]:
        cfg = self.config
        return shard_rows_keeping_prefixes(
            batch, self.num_learners, balance=cfg.balance_ranks, budget=cfg.micro_batch_tokens,
            share_prefixes=cfg.sequence_packing and cfg.share_prefixes, cost_width=self.attention_cost_width,
        )  # fmt: skip

    def state_dict_stream(self, bucket_bytes: int = 1 << 28) -> Iterator[list[tuple[str, Tensor]]]:
        """Full parameters bucket by bucket from rank 0; under ZeRO-3 the other ranks join each gather in
        one ``join_state_dict_gathers`` call and send nothing back."""
        import ray

        count = ray.get(self.actors[0].state_dict_num_buckets.remote(bucket_bytes))
        others = [a.join_state_dict_gathers.remote(bucket_bytes) for a in self.actors[1:]]
        index = -1
        try:
            for index in range(count):
                yield ray.get(self.actors[0].state_dict_bucket.remote(index, bucket_bytes))
        except GeneratorExit:  # the caller stopped early: rank 0 still has to meet the others' gathers
            ray.get(self.actors[0].join_state_dict_gathers.remote(bucket_bytes, index + 1))
            ray.get(others)
            raise
        ray.get(others)

    def save(self, directory: str | Path) -> str:
        """DeepSpeed checkpoint of every rank into one (shared) directory."""
        self._all("save", str(directory))
        return str(directory)

    def load(self, directory: str | Path) -> int:
        """Restore ``save``'s checkpoint on every rank; returns the learner step count."""
        return self._all("load", str(directory))[0]

    def export_hf(
        self,
        directory: str | Path,
        tokenizer_path: str | Path | None = None,
        max_shard_bytes: int = 5 * 10**9,
    ) -> str:
        """Hugging Face export of the full policy, streamed shard by shard (written by rank 0)."""
        tok = None if tokenizer_path is None else str(tokenizer_path)
        return self._all("export_hf", str(directory), tok, max_shard_bytes)[0]

    def shutdown(self) -> None:
        """Kill the actors and free the placement group."""
        import ray
        from ray.util import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def ready_placement_group(bundles: list[dict[str, float]], strategy: str, timeout_s: float, what: str) -> Any:
    """A placement group of ``bundles``, ready; if Ray cannot place it within ``timeout_s`` it is removed
    and the error names ``what`` was being placed (Ray itself would wait forever)."""
    import ray
    from ray.util import placement_group, remove_placement_group

    group = placement_group(bundles, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except Exception as exc:
        remove_placement_group(group)
        raise KexaoneError(
            f"could not place {what} with {bundles[0]} each ({strategy}) within {timeout_s:g}s: {exc}"
        ) from exc
    return group


def create_learner_group(
    num_learners: int,
    model_path: str | Path,
    config: LearnerConfig,
    placement: str = "disaggregated",
    resources: LearnerResources | None = None,
    *,
    ready_timeout_s: float = 600.0,
) -> LearnerGroup:
    """Place ``num_learners`` learner actors, join them into one process group, build their engines."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if num_learners < 1:
        raise KexaoneError(f"num_learners must be >= 1, got {num_learners}")
    if placement not in PLACEMENTS:
        raise KexaoneError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    config.validate()
    res = resources or LearnerResources()
    if not ray.is_initialized():
        raise KexaoneError("Ray is not initialised; call kexaone_align.runtime.cluster.init_ray() first")
    bundle: dict[str, float] = {"CPU": res.bundle_cpus or res.num_cpus}
    if res.num_gpus > 0:
        bundle["GPU"] = res.num_gpus
    strategy = res.strategy or ("PACK" if placement == "colocated" else "SPREAD")
    pg = ready_placement_group(
        [dict(bundle) for _ in range(num_learners)], strategy, ready_timeout_s, f"{num_learners} learners"
    )
    actor_cpus = res.num_cpus
    actor_gpus = res.num_gpus * (res.gpu_fraction if placement == "colocated" else 1.0)
    cls = learner_actor_class()
    actors = [
        cls.options(
            num_cpus=actor_cpus,
            num_gpus=actor_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank
            ),
            runtime_env=_actor_env(config, res.num_gpus, res.simulated_gpus),
        ).remote(str(model_path), config)
        for rank in range(num_learners)
    ]
    nodes = ray.get([a.node_info.remote() for a in actors])
    master = nodes[0]
    try:
        summaries = ray.get(
            [
                a.setup.remote(rank, num_learners, master["ip"], master["port"])
                for rank, a in enumerate(actors)
            ]
        )
    except Exception:
        for actor in actors:
            ray.kill(actor)
        from ray.util import remove_placement_group

        remove_placement_group(pg)
        raise
    group = LearnerGroup(actors, pg, config, nodes)
    group.attention_cost_width = int(summaries[0].get("attention_cost_width", DEFAULT_COST_WIDTH))
    group.threads = [int(s["threads"]) for s in summaries]
    return group
