"""Glue every stage shares, so a stage file holds only its own loop.

- ``prepare_policy(recipe)``: the checkpoint to start from (a tiny model built offline into
  ``<run_dir>/init``, or the recipe's pretrained path); ``tokenizer_source`` says where its tokenizer lives.
- ``start_ray(recipe)``: thread budget for this process, then a local or remote Ray cluster.
- ``make_learners(recipe, model_path, total_steps)``: the DeepSpeed learner group the recipe describes.
- ``StageRun(recipe, total_steps)``: run dir, metrics logger, progress bar, periodic atomic checkpoints
  (learner state + trainer state) and ``checkpoint.resume`` handling.
- ``finish_stage(run, learners, summary)``: final ``export_hf`` (with tokenizer), plots and
  ``<run_dir>/summary.json``.
- ``run_with_restarts(run_stage, recipe)``: a stage run restarted from its newest checkpoint after a
  Ray failure (a dead learner), up to ``checkpoint.max_restarts`` times.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from kexaone_align.config import Recipe, learner_settings
from kexaone_align.errors import KexaoneError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
INIT_DIR = "init"
SUMMARY_FILE = "summary.json"
ROLLOUTS_FILE = "rollouts.jsonl"  # AGAPO's logging.save_rollouts: one row per graded response, by step


# ------------------------------------------------------------------------------------ policy
def prepare_policy(recipe: Recipe) -> Path:
    """Directory (or hub name, as a Path) of the checkpoint the stage starts from.

    ``model.source: tiny`` builds the toy model and its tokenizer into ``<run_dir>/init`` once (seeded,
    so a resumed run rebuilds the same one); ``pretrained`` uses ``model.path`` as given.
    """
    if recipe.model is None:
        raise KexaoneError(f"stage {recipe.stage!r} needs a model section")
    model = recipe.model
    if model.source == "tiny":
        from kexaone_align.models import build_tiny_checkpoint

        init = recipe.resolved_run_dir / INIT_DIR
        if not (init / "config.json").is_file():
            arch = model.architecture.to_hf_kwargs() if model.architecture is not None else None
            build_tiny_checkpoint(init, seed=recipe.seed, architecture=arch)
        return init
    path = Path(str(model.path)).expanduser()
    if str(model.path).startswith((".", "/", "~")) and not path.is_dir():
        raise KexaoneError(f"model.path {model.path!r} does not exist")
    return path


def tokenizer_source(recipe: Recipe, model_path: str | Path) -> Path:
    """Where the stage's tokenizer is loaded from (and copied into the export).

    ``tokenizer.path`` wins, then the model checkpoint. A ``tokenizer.chat_template`` override or
    ``tokenizer.source: tiny`` with a pretrained model writes a tokenizer into ``<run_dir>/tokenizer``.
    """
    tok = recipe.tokenizer
    if tok.source == "tiny" and recipe.model is not None and recipe.model.source == "pretrained":
        from kexaone_align.models import build_tokenizer

        base: Any = build_tokenizer()
    else:
        base = Path(tok.path).expanduser() if tok.path else Path(model_path)
        if tok.chat_template is None:
            return base
    out = recipe.resolved_run_dir / "tokenizer"
    if isinstance(base, Path):
        from kexaone_align.models import load_tokenizer

        base = load_tokenizer(base)
    if tok.chat_template is not None:
        template = Path(tok.chat_template).expanduser()
        if not template.is_file():
            raise KexaoneError(f"tokenizer.chat_template {tok.chat_template!r} does not exist")
        base.chat_template = template.read_text(encoding="utf-8")
    base.save_pretrained(out)
    return out


def load_stage_tokenizer(recipe: Recipe, model_path: str | Path) -> Any:
    """The tokenizer the stage should tokenize with (see ``tokenizer_source``)."""
    from kexaone_align.models import load_tokenizer

    return load_tokenizer(tokenizer_source(recipe, model_path))


# ------------------------------------------------------------------------------- Ray, learners
def _actor_cpus(recipe: Recipe) -> float:
    """CPUs the stage's actors reserve (colocated rollout actors live inside the learners' bundles)."""
    cluster, learners = recipe.cluster, recipe.learners.num_learners
    if recipe.stage not in ("agapo", "grouper"):
        return learners * cluster.cpus_per_actor
    if cluster.gpus_per_node > 0 and cluster.placement == "colocated":
        return 2 * learners * cluster.cpus_per_actor
    return (learners + recipe.rollout.num_workers) * cluster.cpus_per_actor


_OWN_LOCAL_RAY: dict[str, str | None] = {"node_id": None}  # the local Ray start_ray itself started


def start_ray(recipe: Recipe) -> None:
    """Give this driver a sensible torch thread count, then connect to / start Ray.

    On a local machine the driver and the actors share the cores; the driver mostly waits, so it keeps
    what the actors do not reserve (at least one thread). A local Ray is told it has enough CPUs for the
    recipe's actors even on a 2-core box (they time-share; each actor runs one torch thread).

    Ray never fails an actor it cannot place: it waits. So the CPUs are checked up front. A local Ray
    this function started for an earlier, smaller stage (a pipeline's SFT before a 2 + 2 actor AGAPO)
    is restarted larger; any other cluster without room is an error that names the numbers.
    """
    import ray

    cores = os.cpu_count() or 1
    need = _actor_cpus(recipe)
    torch.set_num_threads(max(1, int(cores - need)))
    from kexaone_align.runtime.cluster import init_ray

    address = recipe.cluster.address
    if address is None:
        cluster = recipe.cluster
        gpus = cluster.nodes * cluster.gpus_per_node if cluster.simulated_gpus else None  # declared, not real
        ours = ray.is_initialized() and _OWN_LOCAL_RAY["node_id"] == _ray_node_id()
        short_of_gpus = gpus is not None and ours and ray.cluster_resources().get("GPU", 0.0) < gpus
        if ours and (_ray_cpus() < need or short_of_gpus):
            logger.warning("restarting the local Ray with room for %s actor CPUs", need)
            ray.shutdown()
        if not ray.is_initialized():  # address="local": our own cluster, never another process's Ray
            ray.init(
                address="local", num_cpus=max(cores, int(need + 0.999) + 1), num_gpus=gpus,
                include_dashboard=False, log_to_driver=False, logging_level="warning",
            )  # fmt: skip
            _OWN_LOCAL_RAY["node_id"] = _ray_node_id()
    else:
        init_ray(address)
    have = _ray_cpus()
    if have >= need:
        return
    actors = "learners.num_learners" + (
        " + rollout.num_workers" if recipe.stage in ("agapo", "grouper") else ""
    )
    message = (
        f"has {have:g} CPUs but the recipe's actors need {need:g} ({actors}, times "
        f"cluster.cpus_per_actor {recipe.cluster.cpus_per_actor:g})"
    )
    if address is not None:  # an autoscaling cluster may still grow
        logger.warning("the Ray cluster at %s %s; actors wait until it has room", address, message)
        return
    raise KexaoneError(
        f"the Ray session this process already runs {message}; Ray would wait for them forever. "
        "Shut that session down (ray.shutdown()) or lower those numbers"
    )


def _ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _ray_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def make_learners(
    recipe: Recipe, model_path: str | Path, total_steps: int, overrides: dict[str, Any] | None = None
) -> Any:
    """A ``LearnerGroup`` for the recipe's ``learners``/``cluster`` sections, set up and ready.

    ``overrides`` are extra ``LearnerConfig`` fields a stage needs (e.g. ``loss_aggregation``).
    """
    from kexaone_align.runtime.cluster import LearnerResources, create_learner_group
    from kexaone_align.runtime.learner import LearnerConfig

    settings = learner_settings(recipe, total_steps)
    if recipe.learners.offload_optimizer:
        settings["ds_config_overrides"] = {
            "zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": False}}
        }
    config = LearnerConfig(**{**settings, **(overrides or {})})
    cluster = recipe.cluster
    gpus = 1.0 if cluster.gpus_per_node > 0 else 0.0
    placement = cluster.placement if gpus > 0 else "disaggregated"
    shared = placement == "colocated" and recipe.stage in ("agapo", "grouper")  # a rollout rank per GPU
    resources = LearnerResources(
        num_cpus=cluster.cpus_per_actor, num_gpus=gpus, simulated_gpus=cluster.simulated_gpus,
        bundle_cpus=2 * cluster.cpus_per_actor if shared else None,
    )  # fmt: skip
    return create_learner_group(
        recipe.learners.num_learners, model_path, config, placement=placement, resources=resources
    )


# ----------------------------------------------------------------------------- the stage run
class StageRun:
    """Run directory, metrics, progress and checkpoints of one stage (use as a context manager).

    ``step`` is the number of optimizer steps already done: 0 for a fresh run, the checkpoint's step
    after ``restore``. Stage loops run ``while run.step < run.total_steps``, call ``run.log(metrics)``
    after each step (which advances ``step``) and ``run.maybe_checkpoint(learners, state)``.
    """

    def __init__(self, recipe: Recipe, total_steps: int) -> None:
        from kexaone_align.observe import MetricsLogger
        from kexaone_align.observe.wandb_logger import open_wandb

        if total_steps < 1:
            raise KexaoneError(f"stage {recipe.stage!r}: nothing to do (total_steps={total_steps})")
        self.recipe = recipe
        self.stage = recipe.stage
        self.total_steps = int(total_steps)
        self.run_dir = recipe.resolved_run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_root = self.run_dir / CHECKPOINT_DIR
        wandb = open_wandb(
            recipe.logging.wandb,
            run_dir=self.run_dir,
            default_name=recipe.name or recipe.stage,
            config=recipe.model_dump(mode="json"),
        )
        self.metrics = MetricsLogger(
            self.run_dir, tensorboard=recipe.logging.tensorboard, jsonl=recipe.logging.jsonl, wandb=wandb
        )
        self._tables: list[tuple[str, list[dict[str, Any]]]] = []
        self.step = 0
        self.resumed_from: Path | None = None
        self.started = time.perf_counter()
        self._progress = None
        self.last_metrics: dict[str, Any] = {}

    # -- context
    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close the metrics sinks and the progress bar."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.metrics.close()

    @property
    def progress(self) -> Any:
        """The progress bar, created on first use so it starts at the resumed step."""
        if self._progress is None:
            from kexaone_align.observe import Progress

            self._progress = Progress(
                self.stage, self.total_steps, enabled=self.recipe.logging.progress_bar, initial=self.step
            )
        return self._progress

    # -- resume
    def resume_point(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` asks for: newest complete one ('auto'), none, or a path."""
        from kexaone_align.runtime.checkpoint import is_complete, latest_complete_checkpoint

        resume = self.recipe.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":
            return latest_complete_checkpoint(self.checkpoint_root)
        path = Path(resume).expanduser()
        if not path.is_dir() or not is_complete(path):
            raise KexaoneError(f"checkpoint.resume: {resume!r} is not a complete checkpoint directory")
        return path

    def restore(self, learners: Any) -> dict[str, Any]:
        """Load learner and trainer state from ``resume_point()``; returns the trainer state ({} if fresh)."""
        from kexaone_align.runtime.checkpoint import load_trainer_state

        point = self.resume_point()
        if point is None:
            self._drop_metrics_after(0)
            return {}
        learners.load(point)
        state = load_trainer_state(point)
        self.step = int(state.get("step", 0))
        self.resumed_from = point
        self._drop_metrics_after(self.step)
        logger.warning("%s: resumed from %s (step %d)", self.stage, point, self.step)
        if self.step >= self.total_steps:
            logger.warning(
                "%s: checkpoint is already at step %d of %d", self.stage, self.step, self.total_steps
            )
        return state

    def _drop_metrics_after(self, step: int) -> None:
        """Drop this stage's metrics.jsonl rows past ``step``: a crashed run logged them, they are redone.

        TensorBoard events are append-only and keep both; metrics.jsonl and the plots stay clean. A W&B run
        is a new run per attempt, so it holds only what this attempt logs.
        """
        _drop_rollouts_after(self.run_dir / ROLLOUTS_FILE, step)
        self.metrics.drop_rows(lambda row: row.get("stage") != self.stage or int(row.get("step", 0)) <= step)

    # -- per step
    def log(self, metrics: dict[str, Any], *, advance: bool = True) -> None:
        """Record the metrics of the step just taken (``advance`` moves ``step`` on by one first)."""
        if advance:
            _ = self.progress  # created (at the step count before this one) on the first step
            self.step += 1
        self.last_metrics = dict(metrics)
        if self.step % self.recipe.logging.log_every_steps == 0 or self.step == self.total_steps:
            self.metrics.log(self.stage, self.step, metrics)
        if advance:
            self.progress.update(metrics)

    def log_eval(self, metrics: dict[str, Any]) -> None:
        """Record evaluation metrics at the current step (always written), with the sample tables
        ``log_samples`` kept since the last call."""
        self.metrics.log(self.stage, self.step, metrics)
        for label, rows in self._tables:
            self.metrics.log_table(self.stage, self.step, label, rows)
        self._tables.clear()

    def log_samples(self, label: str, rows: list[dict[str, Any]]) -> None:
        """Keep an evaluation's sample rows (prompt, response, reward, ...); ``log_eval`` writes them at
        the step its metrics are logged at (an evaluation can run before the step counter moves on)."""
        self._tables.append((label, rows))

    def maybe_checkpoint(self, learners: Any, state: dict[str, Any] | None = None) -> Path | None:
        """Checkpoint when ``checkpoint.every_steps`` divides the current step (never at step 0)."""
        from kexaone_align.runtime import faults

        every = self.recipe.checkpoint.every_steps
        saved = None
        if every and self.step and self.step % every == 0:
            saved = self.save_checkpoint(learners, state)
        faults.fire("stage.step_done", run=self, learners=learners)  # tests inject failures here
        return saved

    def save_checkpoint(self, learners: Any, state: dict[str, Any] | None = None) -> Path:
        """Atomically write ``checkpoints/step_N`` (learner state + trainer state), prune old ones."""
        from kexaone_align.runtime.checkpoint import (
            atomic_checkpoint,
            prune_checkpoints,
            save_trainer_state,
            step_dir_name,
        )

        final = self.checkpoint_root / step_dir_name(self.step)
        with atomic_checkpoint(final) as tmp:
            learners.save(tmp)
            save_trainer_state(tmp, {**(state or {}), "step": self.step})
        prune_checkpoints(self.checkpoint_root, self.recipe.checkpoint.keep_last)
        return final

    @property
    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started


def finish_stage(
    run: StageRun, learners: Any, summary: dict[str, Any], *, tokenizer: str | Path | None = None
) -> dict[str, Any]:
    """Export the policy (``<run_dir>/export``, with tokenizer), draw plots, write ``summary.json``.

    ``summary`` is the stage's own findings (e.g. ``{"eval": {...}}``); the returned dict adds the stage,
    steps, export path, resume point, final train metrics and wall time, and is what was written.
    """
    from kexaone_align.observe import plot_metrics, read_metrics

    recipe = run.recipe
    out: dict[str, Any] = {"stage": run.stage, "name": recipe.name, "steps": run.step, **summary}
    if recipe.checkpoint.export:
        export = run.run_dir / EXPORT_DIR
        learners.export_hf(export, tokenizer)
        out["export"] = str(export)
    out["resumed_from"] = str(run.resumed_from) if run.resumed_from else None
    out["final_train_metrics"] = {k: v for k, v in run.last_metrics.items() if isinstance(v, int | float)}
    run.metrics.close()
    if recipe.logging.plots and run.metrics.jsonl_path.is_file():
        rows = read_metrics(run.metrics.jsonl_path)
        out["plots"] = [str(p) for p in plot_metrics(rows, run.run_dir / "plots")]
    out["wall_seconds"] = round(run.wall_seconds, 2)
    write_summary(run.run_dir, out)
    return out


def _drop_rollouts_after(path: Path, step: int) -> None:
    """Drop ``rollouts.jsonl`` rows of steps past ``step`` (redone after a resume, so never twice)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(row.get("step", 0)) <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept), encoding="utf-8")


# ------------------------------------------------------------------------------------ restarts
_PEER_LOST = ("connection closed", "connection reset", "broken pipe", "gloo", "nccl", "timed out")


def is_restartable(exc: BaseException) -> bool:
    """A failure worth a restart from the last checkpoint: the infrastructure failed, not the code or data.

    Restartable: an actor or worker process died or became unreachable, a node or its raylet was lost,
    an object was lost, Ray ran out of memory or disk, a placement group went away; and, raised inside a
    Ray task, any of those or a torch.distributed / connection error (a collective whose peer died).
    Not restartable, since a rerun repeats them: an exception the task's own code raised (``ValueError``,
    ``KeyError``, ``KexaoneError``, ... from bad data or a bug), and any exception of the driver itself.
    """
    from ray import exceptions as rex

    infrastructure = (
        rex.RayActorError, rex.NodeDiedError, rex.WorkerCrashedError, rex.LocalRayletDiedError,
        rex.ObjectLostError, rex.RaySystemError, rex.OutOfMemoryError, rex.OutOfDiskError,
        rex.ObjectStoreFullError, rex.RpcError, rex.ActorPlacementGroupRemoved, rex.TaskPlacementGroupRemoved,
    )  # fmt: skip
    if isinstance(exc, KexaoneError):
        return False
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause
        if cause is None or cause is exc:
            return False
        if isinstance(cause, rex.RayError):
            return is_restartable(cause)
        return _peer_lost(cause)
    return isinstance(exc, infrastructure)


def _peer_lost(exc: BaseException) -> bool:
    """A task's own exception that means a process it talked to went away (not a code or data error)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError | ConnectionError):
        return True
    return type(exc) is RuntimeError and any(word in str(exc).lower() for word in _PEER_LOST)


def run_with_restarts(run_stage: Any, recipe: Recipe) -> dict[str, Any]:
    """``run_stage(recipe)``, restarted from the newest complete checkpoint after a restartable failure.

    Up to ``checkpoint.max_restarts`` restarts (a warning each), then a ``KexaoneError`` naming the count.
    Between attempts the Ray session is shut down, so every actor and placement group of the failed
    attempt is gone even if a stage leaked one (the next attempt starts or reconnects to Ray). A restart
    resumes from a checkpoint the failed attempts wrote (or the one the recipe resumed from); with none,
    the stage starts again under the recipe's own ``checkpoint.resume``. The returned summary (and
    ``summary.json``) records ``restarts``.
    """
    from kexaone_align.runtime.checkpoint import latest_complete_checkpoint

    limit = recipe.checkpoint.max_restarts
    root = recipe.resolved_run_dir / CHECKPOINT_DIR
    started = time.time()
    attempt_recipe, restarts = recipe, 0
    while True:
        try:
            summary = run_stage(attempt_recipe)
            break
        except Exception as exc:
            if not is_restartable(exc):
                raise
            if restarts >= limit:
                raise KexaoneError(
                    f"stage {recipe.stage!r} failed ({type(exc).__name__}: {_first_line(exc)}) after "
                    f"{restarts} restart(s); checkpoint.max_restarts={limit}"
                ) from exc
            restarts += 1
            _shutdown_ray()
            point = latest_complete_checkpoint(root)
            if point is not None and point.stat().st_mtime >= started - 1.0:  # written by an attempt
                checkpoint = recipe.checkpoint.model_copy(update={"resume": str(point)})
                attempt_recipe = recipe.model_copy(update={"checkpoint": checkpoint})
            logger.warning(
                "%s: %s (%s); restart %d of %d, resuming from %s", recipe.stage, type(exc).__name__,
                _first_line(exc), restarts, limit, attempt_recipe.checkpoint.resume,
            )  # fmt: skip
    if isinstance(summary, dict):
        summary["restarts"] = restarts
        if (recipe.resolved_run_dir / SUMMARY_FILE).is_file():
            write_summary(recipe.resolved_run_dir, summary)
    return summary


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> Path:
    """``<run_dir>/summary.json`` (indented, non-JSON values as strings)."""
    path = Path(run_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return path
