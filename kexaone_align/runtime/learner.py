"""The learner: one DeepSpeed engine over the full MoE policy, one data-parallel rank.

``Learner`` is plain Python (usable in-process for tests and single-process runs); ``LearnerActor``
is the same class wrapped by ``ray.remote`` on first use. N learners form one torch.distributed
group (gloo on CPU, NCCL on GPU) and DeepSpeed all-reduces their gradients.

One ``train_step`` is one optimizer step. The rank's rows are cut into micro-batches by a padded
token budget; every micro-batch's loss is weighted by its share of the *global* loss weight
(loss tokens or sequences, summed over all ranks), so N learners over a split batch take the same
step as one learner over the whole batch. Ranks with fewer micro-batches run zero-weight dummy
ones, because ZeRO-3 gathers parameters collectively in every forward and backward.

Packed rows (``data.packing.collate_packed``) carry ``sequence_ids``: positions then restart per
sample and attention stays inside each sample (``packed_forward_kwargs``), so samples never leak.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.batching import validate_batch
from kexaone_align.runtime.learner_weights import LearnerWeightsMixin, param_numel
from kexaone_align.runtime.lr_schedules import SCHEDULES, lr_multiplier_fn
from kexaone_align.runtime.metric_reduce import MetricAccumulator
from kexaone_align.runtime.packed_micro import DEFAULT_COST_WIDTH, Micro, attention_cost_width, make_micros
from kexaone_align.runtime.token_logprobs import TokenLogprobModel, forward_args
from kexaone_align.runtime.weight_wire import free_port

logger = logging.getLogger(__name__)

if not torch.cuda.is_available():  # DeepSpeed reads this when it first picks an accelerator
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

LossFn = Callable[[Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Any]]]
DS_TAG = "deepspeed"


@dataclass
class LearnerConfig:
    """Everything a learner needs besides the model path (plain dataclass: picklable for Ray)."""

    zero_stage: int = 2
    precision: str = "fp32"  # fp32 | bf16
    backend: str = "gloo"  # gloo (CPU) | nccl (GPU)
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    lr_schedule: str = "constant"  # constant | cosine | wsd
    warmup_steps: int = 0
    stable_steps: int = 0  # wsd only
    decay_steps: int = 0  # cosine and wsd
    min_lr_ratio: float = 0.0
    micro_batch_tokens: int = 4096  # computed tokens per micro-batch (forward + backward), padding included
    sequence_packing: bool = False  # micro-batches of packed rows (runtime.packed_micro), else padded rows
    share_prefixes: bool = False  # packed rows: rows with the same prompt share one copy of it (sdpa / eager)
    balance_ranks: bool = False  # LearnerGroup: rows to ranks by tokens (longest first), else contiguous
    threads: int | None = None  # torch intra-op threads; None = as the process starts (Ray: its CPUs)
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # transformers kernels; None = transformers' defaults
    experts_implementation: str | None = None
    freeze_router: bool = True
    aux_loss_coef: float = 0.0  # MoE load-balancing loss weight; 0 (off) for RL
    loss_aggregation: str = "tokens"  # how micro-batch losses combine: tokens | sequences
    logprob_chunk_size: int = 1024  # tokens per chunk of the LM-head projection
    # The distribution token log-probs are taken under (algorithms.logprobs.chunked_token_logprobs): the
    # model at 1.0 / 1.0 / -1; AGAPO sets the rollout's temperature (and its top-p / top-k under
    # agapo.ratio_distribution=sampler) so both sides of the importance ratio match.
    logprob_temperature: float = 1.0
    logprob_top_p: float = 1.0
    logprob_top_k: int = -1
    zero3_init: bool = True  # ZeRO-3: build the model already partitioned (deepspeed.zero.Init)
    seed: int = 0
    ds_config_overrides: dict[str, Any] = field(default_factory=dict)  # deep-merged into the DS config

    def validate(self) -> None:
        """Raise ``KexaoneError`` naming the first bad field."""
        checks = [
            (self.zero_stage in (2, 3), f"zero_stage must be 2 or 3, got {self.zero_stage}"),
            (self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision!r}"),
            (self.backend in ("gloo", "nccl"), f"backend must be gloo or nccl, got {self.backend!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"bad betas {self.betas}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (
                self.lr_schedule in SCHEDULES,
                f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}",
            ),
            (self.micro_batch_tokens >= 1, f"micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}"),
            (self.aux_loss_coef >= 0, f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}"),
            (
                self.loss_aggregation in ("tokens", "sequences"),
                f"loss_aggregation must be tokens or sequences, got {self.loss_aggregation!r}",
            ),
            (self.logprob_chunk_size >= 1, f"logprob_chunk_size must be >= 1, got {self.logprob_chunk_size}"),
            (
                self.logprob_temperature > 0,
                f"logprob_temperature must be > 0, not {self.logprob_temperature}",
            ),
            (0 < self.logprob_top_p <= 1, f"logprob_top_p must be in (0, 1], got {self.logprob_top_p}"),
            (self.logprob_top_k == -1 or self.logprob_top_k >= 1, f"bad logprob_top_k {self.logprob_top_k}"),
            (self.threads is None or self.threads >= 1, f"threads must be >= 1 or None, got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise KexaoneError(f"LearnerConfig: {message}")
        self.lr_multiplier()  # validates the schedule's step counts

    def lr_multiplier(self) -> Callable[[int], float]:
        """The LR schedule as a function of the optimizer step."""
        return lr_multiplier_fn(
            self.lr_schedule,
            warmup_steps=self.warmup_steps,
            stable_steps=self.stable_steps,
            decay_steps=self.decay_steps,
            min_ratio=self.min_lr_ratio,
        )


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def deepspeed_config(config: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for ``config`` (micro-batching is ours, so DS sees batch 1, GAS 1)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(config.grad_clip),
        "zero_optimization": {
            "stage": config.zero_stage,
            "overlap_comm": False,
            "contiguous_gradients": True,
        },
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW runs on CPU and GPU alike
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, config.ds_config_overrides)


def mark_moe_blocks_as_zero3_leaves(policy: nn.Module) -> None:
    """Make ZeRO-3 fetch each MoE block's parameters as one unit.

    ZeRO-3 records the order in which submodules run and expects it to be the same on every rank.
    Inside an MoE block that order depends on the data: the eager experts loop calls its activation
    module once per expert that received tokens, so two ranks with different tokens disagree and
    DeepSpeed either raises ("disagreement on list length") or hangs. A ZeRO-3 leaf module is traced
    as one step, whatever runs inside it. A block is any module with an ``experts`` child.
    """
    from deepspeed.utils import set_z3_leaf_modules

    classes = {type(m) for m in policy.modules() if isinstance(getattr(m, "experts", None), nn.Module)}
    if classes:
        set_z3_leaf_modules(policy, list(classes))


def _to_float(value: Any) -> float:
    return float(value.detach().float().item()) if isinstance(value, Tensor) else float(value)


class Learner(LearnerWeightsMixin):
    """One data-parallel rank of the policy learner (see the module docstring)."""

    def __init__(self, model_path: str | Path, config: LearnerConfig) -> None:
        config.validate()
        self.model_path = str(model_path)
        self.config = config
        self.engine = None
        self.rank = 0
        self.world_size = 1
        self.steps = 0
        self.frozen_parameters: list[str] = []
        self._explicit_masks = False  # set in setup: the attention takes explicit masks (share_prefixes)
        self.attention_cost_width = DEFAULT_COST_WIDTH  # set in setup from the model (shared_prefix_units)
        self.last_export: dict[str, Any] = {}
        self._sender: Any = None  # weight_sync.BroadcastSender, once rank 0 joined the side group

    # ----------------------------------------------------------------------------------- set-up
    def node_info(self) -> dict[str, Any]:
        """Where this learner runs and a free port there (the launcher picks rank 0's as master)."""
        try:
            import ray

            node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
            ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        except ImportError:  # pragma: no cover
            node_id, ip = None, "127.0.0.1"
        return {"node_id": node_id, "ip": ip, "port": free_port(), "pid": os.getpid()}

    def setup(
        self,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
    ) -> dict[str, Any]:
        """Join the process group, load the policy and build the DeepSpeed engine. Returns a summary."""
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        cfg = self.config
        if cfg.backend == "nccl" and not torch.cuda.is_available():
            raise KexaoneError("LearnerConfig.backend is 'nccl' but no CUDA device is visible")
        self.rank, self.world_size = rank, world_size
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self._init_distributed(rank, world_size, master_addr, master_port or free_port())
        torch.manual_seed(cfg.seed)
        ds_config = deepspeed_config(cfg)
        policy = self._load_policy(ds_config)
        if cfg.freeze_router:
            from kexaone_align.models import freeze_router

            self.frozen_parameters = freeze_router(policy).parameter_names
        if cfg.zero_stage == 3:
            mark_moe_blocks_as_zero3_leaves(policy)
        self.policy = policy
        impl = getattr(policy.config, "_attn_implementation", None) or "eager"
        self._explicit_masks = impl in ("sdpa", "eager")
        self.attention_cost_width = attention_cost_width(policy.config)
        if cfg.sequence_packing and cfg.share_prefixes and not self._explicit_masks:
            logger.warning(
                "learners.share_prefixes needs sdpa or eager attention, not %r: prompts not shared", impl
            )
        module = TokenLogprobModel(
            policy, chunk_size=cfg.logprob_chunk_size, zero3=cfg.zero_stage == 3,
            temperature=cfg.logprob_temperature, top_p=cfg.logprob_top_p, top_k=cfg.logprob_top_k,
        )  # fmt: skip
        optimizer = torch.optim.AdamW(
            self._param_groups(policy), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.lr_multiplier())
        self.engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        self.device = self.engine.device
        trainable = sum(param_numel(p) for p in policy.parameters() if p.requires_grad)
        total = sum(param_numel(p) for p in policy.parameters())
        return {
            "rank": rank, "world_size": world_size, "trainable_params": trainable, "total_params": total,
            "share_prefixes": cfg.sequence_packing and cfg.share_prefixes and self._explicit_masks,
            "attention_cost_width": self.attention_cost_width, "threads": torch.get_num_threads(),
        }  # fmt: skip

    def _init_distributed(self, rank: int, world_size: int, addr: str, port: int) -> None:
        import deepspeed
        import torch.distributed as dist

        from kexaone_align.runtime.ds_ops import load_op

        load_op("ShareMemCommBuilder")  # init_distributed builds it on CPU; see ds_ops for why first
        if dist.is_initialized():
            if dist.get_world_size() != world_size or dist.get_rank() != rank:
                raise KexaoneError(
                    f"this process already belongs to a process group of {dist.get_world_size()} "
                    f"(rank {dist.get_rank()}); cannot join as rank {rank} of {world_size}"
                )
            deepspeed.init_distributed(
                dist_backend=self.config.backend, auto_mpi_discovery=False, verbose=False
            )
            return
        # DeepSpeed reads these; each Ray actor sees only its own GPU, hence LOCAL_RANK 0 by default.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=addr, MASTER_PORT=str(port))
        os.environ.setdefault("LOCAL_RANK", "0")
        if self.config.backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed(
            dist_backend=self.config.backend,
            auto_mpi_discovery=False,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world_size,
            verbose=False,
        )

    def _load_policy(self, ds_config: dict[str, Any]) -> nn.Module:
        from kexaone_align.models import load_policy

        cfg = self.config
        dtype = "bfloat16" if cfg.precision == "bf16" else "float32"
        device = f"cuda:{torch.cuda.current_device()}" if cfg.backend == "nccl" else "cpu"
        kwargs = {
            "dtype": dtype,
            "device": device,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "attn_implementation": cfg.attn_implementation,
            "experts_implementation": cfg.experts_implementation,
        }
        if not (cfg.zero_stage == 3 and cfg.zero3_init):
            return load_policy(self.model_path, **kwargs)
        # While an HfDeepSpeedConfig with stage 3 is alive, from_pretrained builds the model inside
        # deepspeed.zero.Init: each rank only ever holds its shard (the 236B model needs this). It is
        # process-global, so drop it right after: later from_pretrained calls must load normally.
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        hf_ds_config = HfDeepSpeedConfig(ds_config)
        try:
            return load_policy(self.model_path, **kwargs)
        finally:
            del hf_ds_config
            unset_hf_deepspeed_config()

    def _param_groups(self, policy: nn.Module) -> list[dict[str, Any]]:
        """Weight decay on matrices only (not on norms, biases or other vectors)."""
        decay, no_decay = [], []
        for param in policy.parameters():
            if not param.requires_grad:
                continue
            ndim = len(getattr(param, "ds_shape", param.shape))
            (decay if ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": self.config.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def _require_engine(self):
        if self.engine is None:
            raise KexaoneError("Learner.setup() must run before training, saving or loading")
        return self.engine

    # ---------------------------------------------------------------------------------- training
    def _loss_weight(self, micro: dict[str, Tensor]) -> float:
        if self.config.loss_aggregation == "sequences":
            return float(micro["input_ids"].shape[0])
        return float(micro["loss_mask"].sum())

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def _dummy_micro_batch(self) -> dict[str, Tensor]:
        """Two pad tokens, nothing to predict: keeps ZeRO-3's collectives in step on a short rank."""
        pad = int(getattr(self.policy.config, "pad_token_id", 0) or 0)
        ids = torch.full((1, 2), pad, dtype=torch.long, device=self.device)
        ones = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": ones, "loss_mask": torch.zeros_like(ids)}

    def _micro_batches(self, batch: dict[str, Tensor]) -> list[Micro]:
        rows = validate_batch(batch) if batch["input_ids"].numel() else 0
        if rows == 0:
            return []
        batch = {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        pad = int(getattr(self.policy.config, "pad_token_id", 0) or 0)
        cfg = self.config
        return make_micros(
            batch, cfg.micro_batch_tokens, packing=cfg.sequence_packing, pad_token_id=pad,
            share_prefixes=cfg.share_prefixes and self._explicit_masks, cost_width=self.attention_cost_width,
        )  # fmt: skip

    def _forward(self, inputs: dict[str, Tensor], with_aux: bool) -> tuple[Tensor, Tensor | None]:
        engine = self._require_engine()
        return engine(*forward_args(inputs, with_aux))

    def train_step(self, batch: dict[str, Tensor], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on this rank's rows; every rank of the group must call it together.

        ``loss_fn(token_logprobs [n, t], micro_batch) -> (loss, metrics)`` sees one micro-batch at a
        time; its loss should be a mean over the micro-batch's loss tokens (``loss_aggregation=
        "tokens"``) or sequences (``"sequences"``), so that the weighted sum is the batch mean.
        """
        engine = self._require_engine()
        if not callable(loss_fn):
            raise KexaoneError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        started = time.perf_counter()
        micros = self._micro_batches(batch)
        weights = [self._loss_weight(m.view) for m in micros]
        local_weight = sum(weights)
        (num_steps,) = self._all_reduce(
            [float(max(1, len(micros)))], "max"
        )  # >= 1: DS steps after a backward
        local_rows = float(sum(m.view["input_ids"].shape[0] for m in micros))
        global_weight, global_rows = self._all_reduce([local_weight, local_rows], "sum")
        normaliser = global_weight if global_weight > 0 else 1.0
        lr = float(engine.get_lr()[0])
        with_aux = self.config.aux_loss_coef > 0
        engine.train()
        loss_sum, aux_sum = 0.0, 0.0
        step_metrics = MetricAccumulator()
        for i in range(int(num_steps)):
            real = i < len(micros)
            engine.set_gradient_accumulation_boundary(i == int(num_steps) - 1)
            logprobs, aux = self._forward(micros[i].forward if real else self._dummy_micro_batch(), with_aux)
            if real:  # the loss sees the padded view (packed log-probs are gathered back into it)
                loss, metrics = loss_fn(micros[i].unpack(logprobs), micros[i].view)
                share = weights[i] / normaliser
                total = loss * share
                if with_aux:
                    total = total + self.config.aux_loss_coef * aux * share
                    aux_sum += _to_float(aux) * share
                loss_sum += _to_float(loss) * share
                step_metrics.add({k: _to_float(v) for k, v in (metrics or {}).items()}, weights[i])
            else:
                total = logprobs.sum() * 0.0 + (aux * 0.0 if aux is not None else 0.0)
            # DeepSpeed averages gradients over ranks; undo that, our shares already sum to 1 globally.
            engine.backward(total * self.world_size, scale_wrt_gas=False)
        engine.step()
        self.steps += 1
        elapsed = time.perf_counter() - started
        global_loss, global_aux = self._all_reduce([loss_sum, aux_sum], "sum")
        tokens = float(sum(float(m.view["attention_mask"].sum()) for m in micros))
        computed = float(sum(m.computed_tokens for m in micros))
        grad_norm = engine.get_global_grad_norm()
        out = {
            "loss": global_loss,
            "grad_norm": _to_float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr,
            "learner_tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "computed_tokens": computed,
            "loss_weight": local_weight,
            "micro_batches": float(len(micros)),
            "step_time_s": elapsed,
            "global_rows": global_rows,
        }
        if with_aux:
            out["aux_loss"] = global_aux
        # loss_fn metrics combined by name (runtime.metric_reduce): *_max / *_min are true extremes
        out.update({f"loss/{k}": v for k, v in step_metrics.result().items()})
        return out

    def advance_lr_schedule(self) -> float:
        """Move the LR schedule on one step without an optimizer step (a stage step with nothing to learn
        from), so the schedule stays sized in stage steps; returns the LR that step would have used."""
        engine = self._require_engine()
        lr = float(engine.get_lr()[0])
        engine.lr_scheduler.step()
        return lr

    @torch.no_grad()
    def forward_logprobs(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-token log-probs ``[N, T]`` (CPU, fp32) at ``loss_mask`` positions (all real tokens if absent).

        No gradient, eval mode. Under ZeRO-3 every rank must call it together.
        """
        engine = self._require_engine()
        batch = dict(batch)
        if "loss_mask" not in batch:
            batch["loss_mask"] = batch["attention_mask"]
        n, t = batch["input_ids"].shape
        result = torch.zeros((n, t), dtype=torch.float32)
        micros = self._micro_batches(batch) if n else []
        (num_steps,) = self._all_reduce([float(len(micros))], "max")
        engine.eval()
        for i in range(int(num_steps)):
            inputs = micros[i].forward if i < len(micros) else self._dummy_micro_batch()
            logprobs, _ = self._forward(inputs, False)
            if i < len(micros):
                plan = micros[i].plan
                rows = torch.as_tensor(plan.rows, dtype=torch.long)
                result[rows, plan.start : plan.stop] = micros[i].unpack(logprobs).float().cpu()
        engine.train()
        return result

    # ------------------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> str:
        """DeepSpeed checkpoint (weights, optimizer, LR scheduler) of all ranks into ``directory``."""
        engine = self._require_engine()
        engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={"learner_steps": self.steps})
        return str(directory)

    def load(self, directory: str | Path) -> int:
        """Restore what ``save`` wrote; returns the learner step count stored with it."""
        engine = self._require_engine()
        if not (Path(directory) / DS_TAG).is_dir():
            raise KexaoneError(f"no learner checkpoint at {directory} (expected a '{DS_TAG}' folder)")
        path, client_state = engine.load_checkpoint(str(directory), tag=DS_TAG)
        if path is None:
            raise KexaoneError(f"DeepSpeed could not load the learner checkpoint in {directory}")
        self.steps = int((client_state or {}).get("learner_steps", 0))
        return self.steps

    def describe(self) -> dict[str, Any]:
        """Config and progress, for logs."""
        return {
            "config": asdict(self.config),
            "rank": self.rank,
            "world_size": self.world_size,
            "steps": self.steps,
        }


_ACTOR_CLASS = None


def learner_actor_class():
    """``ray.remote(Learner)``, created on first use so importing this module never needs Ray."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(Learner)
    return _ACTOR_CLASS


def __getattr__(name: str):
    if name == "LearnerActor":
        return learner_actor_class()
    raise AttributeError(name)
