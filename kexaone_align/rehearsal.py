"""A dress rehearsal of a GPU-cluster pipeline recipe on one CPU machine, through the code path a cluster run
takes (``kexaone-align rehearse recipes/k-exaone-236b/pipeline.yaml``).

Every stage recipe of the pipeline runs as written, except for what a CPU machine cannot hold, which is
overridden (and written to ``<out>/rehearsal.yaml`` so the run can be read and repeated):

* the model: a checkpoint built from the recipe's ``model.architecture`` with the sizes scaled down and
  the structure kept (the sliding/global layer pattern, the dense first layers, the shared expert, top-k
  routing, K-EXAONE's chat format through the offline tokenizer; head dim 32, the smallest vLLM's CPU
  attention takes);
* the data: small local files in the recipe's formats (chat rows for SFT, prompt rows with a task and a
  reference for AGAPO and GROUPER, AGAPO's mixed with tool episodes against the calculator and the
  stateful ``orders`` environment), generated offline;
* the cluster: a local Ray with the GPUs declared (``cluster.simulated_gpus``), so every actor asks for
  the GPUs and bundles of the cluster layout; 2 ZeRO-3 learners (fp32, gloo), vLLM rollout engines
  (``rollout.backend`` as in the recipe: vLLM's CPU build), 1 MiB weight-sync buckets (every push has
  many), a few steps per stage with a checkpoint after each;
* the judge: the ``local`` backend on the scaled checkpoint instead of an HTTP endpoint.

Then the run is killed (SIGKILL to the driver and everything it started) once the second stage has
written its first checkpoint, and started again: the pipeline must skip the finished stage, resume the
killed one from its checkpoint and finish. What this cannot show (NCCL, bf16 kernels, tensor parallelism
across real GPUs, several nodes, GPU memory, speed) is listed in the README.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kexaone_align.config import Recipe, load_pipeline_stages, load_recipe
from kexaone_align.errors import KexaoneError

logger = logging.getLogger(__name__)

# What a CPU can hold; the layer pattern, dense-first layers, shared expert and top-k are the recipe's.
SCALED = {
    "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "intermediate_size": 256, "moe_intermediate_size": 64, "num_experts": 8, "sliding_window": 16,
    "max_position_embeddings": 1024,
}  # fmt: skip
LAYER_GROUPS = 2  # sliding-window groups (pattern - 1 sliding layers + 1 global each)
SIMULATED_GPUS_PER_NODE = 4
STEPS = {"sft": 3, "agapo": 3, "grouper": 2}
TOOL_ROWS = {"rl_tools_train": 6, "rl_tools_heldout": 2}  # calculator episodes (+ orders tasks)
ROWS = {"sft_train": 64, "sft_eval": 16, "rl_train": 32, "rl_heldout": 8, "pref_train": 16, "pref_heldout": 4}


def scaled_architecture(recipe: Recipe) -> dict[str, Any]:
    """The recipe's architecture at CPU size: sizes from ``SCALED``, structure from the recipe."""
    arch = recipe.model.architecture if recipe.model is not None else None
    if arch is None:
        raise KexaoneError(f"{recipe.source_path}: the rehearsal needs model.architecture to scale down")
    pattern = arch.sliding_window_pattern
    dense = arch.first_k_dense_replace or 0
    layers = max(pattern * LAYER_GROUPS, dense + 1)
    top_k = min(arch.num_experts_per_tok, SCALED["num_experts"] // 2)
    return {  # transformers' ExaoneMoeConfig keywords; the layer pattern spelled out per layer
        **SCALED,
        "num_hidden_layers": layers,
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                        for i in range(layers)],
        "mlp_layer_types": ["dense" if i < dense else "sparse" for i in range(layers)],
        "num_experts_per_tok": max(1, top_k),
        "num_shared_experts": arch.num_shared_experts,
    }  # fmt: skip


def prepare_assets(first_stage: Recipe, out: Path, seed: int) -> dict[str, Path]:
    """The scaled checkpoint and the data files (reused when they already exist: a resumed rehearsal)."""
    from kexaone_align.data.tiny_tasks import write_tiny_dataset
    from kexaone_align.models import build_tiny_checkpoint

    assets = out / "assets"
    ckpt = assets / "checkpoint"
    if not (ckpt / "config.json").is_file():
        build_tiny_checkpoint(ckpt, seed=seed, architecture=scaled_architecture(first_stage))
    data = assets / "data"
    if not (data / "manifest.json").is_file():
        write_tiny_dataset(data, seed, sizes=ROWS)
        write_tool_rows(data, seed)
    return {"checkpoint": ckpt, **{name: data / f"{name}.jsonl" for name in (*ROWS, *TOOL_ROWS)}}


def write_tool_rows(data: Path, seed: int) -> None:
    """AGAPO prompt rows that are tool episodes, mixed into the RL data: calculator episodes (graded by the
    ``math`` verifier on the answer) and the stateful ``orders`` environment (scored on its final state)."""
    from kexaone_align.data.tiny_tasks import write_jsonl
    from kexaone_align.data.tiny_tools import generate_tool_prompts
    from kexaone_align.environments import resolve_environment
    from kexaone_align.environments.stateful import rows_from_environment

    orders = rows_from_environment(resolve_environment("orders"), "orders")
    for name, split in (("rl_tools_train", "train"), ("rl_tools_heldout", "heldout")):
        rows = generate_tool_prompts(TOOL_ROWS[name], seed, split)
        write_jsonl(data / f"{name}.jsonl", rows + (orders[:2] if split == "train" else orders[2:3]))


def stage_overrides(stage: Recipe, assets: dict[str, Path]) -> list[str]:
    """Dotted overrides that fit one stage recipe of the cluster onto this machine (see the module doc)."""
    files = {
        "sft": (("sft_train",), ("sft_eval",)),
        "agapo": (("rl_train", "rl_tools_train"), ("rl_heldout", "rl_tools_heldout")),
        "grouper": (("pref_train",), ("pref_heldout",)),
    }[stage.stage]
    train, held = (",".join(str(assets[name]) for name in names) for names in files)
    out = [
        f"model.path={assets['checkpoint']}", "model.dtype=float32", "model.attn_implementation=sdpa",
        f"data.train_files=[{train}]", f"data.eval_files=[{held}]",
        "cluster.address=null", "cluster.nodes=1", f"cluster.gpus_per_node={SIMULATED_GPUS_PER_NODE}",
        "cluster.simulated_gpus=true", "cluster.cpus_per_actor=0.5",
        "learners.num_learners=2", "learners.zero_stage=3", "learners.precision=fp32",
        "learners.backend=gloo", "learners.micro_batch_tokens=2048", "learners.warmup_steps=0",
        "checkpoint.every_steps=1", "checkpoint.keep_last=2", "checkpoint.resume=auto",
        "logging.progress_bar=false", "logging.tensorboard=false",
    ]  # fmt: skip
    steps = STEPS[stage.stage]
    if stage.stage == "sft":
        return [*out, f"sft.max_steps={steps}", "sft.batch_size=8", "sft.max_seq_len=512",
                "sft.eval_every_steps=0"]  # fmt: skip
    out += [
        "data.max_prompt_tokens=384", "rollout.num_workers=1", "rollout.tensor_parallel_size=1",
        "rollout.max_new_tokens=48", "rollout.batch_size=32", "rollout.weight_sync_bucket_mb=1",
        "rollout.mtp_speculative=false", "rollout.job_timeout_s=900",
    ]  # fmt: skip
    if stage.stage == "agapo":
        return [*out, f"agapo.steps={steps}", "agapo.prompts_per_step=4", "agapo.group_size=4",
                "agapo.eval_every_steps=0", "agapo.zero_variance_filter=false"]  # fmt: skip
    judge = stage.grouper.reward.judge if stage.grouper is not None else None
    if judge is not None and judge.backend != "none":
        out += ["grouper.reward.judge.backend=local", f"grouper.reward.judge.model={assets['checkpoint']}",
                "grouper.reward.judge.base_url=null", "grouper.reward.judge.retries=0",
                "grouper.reward.judge.max_concurrency=4"]  # fmt: skip
    return [*out, f"grouper.steps={steps}", "grouper.prompts_per_step=4", "grouper.group_size=4",
            "grouper.eval_every_steps=0"]  # fmt: skip


def write_rehearsal(pipeline_path: str | Path, out: str | Path) -> Path:
    """Build the assets and write ``<out>/rehearsal.yaml``: the pipeline with every stage fitted to CPU."""
    pipeline_path, out = Path(pipeline_path).resolve(), Path(out).resolve()
    pipeline = load_recipe(pipeline_path)
    if pipeline.stage != "pipeline" or not pipeline.pipeline:
        raise KexaoneError(f"{pipeline_path}: the rehearsal runs a pipeline recipe (stage: pipeline)")
    stages = load_pipeline_stages(pipeline)
    out.mkdir(parents=True, exist_ok=True)
    assets = prepare_assets(stages[0], out, pipeline.seed)
    entries = []
    for entry, stage in zip(pipeline.pipeline, stages, strict=True):
        recipe_file = (pipeline_path.parent / entry.recipe).resolve()
        entries.append(
            {"recipe": str(recipe_file), "overrides": [*entry.overrides, *stage_overrides(stage, assets)]}
        )
    doc = {"stage": "pipeline", "name": f"{pipeline.name or 'pipeline'}-rehearsal", "seed": pipeline.seed,
           "pipeline": entries, "run_dir": str(out / "run")}  # fmt: skip
    path = out / "rehearsal.yaml"
    header = f"# CPU dress rehearsal of {pipeline_path} (kexaone-align rehearse); generated, do not edit.\n"
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    load_pipeline_stages(load_recipe(path))  # every fitted stage validates before anything runs
    return path


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (local Ray, actors, vLLM engine processes)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [psutil.Process(proc.pid), *family] if proc.poll() is None else family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def _stage_checkpointed(run_dir: Path, index: int) -> bool:
    from kexaone_align.runtime.checkpoint import complete_checkpoints

    dirs = list(run_dir.glob(f"{index:02d}_*/checkpoints"))
    return any(complete_checkpoints(d) for d in dirs)


def rehearse(
    pipeline_path: str | Path, out: str | Path, *, kill_stage: int | None = 1, timeout_s: float = 3600.0
) -> dict[str, Any]:
    """Write the rehearsal, run it, kill it once stage ``kill_stage`` has a checkpoint (None: no kill),
    run it again to completion, and return the pipeline summary (with ``rehearsal`` facts added)."""
    path = write_rehearsal(pipeline_path, out)
    run_dir = Path(out).resolve() / "run"
    log = Path(out).resolve() / "rehearsal.log"
    cmd = [sys.executable, "-m", "kexaone_align", "run", str(path)]
    facts: dict[str, Any] = {"recipe": str(path), "killed": False}
    started = time.perf_counter()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=_env())
        try:
            while proc.poll() is None:
                if kill_stage is not None and _stage_checkpointed(run_dir, kill_stage):
                    kill_process_tree(proc)
                    facts["killed"] = True
                    facts["killed_after_s"] = round(time.perf_counter() - started, 1)
                    logger.warning("rehearsal: killed the run once stage %d had a checkpoint", kill_stage)
                    break
                if time.perf_counter() - started > timeout_s:
                    raise KexaoneError(f"rehearsal: no result after {timeout_s:g}s (log: {log})")
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                kill_process_tree(proc)
        if proc.returncode not in (0, -signal.SIGKILL) and not facts["killed"]:
            raise KexaoneError(f"rehearsal run failed with exit code {proc.returncode} (log: {log})")
        if facts["killed"] or proc.returncode != 0:
            rest = max(1.0, timeout_s - (time.perf_counter() - started))
            again = subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=rest, check=False, env=_env()
            )
            if again.returncode != 0:
                raise KexaoneError(
                    f"resumed rehearsal run failed with exit code {again.returncode} (log: {log})"
                )
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    facts["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["rehearsal"] = facts
    (Path(out).resolve() / "rehearsal_summary.json").write_text(
        json.dumps(summary, indent=2), encoding="utf-8"
    )
    return summary


def _env() -> dict[str, str]:
    """Environment for the rehearsal's runs (offline hub access, CPU DeepSpeed)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env
