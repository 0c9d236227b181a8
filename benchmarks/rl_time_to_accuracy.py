"""RL time to accuracy: our AGAPO stage against TRL's GRPOTrainer, side by side, from one SFT checkpoint.

Both systems start from the same exported SFT checkpoint and read the same AGAPO recipe: the same
training prompt rows in the same order (our ``PromptCursor`` order is written into TRL's dataset, which
TRL then reads unshuffled), the same group size G, prompts per step, learning rate, AdamW settings,
gradient clip, max new tokens, temperature / top-p, frozen routers and reward (our ``math`` verifier
through ``score_batch``). TRL is configured as close to AGAPO as it allows: ``loss_type="cispo"``,
``epsilon_high = agapo.is_cap`` (CISPO's cap on the importance weight), ``beta=0.0`` (no reference
model), ``scale_rewards="batch"``; BENCHMARKS.md lists what still differs.

Held-out accuracy is measured for both with one procedure: ``stages.rl.evaluate`` (T=1.0, top-p 0.95,
same held-out rows, seed and request ids, so common random numbers) on our ``hf`` rollout backend. Our
stage runs it every ``--eval-every`` steps itself (``agapo.eval_every_steps``, inside the stage's
rollout worker); for TRL a callback wraps the trainer's live model in the same backend and calls the
same function. Evaluation time is excluded from both training clocks.

Each run uses one seed out of ``--seeds`` (the recipe's ``seed`` for both systems: our sampling
streams and prompt order, TRL's ``GRPOConfig.seed`` and the same prompt order, and the held-out rows and
evaluation random numbers, so every arm starts from the same accuracy within a seed). The target is set
per seed (accuracy before RL + ``--target-gain``). Each system runs in a fresh child process
(``--child``); runs are interleaved per seed: ours, TRL, ours, TRL, ... Reported per run:
training-loop seconds to reach the target held-out accuracy, RL steps per minute, learner tokens/s
(prompt + response tokens through forward + backward + optimizer, over learner time) and rollout
tokens/s (generated tokens over generation time). The JSON keeps every run, the medians
and TRL/ours ratios per seed and over all seeds, and the per-seed ratios with their median.

    python benchmarks/rl_time_to_accuracy.py --checkpoint runs/tiny/sft/export --steps 40 --seeds 0,1,2
    python benchmarks/rl_time_to_accuracy.py --quick --out /tmp/rl_tta_quick.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median, write_json
from _tta_summary import SYSTEMS, summarize_seeds, time_to_target

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = "recipes/tiny/agapo.yaml"
# What is compared: an arm is a system plus recipe overrides of its own. ``ours_overlap`` is AGAPO's
# off-policy pipeline (rollout of step k+1 overlaps learning on step k); TRL has no such mode on CPU.
ARMS: dict[str, tuple[str, list[str]]] = {
    "ours": ("ours", []),
    "trl": ("trl", []),
    "ours_overlap": ("ours", ["rollout.max_staleness=1"]),
    # The step's prompts split over two one-thread rollout workers (half a CPU each to Ray, so that with
    # the learner they fit on two cores): in synchronous mode the learner idles while they decode.
    "ours_2rollout": ("ours", ["rollout.num_workers=2", "cluster.cpus_per_actor=0.5"]),
    # Synchronous with two threads per actor: rollout and learner take turns, so each gets both cores
    # while the other waits (as TRL's one process does with --trl-threads 2).
    "ours_2cpu": ("ours", ["cluster.cpus_per_actor=2"]),
    # Synchronous, each phase on both cores: the step's prompts split over two one-thread rollout workers
    # (half a CPU each to Ray), then the learner with two threads (learners.threads) while they wait.
    "ours_turns": ("ours", ["rollout.num_workers=2", "cluster.cpus_per_actor=0.5", "learners.threads=2"]),
    "ours_overlap_2rollout": (
        "ours",
        ["rollout.max_staleness=1", "rollout.num_workers=2", "cluster.cpus_per_actor=0.5"],
    ),
}
# Quick mode: a few tiny steps, so the whole harness (both systems, evaluation, JSON) runs in about a minute.
QUICK_OVERRIDES = [
    "agapo.prompts_per_step=2",
    "agapo.group_size=4",
    "rollout.max_new_tokens=12",
    "rollout.batch_size=8",
    "data.num_train=16",
]
# Run-time switches that only remove I/O both sides do not need to compare (plots, TensorBoard, export).
QUIET_OVERRIDES = [
    "logging.progress_bar=false",
    "logging.plots=false",
    "logging.tensorboard=false",
    "logging.save_rollouts=false",
    "checkpoint.export=false",
    "checkpoint.every_steps=0",
]


class BenchmarkError(Exception):
    """A bad argument or a failed child run, reported without a traceback."""


# ------------------------------------------------------------------------------------------ recipe
def stage_recipe(recipe_path: str, checkpoint: str, overrides: list[str], run_dir: str) -> Any:
    """The AGAPO recipe both systems read: ``overrides`` applied, policy and tokenizer from ``checkpoint``."""
    from kexaone_align.config import load_recipe, start_from_checkpoint
    from kexaone_align.errors import KexaoneError

    recipe = start_from_checkpoint(load_recipe(recipe_path, [*overrides, f"run_dir={run_dir}"]), checkpoint)
    if recipe.stage != "agapo" or recipe.agapo is None:
        raise KexaoneError(f"{recipe_path}: expected an agapo stage recipe, got stage {recipe.stage!r}")
    return recipe


def shared_evaluator(recipe: Any, tokenizer: Any, held_rows: list[Any], grade: Any) -> Any:
    """``evaluate(model) -> accuracy``: the stage's held-out evaluation run on an in-process hf backend."""
    from kexaone_align.runtime.rollout.hf import HFRolloutBackend
    from kexaone_align.stages import rl

    class _Pool:  # what rl.evaluate needs of a RolloutPool
        def __init__(self, backend: HFRolloutBackend) -> None:
            self.backend = backend

        def generate(self, requests: list[Any], sampling: Any) -> list[Any]:
            return self.backend.generate(requests, sampling)

    def evaluate(model: Any) -> dict[str, float]:
        was_training = model.training
        backend = HFRolloutBackend.from_model(model, max_batch_size=recipe.rollout.batch_size or 64)
        try:
            return rl.evaluate(
                _Pool(backend), tokenizer, held_rows, grade,
                samples_per_prompt=recipe.agapo.eval_samples_per_prompt,
                max_new_tokens=recipe.rollout.max_new_tokens, seed=recipe.seed + 7919, tag="eval",
            )  # fmt: skip
        finally:
            model.train(was_training)

    return evaluate


# ------------------------------------------------------------------------------------- child: ours
def child_ours(recipe: Any) -> dict[str, Any]:
    """Run our AGAPO stage; read the eval curve and per-step throughput back from its metrics.jsonl."""
    from kexaone_align.stages import run_recipe

    started = time.perf_counter()
    summary = run_recipe(recipe)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (recipe.resolved_run_dir / "metrics.jsonl").open()]
    rows = [r for r in rows if r.get("stage") == "agapo"]
    curve = [{"step": 0, "train_seconds": 0.0, "accuracy": summary["eval_before"]["accuracy"]}]
    curve += [
        {"step": r["step"], "train_seconds": r["eval/train_seconds"], "accuracy": r["eval/accuracy"]}
        for r in rows
        if "eval/train_seconds" in r
    ]
    steps = [r for r in rows if "rollout/seconds" in r]
    rollout_tokens = sum(r["rollout/tokens_per_s"] * r["rollout/seconds"] for r in steps)
    rollout_seconds = sum(r["rollout/seconds"] for r in steps)
    learned = [r for r in steps if "step_time_s" in r]
    return {
        "curve": curve,
        "steps": len(steps),
        "learner_steps": len(learned),
        "train_seconds": curve[-1]["train_seconds"],
        "rollout_tokens": rollout_tokens,
        "rollout_seconds": rollout_seconds,
        "learner_tokens": sum(r["learner_tokens"] for r in learned),
        "learner_seconds": sum(r["step_time_s"] for r in learned),
        "reward_per_step": [r.get("reward/mean", 0.0) for r in steps],
        "zero_variance_frac_per_step": [r.get("zero_variance_frac", 0.0) for r in steps],
        "process_wall_seconds": wall,
        "threads": "driver: torch.set_num_threads(max(1, nproc - actors)); "
        f"{recipe.rollout.num_workers} rollout worker(s) and {recipe.learners.num_learners} learner(s), "
        f"{recipe.cluster.cpus_per_actor:g} CPU each to Ray (OMP_NUM_THREADS=max(1, that))",
    }


# -------------------------------------------------------------------------------------- child: TRL
def trl_config_kwargs(recipe: Any, output_dir: str, micro_batch: int) -> dict[str, Any]:
    """GRPOConfig keyword arguments matching the AGAPO recipe as closely as TRL allows."""
    from kexaone_align.errors import KexaoneError

    cfg, roll, learn = recipe.agapo, recipe.rollout, recipe.learners
    per_step = cfg.prompts_per_step * cfg.group_size
    micro = min(micro_batch, per_step)
    if per_step % micro or micro % cfg.group_size:
        raise KexaoneError(
            f"--trl-micro-batch {micro_batch}: must divide prompts_per_step x G = {per_step} "
            f"and be a multiple of G = {cfg.group_size}"
        )
    if learn.lr_schedule != "constant" or learn.warmup_steps:
        raise KexaoneError("only a constant LR without warmup is mapped to TRL here")
    return {
        "output_dir": output_dir,
        "max_steps": cfg.steps,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": per_step // micro,  # one optimizer step per P x G samples
        "steps_per_generation": per_step // micro,  # one generation of P x G per optimizer step
        "num_generations": cfg.group_size,
        "num_iterations": 1,
        "learning_rate": cfg.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "weight_decay": learn.weight_decay,
        "adam_beta1": learn.betas[0],
        "adam_beta2": learn.betas[1],
        "adam_epsilon": learn.eps,
        "max_grad_norm": learn.grad_clip or 0.0,
        "loss_type": "cispo",
        "epsilon_high": cfg.is_cap,
        "beta": 0.0,
        "scale_rewards": "batch",
        "mask_truncated_completions": False,
        "temperature": roll.temperature,
        "top_p": roll.top_p,
        "top_k": roll.top_k if roll.top_k > 0 else 0,  # ours: -1 = off; TRL: 0 = off
        "max_completion_length": roll.max_new_tokens,
        "use_vllm": False,
        "shuffle_dataset": False,
        "seed": recipe.seed,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_pin_memory": False,
    }


def child_trl(recipe: Any, threads: int, micro_batch: int) -> dict[str, Any]:
    """Run TRL's GRPOTrainer on the recipe's prompts with our verifier as reward; time it like our stage."""
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from kexaone_align.verifiers import Sample, TaskRouter
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from kexaone_align.data.chat_format import render_prompt
    from kexaone_align.errors import KexaoneError
    from kexaone_align.models import freeze_router
    from kexaone_align.models.loading import load_policy
    from kexaone_align.stages import rl
    from kexaone_align.stages.agapo import grade_with_verifiers
    from kexaone_align.stages.common import load_stage_tokenizer, prepare_policy

    process_start = time.perf_counter()
    cfg = recipe.agapo
    model_path = prepare_policy(recipe)
    tokenizer = load_stage_tokenizer(recipe, model_path)
    train_rows, held_rows = rl.load_prompt_rows(recipe)
    router = TaskRouter(recipe.verifiers or None)

    def grade(samples: list[Any]) -> list[float]:
        return grade_with_verifiers(router, samples)

    # The exact rows, in the exact order, our stage's cursor hands out over `steps` steps.
    cursor = rl.restored_cursor(recipe, train_rows, {})
    ordered = [row for _ in range(cfg.steps) for row in cursor.next_batch(cfg.prompts_per_step)]
    records = []
    for i, row in enumerate(ordered):
        ids = render_prompt(tokenizer, row.messages, row.enable_thinking)
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if list(tokenizer(text)["input_ids"]) != ids:  # TRL tokenizes a plain-text prompt itself
            raise KexaoneError(
                f"prompt {row.id}: TRL's tokenization of the rendered prompt differs from ours"
            )
        records.append({"prompt": text, "row_index": i})
    dataset = Dataset.from_list(records)
    zero_variance: list[float] = []  # per step: share of prompts whose G rewards are all equal
    eos = set(tokenizer.convert_tokens_to_ids([tokenizer.eos_token])) if tokenizer.eos_token else set()

    def math_reward(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                    row_index: list[int], **_: Any) -> list[float]:  # fmt: skip
        samples = []
        for ids, index in zip(completion_ids, row_index, strict=True):
            row, ids = ordered[index], list(ids)
            if ids and ids[-1] in stop_ids:  # like rl.decode_response: drop the final end-of-turn
                ids = ids[:-1]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            samples.append(Sample(row.messages, text, row.reference, row.task, dict(row.metadata)))
        rewards = grade(samples)
        g = cfg.group_size  # TRL hands each prompt's G completions over consecutively
        groups = [rewards[i : i + g] for i in range(0, len(rewards), g)]
        zero_variance.append(sum(len(set(x)) == 1 for x in groups) / len(groups))
        return rewards

    # the same MoE kernel our learners use (recipe's model.experts_implementation)
    model = load_policy(
        model_path, dtype=recipe.model.dtype, experts_implementation=recipe.model.experts_implementation
    )
    if cfg.freeze_router:
        freeze_router(model)
    gen_eos = model.generation_config.eos_token_id
    stop_ids = set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) | eos
    evaluate = shared_evaluator(recipe, tokenizer, held_rows, grade)
    eval_started = time.perf_counter()
    eval_before = evaluate(model)["accuracy"]
    eval_before_seconds = time.perf_counter() - eval_started

    timings: dict[str, list[float]] = {"gen_score_s": [], "rollout_s": [], "rollout_tokens": [],
                                       "learner_tokens": []}  # fmt: skip

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that records generation time, generated tokens and learner tokens per generation."""

        def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            timings["rollout_s"].append(time.perf_counter() - started)
            timings["rollout_tokens"].append(float(sum(len(c) for c in out[0])))
            return out

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            started = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            timings["gen_score_s"].append(time.perf_counter() - started)
            tokens = out["prompt_mask"].sum() + out["completion_mask"].sum()
            timings["learner_tokens"].append(float(tokens))
            return out

    every = cfg.eval_every_steps
    curve = [{"step": 0, "train_seconds": 0.0, "accuracy": eval_before}]
    clock: dict[str, Any] = {"start": 0.0, "eval_s": 0.0, "step_s": [], "begin": 0.0}

    class Clock(TrainerCallback):
        """Training-loop clock with evaluation excluded, and the held-out curve every ``every`` steps."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock["begin"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.perf_counter()
            clock["step_s"].append(now - clock["begin"])
            step = state.global_step
            if step == cfg.steps or (every and step % every == 0):
                trained = now - clock["start"] - clock["eval_s"]
                accuracy = evaluate(trainer.model)["accuracy"]
                clock["eval_s"] += time.perf_counter() - now
                curve.append({"step": step, "train_seconds": trained, "accuracy": accuracy})

    args = GRPOConfig(**trl_config_kwargs(recipe, str(recipe.resolved_run_dir / "trl"), micro_batch))
    setup_started = time.perf_counter()
    trainer = TimedGRPOTrainer(
        model=model, reward_funcs=[math_reward], args=args, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[Clock()],
    )  # fmt: skip
    setup_seconds = time.perf_counter() - setup_started
    trainer.train()
    if len(clock["step_s"]) != cfg.steps or len(timings["gen_score_s"]) != cfg.steps:
        raise KexaoneError(
            f"TRL ran {len(clock['step_s'])} steps / {len(timings['gen_score_s'])} generations, "
            f"expected {cfg.steps} of each (one generation per optimizer step)"
        )
    learner_s = [s - g for s, g in zip(clock["step_s"], timings["gen_score_s"], strict=True)]
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "curve": curve,
        "steps": cfg.steps,
        "learner_steps": cfg.steps,
        "train_seconds": curve[-1]["train_seconds"],
        "rollout_tokens": sum(timings["rollout_tokens"]),
        "rollout_seconds": sum(timings["rollout_s"]),
        "learner_tokens": sum(timings["learner_tokens"]),
        "learner_seconds": sum(learner_s),
        "reward_per_step": [h["reward"] for h in logs],
        "zero_variance_frac_per_step": zero_variance,  # TRL's frac_reward_zero_std is batch-wide here
        "setup_seconds": setup_seconds,
        "eval_before_seconds": eval_before_seconds,
        "process_wall_seconds": time.perf_counter() - process_start,
        "threads": f"one process, torch.set_num_threads({threads})",
        "trl_config": trl_config_kwargs(recipe, "<tmp>", micro_batch),
    }


# ------------------------------------------------------------------------------------------ parent
def run_child(arm: str, args: argparse.Namespace, checkpoint: str, overrides: list[str]) -> dict[str, Any]:
    """One run of ``arm`` in a fresh process; returns its result dict (with throughput derived)."""
    system, own = ARMS[arm]
    overrides = [*overrides, *own]
    with tempfile.TemporaryDirectory(prefix=f"kexa_tta_{arm}_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--child-out", str(out),
               "--checkpoint", checkpoint, "--recipe", args.recipe, "--run-dir", str(Path(tmp) / "run"),
               "--trl-threads", str(args.trl_threads),
               "--trl-micro-batch", str(args.trl_micro_batch)]  # fmt: skip
        cmd += [a for o in overrides for a in ("--set", o)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise BenchmarkError(f"{arm} run failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
    result["system"] = arm
    result["arm_overrides"] = own
    result["child_wall_seconds"] = time.perf_counter() - started
    minutes = result["train_seconds"] / 60
    result["steps_per_minute"] = result["steps"] / minutes if minutes > 0 else None
    result["learner_tokens_per_s"] = (
        result["learner_tokens"] / result["learner_seconds"] if result["learner_seconds"] > 0 else None
    )
    result["rollout_tokens_per_s"] = (
        result["rollout_tokens"] / result["rollout_seconds"] if result["rollout_seconds"] > 0 else None
    )
    # Where the loop time went: generation, learner, and the rest (grading, weight sync, batching, Ray).
    result["other_seconds"] = result["train_seconds"] - result["rollout_seconds"] - result["learner_seconds"]
    return result


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]: distinct non-negative integers."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchmarkError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise BenchmarkError(f"--seeds {text!r}: give distinct non-negative integers, e.g. 0,1,2")
    return seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--checkpoint", help="SFT export directory (<sft run_dir>/export); --quick builds a toy one"
    )
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, help="AGAPO recipe both systems read")
    ap.add_argument("--steps", type=int, default=40, help="RL steps per run (agapo.steps)")
    ap.add_argument("--eval-every", type=int, default=5, help="held-out evaluation every N steps")
    ap.add_argument("--num-eval", type=int, default=200, help="held-out prompts (data.num_eval)")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated recipe seeds, every arm runs each (default 0,1,2)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=1, help="runs per arm and seed, interleaved")
    ap.add_argument("--target", type=float, help="absolute held-out accuracy target")
    ap.add_argument("--target-gain", type=float, default=0.05,
                    help="target = accuracy before RL + this (used when --target is not given)")  # fmt: skip
    ap.add_argument("--trl-threads", type=int, default=1,
                    help="torch threads of the TRL process (our actors run 1 each)")  # fmt: skip
    ap.add_argument("--trl-micro-batch", type=int, default=32, help="TRL per_device_train_batch_size")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe override for both systems (repeatable)")  # fmt: skip
    known = ", ".join(ARMS)
    ap.add_argument("--arms", default="ours,trl",
                    help=f"comma-separated arms, interleaved in this order; known: {known}")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (~1 min): 2 steps, 1 repeat, seed 0")
    ap.add_argument("--out", default="benchmarks/results/rl_time_to_accuracy.json")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        if args.child:
            recipe = stage_recipe(args.recipe, args.checkpoint, args.set, args.run_dir)
            if args.child == "ours":
                result = child_ours(recipe)
            else:
                result = child_trl(recipe, args.trl_threads, args.trl_micro_batch)
            Path(args.child_out).write_text(json.dumps(result, indent=2))
            return
        orchestrate(args)
    except BenchmarkError as exc:
        sys.exit(f"rl_time_to_accuracy: {exc}")


def orchestrate(args: argparse.Namespace) -> None:
    """Interleaved runs of both systems, the target, medians, ratios and the results JSON."""
    if args.quick:
        args.steps, args.eval_every, args.num_eval, args.repeats = 2, 1, 4, 1
    seeds = parse_seeds(args.seeds if args.seeds is not None else ("0" if args.quick else "0,1,2"))
    for name in ("steps", "repeats", "num_eval", "trl_threads", "trl_micro_batch"):
        if getattr(args, name) < 1:
            raise BenchmarkError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms or len(set(arms)) != len(arms):
        raise BenchmarkError(f"--arms {args.arms!r}: give distinct arms out of {', '.join(ARMS)}")
    if "ours" not in arms:
        raise BenchmarkError("--arms must include 'ours' (the target is set from its accuracy before RL)")
    if args.eval_every < 0:
        raise BenchmarkError(f"--eval-every must be >= 0, got {args.eval_every}")
    if not (REPO / args.recipe).is_file() and not Path(args.recipe).is_file():
        raise BenchmarkError(f"--recipe {args.recipe!r} does not exist")
    started = time.perf_counter()
    info = machine_info()
    overrides = [*(QUICK_OVERRIDES if args.quick else []), *QUIET_OVERRIDES,
                 f"agapo.steps={args.steps}", f"agapo.eval_every_steps={args.eval_every}",
                 f"data.num_eval={args.num_eval}", *args.set]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kexa_tta_ckpt_") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            if not args.quick:
                raise BenchmarkError("--checkpoint is required (an SFT export directory) unless --quick")
            from kexaone_align.models import build_tiny_checkpoint

            checkpoint = str(build_tiny_checkpoint(Path(tmp) / "toy", seed=0))
        elif not (Path(checkpoint) / "config.json").is_file():
            raise BenchmarkError(
                f"--checkpoint {checkpoint!r} is not a checkpoint directory (no config.json)"
            )
        checkpoint = str(Path(checkpoint).resolve())
        runs = []
        for seed in seeds:
            for repeat in range(args.repeats):
                for system in arms:
                    result = run_child(system, args, checkpoint, [*overrides, f"seed={seed}"])
                    result["seed"], result["repeat"] = seed, repeat
                    runs.append(result)
                    report(result)
    befores = {
        seed: median([r["curve"][0]["accuracy"] for r in runs if r["seed"] == seed and r["system"] == "ours"])
        for seed in seeds
    }
    targets = {seed: args.target if args.target is not None else befores[seed] + args.target_gain
               for seed in seeds}  # fmt: skip
    for r in runs:
        r["time_to_target_s"] = time_to_target(r["curve"], targets[r["seed"]])
    same_start = all(r["curve"][0]["accuracy"] == befores[r["seed"]] for r in runs)
    summary = summarize_seeds(runs, targets, arms)
    summary["before_rl_identical_across_arms_within_each_seed"] = same_start
    command = "python benchmarks/rl_time_to_accuracy.py " + shlex.join(sys.argv[1:])
    payload = {
        "benchmark": "rl_time_to_accuracy",
        "command": command,
        "machine": info,
        "settings": {
            "checkpoint": checkpoint if args.checkpoint else "toy (build_tiny_checkpoint seed 0)",
            "recipe": args.recipe,
            "overrides": overrides,
            "steps": args.steps,
            "eval_every": args.eval_every,
            "num_eval": args.num_eval,
            "seeds": seeds,
            "repeats": args.repeats,
            "target": {
                "absolute": args.target,
                "gain": args.target_gain,
                "eval_before_ours_median": median(list(befores.values())),
                "eval_before_per_seed": {str(k): v for k, v in befores.items()},
            },
            "trl_threads": args.trl_threads,
            "trl_micro_batch": args.trl_micro_batch,
            "quick": args.quick,
            "arms": {a: {"system": ARMS[a][0], "overrides": ARMS[a][1]} for a in arms},
            "order": "per seed, repeats interleaved: " + ", ".join(arms) + " per repeat",
        },
        "summary": summary,
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    write_json(args.out, payload)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_seed"}, indent=1))
    print(f"reproduce: cd {REPO} && . .venv/bin/activate && {command}")


def report(result: dict[str, Any]) -> None:
    """One line per finished run."""
    print(f"[seed {result['seed']}, {result['repeat']}] {result['system']}: {result['steps']} steps in "
          f"{result['train_seconds']:.1f}s "
          f"({result['steps_per_minute']:.2f} steps/min), learner "
          f"{result['learner_tokens_per_s'] or 0:.0f} tok/s, rollout "
          f"{result['rollout_tokens_per_s'] or 0:.0f} tok/s, accuracy "
          f"{[round(p['accuracy'], 3) for p in result['curve']]}", flush=True)  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
