"""Sections describing where and how a stage runs: data, rollout, learners, cluster, checkpoints, logs."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from kexaone_align.config.base import Section


class ColumnsConfig(Section):
    """How rows of a dataset in another shape become prompts (RL stages) or conversations (SFT)."""

    preset: Literal["none", "gsm8k", "math", "chat"] = Field(
        "none",
        description="Column layout of a common shape; keys set below win. 'gsm8k': prompt 'question', "
        "reference and SFT response 'answer', extractor 'gsm8k' (the text after '####'), task 'math'. "
        "'math': prompt 'problem', reference and response 'solution', extractor 'boxed' (the last "
        "\\boxed{...}), task 'math'. 'chat': a 'messages' column. 'none' with no column named: rows are "
        "in the toolkit's own format (messages + task + reference; messages for SFT).",
    )
    prompt: str | None = Field(
        None,
        description="Column with the question: text becomes one user turn (through prompt_template), a "
        "list of chat messages is used as is.",
    )
    messages: str | None = Field(
        None,
        description="Column with a chat (list of {role, content}). SFT trains on it; a prompt is the turns "
        "before its final assistant turn (see chat_prompt), whose content is the reference unless "
        "'reference' names a column.",
    )
    response: str | None = Field(None, description="SFT: column with the answer text paired with 'prompt'.")
    reference: str | None = Field(
        None, description="RL stages: column with the answer graded against (through reference_extractor)."
    )
    reference_extractor: Literal["raw", "gsm8k", "boxed"] | None = Field(
        None,
        description="Turns the reference column into what the verifier grades against: 'raw' (as given), "
        "'gsm8k' (after the last '####', thousands commas dropped), 'boxed' (content of the last "
        "\\boxed{...}, nested braces kept). null = the preset's, else 'raw'. A row it cannot read is an "
        "error.",
    )
    task: str | None = Field(
        None, description="RL stages: the verifier task of every row (e.g. 'math') unless task_column is set."
    )
    task_column: str | None = Field(None, description="RL stages: column naming each row's verifier task.")
    id: str | None = Field(None, description="Column with a unique row id; null = '<source> row <i>'.")
    system_prompt: str | None = Field(None, description="A system turn put before every prompt / chat.")
    prompt_template: str | None = Field(
        None,
        description="Text around a text prompt, with '{prompt}' where the question goes, e.g. "
        "'{prompt} Put the final answer in \\boxed{}.'",
    )
    chat_prompt: Literal["history", "last_user"] | None = Field(
        None,
        description="RL stages, 'messages' column: 'history' = every turn before the final assistant turn, "
        "'last_user' = only the last user turn before it. null = 'history'.",
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_has_slot(cls, value: str | None) -> str | None:
        if value is not None and "{prompt}" not in value:
            raise ValueError(f"prompt_template must contain '{{prompt}}' where the question goes: {value!r}")
        return value

    @model_validator(mode="after")
    def _has_a_source_column(self) -> ColumnsConfig:
        named = [k for k in type(self).model_fields if k != "preset" and getattr(self, k) is not None]
        if self.preset == "none" and named and self.prompt is None and self.messages is None:
            raise ValueError(
                f"data.columns: {', '.join(named)} set, but no 'prompt' or 'messages' column (or a preset) "
                "to build rows from"
            )
        return self


class DataConfig(Section):
    """Training / evaluation data: files, saved or cached Hugging Face datasets, or a tiny task set."""

    train_files: list[str] = Field(
        default_factory=list,
        description="Each entry: a .jsonl/.json/.parquet/.csv file, a folder saved with Dataset.save_to_disk "
        "or DatasetDict.save_to_disk, a folder of such files (or laid out like a hub dataset repository), "
        "or a dataset name such as 'openai/gsm8k' that datasets.load_dataset has already saved in the "
        "local cache (resolved offline, see hf_offline). Relative paths are resolved against the recipe "
        "file; entries are read in order and concatenated.",
    )
    eval_files: list[str] = Field(
        default_factory=list,
        description="Held-out data, same forms as train_files; read at eval_split (else split).",
    )
    split: str = Field(
        "train", min_length=1, description="Split read from sources that have several (DatasetDict, names)."
    )
    eval_split: str | None = Field(
        None,
        min_length=1,
        description="Split of the held-out data. Without eval_files, held-out rows are this split of "
        "train_files (e.g. 'test'); null = eval_fraction of the training rows.",
    )
    dataset_config: str | None = Field(
        None, description="Configuration of a named or hub-layout dataset (e.g. 'main' for GSM8K)."
    )
    hf_cache_dir: str | None = Field(
        None, description="datasets cache to resolve dataset names from; null = HF_DATASETS_CACHE."
    )
    hf_offline: bool = Field(
        True,
        description="Resolve dataset names from the local cache only (datasets in HF_HUB_OFFLINE mode); "
        "false lets datasets download them.",
    )
    columns: ColumnsConfig = Field(
        default_factory=ColumnsConfig, description="Column mapping and answer extraction for other shapes."
    )
    generator: str | None = Field(
        None, description="Name of an offline task generator (e.g. 'tiny_arithmetic') used instead of files."
    )
    generator_options: dict[str, int | float | bool | str | list[int | float | bool | str]] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the generator (e.g. answer_noise: 0.25, "
        "operations: ['+', '-']).",
    )
    num_train: int = Field(512, ge=1, description="Rows the generator produces for training.")
    num_eval: int = Field(64, ge=1, description="Held-out rows the generator produces.")
    reasoning_fraction: float = Field(
        0.5, ge=0, le=1, description="Fraction of generated rows in reasoning mode (<think> traces)."
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Fraction of train data held out when no eval_files are given."
    )
    max_prompt_tokens: int = Field(512, ge=1, description="Prompts longer than this are dropped (RL stages).")
    shuffle: bool = Field(True, description="Shuffle the data each epoch (seeded).")

    @field_validator("generator")
    @classmethod
    def _generator_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"generator must be an identifier such as 'tiny_arithmetic', got {value!r}")
        return value


class RolloutConfig(Section):
    """Rollout workers that sample responses (transformers on CPU/GPU, or vLLM on GPUs)."""

    backend: Literal["hf", "vllm"] = Field(
        "hf", description="'hf' = transformers generate; 'vllm' = vLLM engine."
    )
    num_workers: int = Field(
        1, ge=1, description="Rollout worker actors (each uses tensor_parallel_size GPUs)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (paper: 1.0).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold (paper: 0.95).")
    top_k: int = Field(-1, ge=-1, description="Top-k sampling; -1 = off.")
    max_new_tokens: int = Field(256, ge=1, description="Longest sampled response.")
    batch_size: int = Field(
        32,
        ge=1,
        description="Sequences generated together per worker call (hf) or in flight per engine "
        "(vLLM max_num_seqs).",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per vLLM engine (tensor parallelism).")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vLLM's share of each of its GPUs' memory (weights + KV cache)."
    )
    max_staleness: int = Field(
        0, ge=0, description="How many policy versions a rollout may lag the learner (0 = on-policy)."
    )
    enable_thinking: bool | None = Field(
        None, description="Force reasoning (True) or non-reasoning (False) mode; None = per prompt row."
    )
    mtp_speculative: bool = Field(
        False, description="vLLM on GPUs: MTP self-speculative decoding (refused on vLLM's CPU build)."
    )
    mtp_num_speculative_tokens: int = Field(
        1, ge=1, description="vLLM with mtp_speculative: tokens the MTP layer drafts per step."
    )
    enforce_eager: bool | None = Field(
        None,
        description="vLLM: skip torch.compile and CUDA graphs; null = eager on CPU (issue 11: compiling "
        "added ~75 s to start-up there), compiled on GPUs.",
    )
    cpu_kvcache_gib: float = Field(
        1.0, gt=0, description="vLLM's CPU build: GiB of KV cache per engine (VLLM_CPU_KVCACHE_SPACE)."
    )
    weight_sync_bucket_mb: int = Field(256, ge=1, description="Size of each weight-sync bucket in MiB.")
    weight_sync_transport: Literal["object_store", "collective"] = Field(
        "object_store",
        description="How the learners' weights reach the rollout workers after a step; in both, only "
        "learner rank 0 sends (the other ZeRO-3 ranks only join each bucket's gather). 'object_store': "
        "rank 0 streams each bucket into Ray's object store (at most two ahead) and every worker fetches "
        "it; works wherever Ray does, at the cost of a copy into shared memory per bucket. 'collective': "
        "rank 0 broadcasts each bucket straight to every worker (every tensor-parallel rank of a vLLM "
        "engine) over a side process group, gloo when the learners run on CPU and nccl on CUDA, so "
        "weights never pass through the driver; the group is formed on the first push and again after "
        "a worker is replaced. While max_worker_restarts > 0 rank 0 also keeps one copy of the last "
        "push in the object store, only to load a replacement worker at the same policy version.",
    )
    job_timeout_s: float | None = Field(
        None,
        gt=0,
        description="A rollout worker that has not returned one generate call after this many seconds is "
        "taken as hung: it is killed and replaced like a dead one (counts against max_worker_restarts) "
        "and its requests re-issued. Set it well above the slowest legitimate call (a whole step's "
        "rollout on one worker); null = wait forever.",
    )
    max_worker_restarts: int = Field(
        3,
        ge=0,
        description="Rollout workers that die (Ray actor death) are replaced and their in-flight requests "
        "re-issued, at most this many times per stage run; then the stage fails. While > 0 the pool keeps "
        "the last pushed weights in Ray's object store (one policy copy) to start a replacement at the "
        "same policy version; 0 = fail on the first death and keep no copy.",
    )


class GradingConfig(Section):
    """Rule-verifier grading of AGAPO rollouts (``runtime.grading``)."""

    backend: Literal["ray", "local"] = Field(
        "ray",
        description="'ray': Ray tasks spread over the cluster's nodes, started as each rollout worker's "
        "samples arrive, so grading overlaps generation. 'local': threads in the driver, after the whole "
        "batch is collected (the behaviour before grading moved to Ray).",
    )
    num_workers: int = Field(
        4, ge=1, description="ray: grading tasks running at once; local: grading threads in the driver."
    )
    chunk_size: int = Field(8, ge=1, description="ray: samples per grading task (graded one at a time).")
    timeout_s: float | Literal["auto"] | None = Field(
        "auto",
        description="Per-sample limit, past which a verifier's sample scores 0: 'auto' = the verifier's own "
        "worst case plus a grace where it declares one (the code verifier: per-run limit x runs), else "
        "60 s (verifiers.score_batch); a number of seconds for every sample; null = none.",
    )

    @field_validator("timeout_s")
    @classmethod
    def _positive_timeout(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, int | float) and value <= 0:
            raise ValueError(f"must be > 0 seconds, 'auto' or null, got {value}")
        return value

    cpus_per_task: float = Field(
        0.0,
        ge=0,
        description="ray: CPUs each grading task reserves. 0 = none (num_workers alone bounds them; safe "
        "when actors hold every CPU Ray knows of); 1 on a cluster whose spare CPUs should do the grading.",
    )


class LearnersConfig(Section):
    """DeepSpeed learner actors that own the trainable policy."""

    num_learners: int = Field(
        1, ge=1, description="Data-parallel learner actors (one GPU each on a cluster)."
    )
    zero_stage: Literal[2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 2 (shard grads+optimizer) or 3 (+params)."
    )
    micro_batch_tokens: int = Field(
        4096,
        ge=1,
        description="Token budget of one micro-batch: the tokens its forward and backward compute, padding "
        "included (a longer sequence gets a micro-batch of its own).",
    )
    sequence_packing: bool = Field(
        True,
        description="Pack micro-batches: several sequences share a row (as wide as the micro-batch's longest "
        "sequence), positions restart and attention stays inside each sequence, so padding is not "
        "computed. Losses still see one sequence per row (per-response means, advantages and the global "
        "normalisation are unchanged). false = consecutive rows right-padded to the longest.",
    )
    share_prefixes: bool = Field(
        True,
        description="With sequence_packing: rows whose tokens before the first trained token are identical "
        "(the G responses of one prompt) are packed as the prompt once plus one branch per response; each "
        "response attends to the prompt and itself, with positions continuing after the prompt, so its "
        "log-probs are those of the unshared row while the prompt is computed once instead of G times. "
        "Needs sdpa or eager attention (explicit masks); with other kernels the learner warns and packs "
        "without sharing.",
    )
    balance_ranks: bool = Field(
        True,
        description="Give rows to the data-parallel learners by tokens (longest first, to the least-loaded "
        "rank) rather than in contiguous slices, so no rank waits on another's long tail.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="Torch intra-op threads in each learner process; None = the CPUs Ray reserves for it "
        "(cluster.cpus_per_actor). For CPU runs whose learners and rollout workers take turns "
        "(rollout.max_staleness 0): the learner can then use the cores the idle rollout workers hold. "
        "With overlap (max_staleness >= 1) more threads than reserved cores oversubscribe them.",
    )
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient-norm clipping; None = off.")
    lr_schedule: Literal["wsd", "cosine", "constant"] = Field(
        "constant", description="wsd = warmup-stable-decay; cosine (with warmup); constant (with warmup)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    decay_fraction: float = Field(0.1, ge=0, le=1, description="wsd: fraction of steps spent decaying.")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Final LR as a fraction of the peak (wsd/cosine)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: list[float] = Field(
        default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2, description="AdamW betas."
    )
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Training precision.")
    backend: Literal["gloo", "nccl"] = Field("gloo", description="torch.distributed backend.")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer-state offload to CPU.")

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, value: list[float]) -> list[float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas must lie in [0, 1), got {value}")
        return value


class ClusterConfig(Section):
    """Ray cluster and how actors are placed on it."""

    address: str | None = Field(
        None, description="Ray address ('auto', 'ray://host:10001'); None = local ray.init()."
    )
    placement: Literal["colocated", "disaggregated"] = Field(
        "colocated", description="colocated = learners and rollout share GPUs; disaggregated = separate GPUs."
    )
    nodes: int = Field(1, ge=1, description="Nodes in the cluster.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (0 = CPU only).")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved for each learner / rollout actor.")
    simulated_gpus: bool = Field(
        False,
        description="Declare nodes x gpus_per_node GPUs to a local Ray and place every actor as on the "
        "cluster (same GPU requests and bundles), but run them on CPU: a CPU rehearsal of a GPU layout.",
    )
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="Memory of one GPU; lets `plan` warn when an estimate does not fit."
    )


class CheckpointConfig(Section):
    """Trainer checkpoints (resume) and the exported Hugging Face checkpoint (next stage's input)."""

    every_steps: int = Field(0, ge=0, description="Save every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    resume: str = Field(
        "auto",
        min_length=1,
        description="'auto' = latest complete checkpoint in run_dir, 'never', or a path.",
    )
    export: bool = Field(
        True, description="Write a Hugging Face checkpoint at the end (the next stage's input)."
    )
    max_restarts: int = Field(
        1,
        ge=0,
        description="When a Ray actor (learner or other) dies or a Ray call fails mid-stage, restart the "
        "stage from the newest complete checkpoint its failed attempts wrote (else as checkpoint.resume "
        "says) up to this many times, then fail naming the count; 0 = never restart. Errors in the "
        "recipe or data (KexaoneError) are never retried.",
    )


class WandbConfig(Section):
    """Weights & Biases: every scalar metric, and a table of prompts, responses and rewards per evaluation."""

    project: str = Field("kexaone-align", min_length=1, description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (user or team); null = the account's default.")
    name: str | None = Field(None, description="Run name; null = the recipe's name, else the stage.")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="'offline' writes the run under <dir>/wandb for `wandb sync` later (no network); "
        "'online' streams to the W&B server (needs a login); 'disabled' logs nothing.",
    )
    tags: list[str] = Field(default_factory=list, description="Run tags.")
    dir: str | None = Field(None, description="Folder W&B writes its wandb/ directory in; null = run_dir.")
    table_rows: int = Field(
        200, ge=0, description="Most rows of each evaluation's sample table (0 = no tables)."
    )


class LoggingConfig(Section):
    """Where metrics go."""

    wandb: WandbConfig | None = Field(
        None, description="Weights & Biases logging (needs the 'wandb' package); null = off."
    )

    jsonl: bool = Field(True, description="Write metrics.jsonl in run_dir.")
    tensorboard: bool = Field(False, description="Write TensorBoard events in run_dir/tb.")
    plots: bool = Field(True, description="Write PNG plots of the main curves at the end.")
    progress_bar: bool = Field(True, description="Show a progress bar on the terminal.")
    log_every_steps: int = Field(1, ge=1, description="Log metrics every N steps.")
    save_rollouts: bool = Field(True, description="Write sampled rollouts to run_dir/rollouts.jsonl.")
