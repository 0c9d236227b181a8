"""Every resource decision for rollout workers, derived from the recipe in one place.

``rollout_plan(recipe)`` is pure: what each rollout worker (one engine) asks Ray for, where its engine's
ranks sit, and the engine settings (tensor parallelism, memory share, context length, MTP, dtype,
batch). ``RolloutPool`` only executes a plan, so a layout can be checked without starting an engine.

Layouts (``cluster.placement``, with ``cluster.gpus_per_node > 0``):

* ``disaggregated``: rollout engines own their GPUs. One placement group holds one bundle per engine,
  ``{"CPU": cpus_per_actor, "GPU": tensor_parallel_size}`` (a bundle never spans nodes, so an engine's
  tensor-parallel ranks share a node), packed onto as few nodes as possible; the engine's actor holds
  all ``tensor_parallel_size`` GPUs and vLLM starts its ranks as local processes.
* ``colocated``: each GPU holds one learner and one engine rank. Engines use the learners' placement
  group: engine ``i`` gets bundles ``i*TP .. i*TP+TP-1``. With TP 1 the actor takes the GPU share the
  learner leaves (``1 - learner_gpu_fraction``); with TP > 1 the actor is a CPU-only driver in its first
  bundle and vLLM's Ray executor places one rank per bundle (``VLLM_RAY_BUNDLE_INDICES``,
  ``VLLM_RAY_PER_WORKER_GPUS``). Engines sleep while the learners train (vLLM sleep mode).
* no GPUs (``gpus_per_node: 0``): plain CPU actors (``hf``, or vLLM's CPU build).

``cluster.simulated_gpus`` declares the GPUs to Ray but runs every actor on CPU: the same placement,
bundles and resource requests as the cluster layout, the CPU engines inside (the CI rehearsal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kexaone_align.errors import KexaoneError

LEARNER_GPU_FRACTION = 0.5  # colocated: the learner's share of its GPU (runtime.cluster.LearnerResources)
Layout = Literal["cpu", "colocated", "disaggregated"]


@dataclass(frozen=True)
class RolloutPlan:
    """What the rollout workers of a stage ask for, and how their engines are configured."""

    backend: str
    num_workers: int
    layout: Layout
    num_cpus: float  # per actor
    num_gpus: float  # per actor (0 for a colocated TP > 1 driver, whose ranks hold the GPUs)
    tensor_parallel_size: int
    bundles: list[dict[str, float]]  # the rollout placement group's bundles ([] = none, or the learners')
    bundle_indices: list[list[int]]  # per worker: the bundles its engine ranks use
    strategy: str | None  # placement-group strategy of ``bundles``
    engine: dict[str, Any] = field(default_factory=dict)  # backend keyword arguments (no model path)
    env: dict[str, str] = field(default_factory=dict)  # the actor's environment additions
    simulated_gpus: bool = False
    sleep_while_training: bool = False  # colocated vLLM: free the GPU memory for the learners' step

    def actor_resources(self, index: int) -> dict[str, Any]:
        """Ray options (without the scheduling strategy) of worker ``index``."""
        if not 0 <= index < self.num_workers:
            raise KexaoneError(f"rollout worker index {index} out of range (0..{self.num_workers - 1})")
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def worker_bundle(self, index: int) -> int | None:
        """The placement-group bundle worker ``index``'s actor is scheduled in (None: no group)."""
        return self.bundle_indices[index][0] if self.bundle_indices else None


def max_model_len(recipe: Any) -> int:
    """Longest sequence an engine must hold: the longest prompt kept plus the longest response."""
    return int(recipe.data.max_prompt_tokens) + int(recipe.rollout.max_new_tokens)


def rollout_plan(recipe: Any) -> RolloutPlan:
    """The rollout workers the recipe describes (pure: no Ray, no engine)."""
    roll, cluster = recipe.rollout, recipe.cluster
    tp = roll.tensor_parallel_size
    gpus = cluster.gpus_per_node > 0
    simulated = bool(gpus and cluster.simulated_gpus)
    on_cpu = not gpus or simulated
    if roll.backend == "hf" and tp != 1:
        raise KexaoneError("rollout.tensor_parallel_size > 1 needs rollout.backend: vllm (hf has no TP)")
    engine = _engine_settings(recipe, on_cpu=on_cpu)
    env: dict[str, str] = {}
    if not gpus:
        return RolloutPlan(roll.backend, roll.num_workers, "cpu", cluster.cpus_per_actor, 0.0, tp, [], [],
                           None, engine, env)  # fmt: skip
    if tp > cluster.gpus_per_node:
        raise KexaoneError(
            f"rollout.tensor_parallel_size {tp} exceeds cluster.gpus_per_node {cluster.gpus_per_node}: "
            "an engine's tensor-parallel ranks must share a node"
        )
    cpus = cluster.cpus_per_actor
    if cluster.placement == "disaggregated":
        bundles = [{"CPU": cpus, "GPU": float(tp)} for _ in range(roll.num_workers)]
        indices = [[i] for i in range(roll.num_workers)]
        return RolloutPlan(roll.backend, roll.num_workers, "disaggregated", cpus, float(tp), tp, bundles,
                           indices, "PACK", engine, env, simulated)  # fmt: skip
    learners = recipe.learners.num_learners
    if roll.num_workers * tp > learners:
        raise KexaoneError(
            f"colocated layout: {roll.num_workers} rollout engine(s) x tensor_parallel_size {tp} need "
            f"{roll.num_workers * tp} GPUs, but only the {learners} learners' GPUs are shared; lower "
            "rollout.num_workers or use cluster.placement: disaggregated"
        )
    if roll.max_staleness > 0 and roll.backend == "vllm" and not simulated:
        raise KexaoneError(
            "colocated vLLM engines sleep while the learners train, so rollouts cannot overlap training: "
            "set rollout.max_staleness: 0 or cluster.placement: disaggregated"
        )
    share = 1.0 - LEARNER_GPU_FRACTION
    indices = [list(range(i * tp, (i + 1) * tp)) for i in range(roll.num_workers)]
    if tp == 1:
        actor_gpus = share
    else:
        actor_gpus = 0.0
        engine["distributed_executor_backend"] = "ray"
        env["VLLM_RAY_PER_WORKER_GPUS"] = f"{share:g}"
    sleep = roll.backend == "vllm" and not simulated  # vLLM's CPU build has no sleep mode
    if sleep:
        engine["enable_sleep_mode"] = True
    return RolloutPlan(roll.backend, roll.num_workers, "colocated", cpus, actor_gpus, tp, [], indices,
                       None, engine, env, simulated, sleep)  # fmt: skip


def worker_env(plan: RolloutPlan, index: int) -> dict[str, str]:
    """Environment of worker ``index``'s actor (its engine ranks' bundles for vLLM's Ray executor)."""
    env = dict(plan.env)
    if plan.layout == "colocated" and plan.tensor_parallel_size > 1:
        env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(b) for b in plan.bundle_indices[index])
    return env


def _engine_settings(recipe: Any, *, on_cpu: bool) -> dict[str, Any]:
    """Backend keyword arguments from the recipe's rollout, model and data sections."""
    roll = recipe.rollout
    dtype = recipe.model.dtype if recipe.model is not None else "float32"
    if roll.backend == "hf":
        return {"dtype": dtype, "max_batch_size": roll.batch_size, "device": "cpu" if on_cpu else "cuda"}
    if on_cpu and dtype == "bfloat16":
        dtype = "float32"  # issue 11 measured bf16 at 11-13 tokens/s on AVX2, float32 ~400
    return {
        "dtype": dtype,
        "tensor_parallel_size": roll.tensor_parallel_size,
        "gpu_memory_utilization": roll.gpu_memory_utilization,
        "max_model_len": max_model_len(recipe),
        "max_num_seqs": roll.batch_size,
        "enable_mtp": roll.mtp_speculative,
        "num_speculative_tokens": roll.mtp_num_speculative_tokens,
        "enforce_eager": roll.enforce_eager,
        "cpu_kvcache_gib": roll.cpu_kvcache_gib,
        "seed": recipe.seed,
        "logprobs_mode": _logprobs_mode(recipe),
    }


def _logprobs_mode(recipe: Any) -> str:
    """vLLM's ``logprobs_mode`` for AGAPO's ``ratio_distribution`` (no other stage reads log-probs)."""
    from kexaone_align.runtime.rollout.vllm import engine_logprobs_mode

    roll, agapo = recipe.rollout, getattr(recipe, "agapo", None)
    if recipe.stage != "agapo" or agapo is None:
        return "processed_logprobs"
    return engine_logprobs_mode(agapo.ratio_distribution, roll.temperature, roll.top_p, roll.top_k)


def actor_options(plan: RolloutPlan, index: int, group: Any = None) -> dict[str, Any]:
    """Complete Ray actor options of worker ``index``: resources, environment, and its bundle in ``group``
    (the learners' group when colocated, the engines' own when disaggregated; None on CPU)."""
    options: dict[str, Any] = dict(plan.actor_resources(index))
    env = worker_env(plan, index)
    if env:
        options["runtime_env"] = {"env_vars": env}
    bundle = plan.worker_bundle(index)
    if group is not None and bundle is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group,
            placement_group_bundle_index=bundle,
            placement_group_capture_child_tasks=True,  # vLLM's Ray executor places its ranks here
        )
    return options


def create_rollout_group(plan: RolloutPlan, timeout_s: float = 600.0) -> Any:
    """The engines' own placement group (disaggregated), ready; a clear error if Ray cannot place it."""
    from kexaone_align.runtime.cluster import ready_placement_group

    if not plan.bundles:
        raise KexaoneError(f"a {plan.layout} rollout plan has no placement group of its own")
    what = f"{plan.num_workers} rollout engine(s)"
    return ready_placement_group([dict(b) for b in plan.bundles], plan.strategy or "PACK", timeout_s, what)
