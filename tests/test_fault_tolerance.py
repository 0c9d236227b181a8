"""Fault tolerance of the distributed runtime, end to end on the tiny model (Ray, DeepSpeed, hf rollout).

Every faulty AGAPO run is compared with one uninterrupted run of the same recipe (2 rollout workers,
3 synchronous steps, a checkpoint at step 2): a killed rollout worker, a crash-and-resume and a killed
learner must all give the same prompts, responses, rewards and losses, with no step lost or repeated.
Faults are injected at the named points of ``kexaone_align.runtime.faults``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime import faults

STEPS, PROMPTS, GROUP = 3, 2, 4


class SimulatedCrash(Exception):
    """A driver crash (not a Ray failure, so never restarted in-process)."""


@pytest.fixture(scope="module")
def verifier_file(parity_verifier_file: Path) -> Path:
    return parity_verifier_file


def _recipe(run_dir: Path, verifier: Path, *extra: str) -> Any:
    from kexaone_align.config import load_recipe

    overrides = [
        f"agapo.steps={STEPS}", f"agapo.prompts_per_step={PROMPTS}", f"agapo.group_size={GROUP}",
        "agapo.lr=1e-3", "rollout.max_new_tokens=6", "rollout.num_workers=2", "rollout.max_staleness=0",
        "data.num_train=16", "data.num_eval=2", f"verifiers.math={verifier}:parity",
        "checkpoint.every_steps=2", "checkpoint.export=false", "logging.save_rollouts=true",
        "logging.progress_bar=false", "logging.plots=false", f"run_dir={run_dir}", *extra,
    ]  # fmt: skip
    return load_recipe(Path(__file__).parents[1] / "recipes/tiny/agapo.yaml", overrides)


def _steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "agapo" and "rollout/seconds" in r]


def _rollouts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]


def _assert_same_training(run_dir: Path, reference: Path) -> None:
    """Same step sequence, same sampled responses and rewards, same losses as the reference run."""
    got, want = _steps(run_dir), _steps(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "a step was lost or repeated"
    for g, w in zip(got, want, strict=True):
        assert g["reward/mean"] == w["reward/mean"], g["step"]
        assert ("loss" in g) == ("loss" in w)
        if "loss" in w:
            assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-6), g["step"]
    strip = ("step", "prompt_id", "response", "reward", "policy_version")
    assert [{k: r[k] for k in strip} for r in _rollouts(run_dir)] == [
        {k: r[k] for k in strip} for r in _rollouts(reference)
    ]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, verifier_file: Path) -> Path:
    """The uninterrupted run every faulty run is compared with."""
    from kexaone_align.stages import run_recipe

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    summary = run_recipe(_recipe(run_dir, verifier_file))
    assert summary["restarts"] == 0 and summary["steps"] == STEPS
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == 0
    learned = [r for r in _steps(run_dir) if "loss" in r]
    assert learned, "the reference run never took a learner step; the comparisons would be vacuous"
    return run_dir


@pytest.mark.slow
def test_reference_run_trains_every_scheduled_prompt_once(reference_run: Path, verifier_file: Path) -> None:
    from kexaone_align.data.prompts import PromptCursor
    from kexaone_align.stages import rl

    recipe = _recipe(reference_run, verifier_file)
    train_rows, _ = rl.load_prompt_rows(recipe)
    cursor = PromptCursor(train_rows, recipe.seed, shuffle=recipe.data.shuffle)
    schedule = {step: sorted(r.id for r in cursor.next_batch(PROMPTS)) for step in range(1, STEPS + 1)}
    rows = _rollouts(reference_run)
    for step, ids in schedule.items():
        got = sorted(r["prompt_id"] for r in rows if r["step"] == step)
        assert got == sorted(i for i in ids for _ in range(GROUP)), step  # G samples per prompt, no extra
    assert all(r["rollout/worker_restarts"] == 0.0 for r in _steps(reference_run))


@pytest.mark.slow
def test_killed_rollout_worker_is_replaced_and_its_prompts_reissued(
    tmp_path: Path, verifier_file: Path, reference_run: Path
) -> None:
    import ray

    from kexaone_align.stages import run_recipe

    submits = []

    def kill_second_worker(pool: Any, jobs: list) -> None:
        submits.append(len(jobs))
        # submit 1 is the held-out evaluation, 2 is step 1; kill a worker while step 2 generates
        if len(submits) == 3:
            assert len(jobs) == 2
            ray.kill(pool.workers[1])

    run_dir = tmp_path / "run"
    with faults.injected("rollout.submitted", kill_second_worker):
        summary = run_recipe(_recipe(run_dir, verifier_file))
    assert summary["steps"] == STEPS and summary["restarts"] == 0
    steps = _steps(run_dir)
    assert [r["rollout/worker_restarts"] for r in steps] == [0.0, 1.0, 1.0]
    # The replacement served the killed worker's requests at the same policy version with the same
    # request ids (hence the same sampling seeds): identical samples, nothing lost, nothing twice.
    _assert_same_training(run_dir, reference_run)


@pytest.mark.slow
def test_crashed_agapo_run_resumes_to_the_same_metrics(
    tmp_path: Path, verifier_file: Path, reference_run: Path
) -> None:
    from kexaone_align.runtime.checkpoint import step_dir_name
    from kexaone_align.stages import run_recipe

    def crash_at_last_step(run: Any, learners: Any) -> None:
        if run.step == STEPS:  # step 3 is logged and its rollouts saved, but the newest checkpoint is 2
            raise SimulatedCrash("driver died")

    run_dir = tmp_path / "run"
    with faults.injected("stage.step_done", crash_at_last_step), pytest.raises(SimulatedCrash):
        run_recipe(_recipe(run_dir, verifier_file))
    assert [r["step"] for r in _steps(run_dir)] == [1, 2, 3]
    assert not (run_dir / "summary.json").exists()

    summary = run_recipe(_recipe(run_dir, verifier_file, "checkpoint.resume=auto"))
    assert summary["resumed_from"].endswith(step_dir_name(2))
    assert summary["steps"] == STEPS
    _assert_same_training(run_dir, reference_run)  # step 3 redone once, its first rows dropped


@pytest.mark.slow
def test_dead_learner_restarts_stage_from_checkpoint(
    tmp_path: Path, verifier_file: Path, reference_run: Path
) -> None:
    import ray

    from kexaone_align.stages import run_recipe

    killed = []

    def kill_learner_after_step_2(run: Any, learners: Any) -> None:
        if run.step == 2 and not killed:
            killed.append(run.step)
            ray.kill(learners.actors[0])

    run_dir = tmp_path / "run"
    with faults.injected("stage.step_done", kill_learner_after_step_2):
        summary = run_recipe(_recipe(run_dir, verifier_file, "checkpoint.max_restarts=1"))
    assert killed == [2]
    assert summary["restarts"] == 1 and summary["steps"] == STEPS
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == 1
    _assert_same_training(run_dir, reference_run)


@pytest.mark.slow
def test_dead_learner_without_restarts_is_a_clear_error(tmp_path: Path, verifier_file: Path) -> None:
    import ray

    from kexaone_align.stages import run_recipe

    def kill_learner(run: Any, learners: Any) -> None:
        if run.step == 1:
            ray.kill(learners.actors[0])

    recipe = _recipe(tmp_path / "run", verifier_file, "checkpoint.max_restarts=0")
    with faults.injected("stage.step_done", kill_learner), pytest.raises(KexaoneError) as err:
        run_recipe(recipe)
    assert "after 0 restart(s); checkpoint.max_restarts=0" in str(err.value)
    assert "ActorDied" in str(err.value) or "RayActorError" in str(err.value)


def _pool_fixture(tmp_path: Path) -> tuple[str, list[int], list[Any], Any]:
    """A local Ray, a toy checkpoint, and 4 requests x 2 samples of 3 tokens for a RolloutPool test."""
    import ray

    from kexaone_align.models import build_tiny_checkpoint, load_tokenizer
    from kexaone_align.runtime.rollout.base import RolloutRequest, SamplingConfig

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    init = str(tmp_path / "init")
    build_tiny_checkpoint(init, seed=0)
    prompt = load_tokenizer(init).encode("1+1=")
    requests = [RolloutRequest(f"r{i}", prompt, 2) for i in range(4)]
    return init, prompt, requests, SamplingConfig(max_new_tokens=3, seed=0)


@pytest.mark.slow
def test_rollout_pool_replaces_workers_that_die_in_generate_or_push_then_gives_up(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import ray
    import torch

    from kexaone_align.runtime.rollout.pool import RolloutPool

    class WeightSource:
        """Stand-in learner: streams a changed checkpoint copy (local, so Ray ships it by value)."""

        def __init__(self, model_path: str) -> None:
            import torch

            from kexaone_align.runtime.weight_sync import CheckpointWeightSource

            self.source = CheckpointWeightSource(model_path)
            with torch.no_grad():
                for param in self.source.model.parameters():
                    param.mul_(1.5)

        def state_dict_stream(self, bucket_bytes: int) -> Iterator[Any]:
            yield from self.source.state_dict_stream(bucket_bytes)

    init, prompt, requests, sampling = _pool_fixture(tmp_path)
    pool = RolloutPool(init, "hf", 2, max_worker_restarts=2)
    try:
        # dies while holding a job: replaced, and exactly its requests re-issued
        ray.kill(pool.workers[0])
        samples, metrics = pool.collect(pool.submit(requests, sampling))
        assert sorted((s.request_id, s.sample_index) for s in samples) == [
            (f"r{i}", j) for i in range(4) for j in range(2)
        ]
        assert metrics["rollout/worker_restarts"] == 1.0 and pool.worker_restarts == 1

        # dies during a weight push: the others get the version, the replacement starts at it too
        before = ray.get(pool.workers[0].logits.remote([prompt]))
        learner = ray.remote(WeightSource).options(num_cpus=0).remote(init)
        ray.kill(pool.workers[1])
        pool.push_weights(SimpleNamespace(actors=[learner]), 1, 1 << 16)
        assert pool.worker_restarts == 2 and pool.versions() == [1, 1]
        after = ray.get([w.logits.remote([prompt]) for w in pool.workers])
        assert torch.equal(after[0], after[1]) and not torch.allclose(after[0], before)
        ray.kill(learner)

        # the limit is reached: the next death is a clear error
        ray.kill(pool.workers[1])
        with pytest.raises(KexaoneError, match=r"rollout.max_worker_restarts=2"):
            pool.generate(requests, sampling)
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_hung_rollout_worker_is_replaced_after_the_job_timeout(tmp_path: Path) -> None:
    import time

    from kexaone_align.runtime.rollout.pool import RolloutPool

    def stall(worker: Any) -> None:  # keeps the actor busy: later calls queue behind it (a hang)
        worker.__ray_call__.remote(lambda _self: time.sleep(600))

    init, _, requests, sampling = _pool_fixture(tmp_path)
    with pytest.raises(KexaoneError, match="job_timeout_s"):
        RolloutPool(init, "hf", 1, job_timeout_s=0)
    pool = RolloutPool(init, "hf", 2, max_worker_restarts=1, job_timeout_s=8.0)
    try:
        want = pool.generate(requests, sampling)  # warm: both workers answer well within the limit
        assert pool.worker_restarts == 0
        hung = pool.workers[0]
        stall(hung)
        started = time.monotonic()
        samples, metrics = pool.collect(pool.submit(requests, sampling))
        assert 8.0 <= time.monotonic() - started < 120
        assert metrics["rollout/worker_restarts"] == 1.0 and pool.workers[0] is not hung
        key = [(s.request_id, s.sample_index, s.token_ids) for s in samples]
        assert key == [(s.request_id, s.sample_index, s.token_ids) for s in want]  # nothing lost or doubled

        stall(pool.workers[1])  # the limit is reached: the next hang is a clear error
        with pytest.raises(KexaoneError, match=r"hung \(no result after rollout.job_timeout_s=8s\)"):
            pool.generate(requests, sampling)
    finally:
        pool.shutdown()


def test_run_with_restarts_retries_ray_failures_from_the_newest_checkpoint_only(
    tmp_path: Path, verifier_file: Path
) -> None:
    """The restart policy alone, with a scripted stage (no actors): which failures are retried, from
    where, how often, and what the error says."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from kexaone_align.runtime.checkpoint import atomic_checkpoint, save_trainer_state, step_dir_name
    from kexaone_align.stages.common import run_with_restarts

    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / step_dir_name(2)

    def scripted(*failures: BaseException) -> tuple[Any, list[str]]:
        seen: list[str] = []

        def stage(recipe: Any) -> dict:
            seen.append(recipe.checkpoint.resume)
            if len(seen) <= len(failures):
                if not checkpoint.exists():  # the failed attempt got as far as a checkpoint
                    with atomic_checkpoint(checkpoint) as tmp:
                        save_trainer_state(tmp, {"step": 2})
                raise failures[len(seen) - 1]
            return {"steps": 3}

        return stage, seen

    recipe = _recipe(run_dir, verifier_file, "checkpoint.max_restarts=2")
    stage, seen = scripted(ActorDiedError(), ActorDiedError())
    assert run_with_restarts(stage, recipe) == {"steps": 3, "restarts": 2}
    assert seen == ["auto", str(checkpoint), str(checkpoint)]

    stage, seen = scripted(ActorDiedError(), ActorDiedError(), ActorDiedError())
    with pytest.raises(
        KexaoneError, match=r"failed \(ActorDiedError.*after 2 restart\(s\); checkpoint.max_restarts=2"
    ):
        run_with_restarts(stage, recipe)
    assert len(seen) == 3

    # Errors a rerun would repeat are raised at once: user errors (also raised inside a Ray task) and
    # plain exceptions of the driver.
    def in_task(cause: BaseException) -> BaseException:
        return RayTaskError("train_step", "traceback", cause).as_instanceof_cause()

    user_error = in_task(KexaoneError("bad batch"))
    deterministic = [in_task(ValueError("bad row")), in_task(KeyError("advantages")), in_task(TypeError("x"))]
    for failure in (KexaoneError("bad recipe"), user_error, ValueError("driver bug"), *deterministic):
        stage, seen = scripted(failure)
        with pytest.raises(type(failure)):
            run_with_restarts(stage, recipe)
        assert len(seen) == 1, failure


def test_only_infrastructure_failures_are_restartable() -> None:
    """A task's own ValueError (bad data) repeats on a rerun; a dead actor, a lost node or a collective
    whose peer died does not."""
    import torch.distributed as dist
    from ray.exceptions import (
        ActorDiedError,
        NodeDiedError,
        RayTaskError,
        WorkerCrashedError,
    )

    from kexaone_align.stages.common import is_restartable

    def in_task(cause: BaseException) -> BaseException:
        return RayTaskError("train_step", "traceback", cause).as_instanceof_cause()

    infrastructure = [
        ActorDiedError(), NodeDiedError("node lost"), WorkerCrashedError(), in_task(ActorDiedError()),
        in_task(dist.DistBackendError("peer gone")), in_task(RuntimeError("[gloo] Connection closed")),
        in_task(ConnectionResetError()),
    ]  # fmt: skip
    for exc in infrastructure:
        assert is_restartable(exc), exc
    deterministic = [
        in_task(ValueError("reward is NaN")), in_task(KexaoneError("bad batch")), in_task(KeyError("k")),
        in_task(RuntimeError("shape mismatch")), ValueError("driver"), KexaoneError("recipe"),
    ]  # fmt: skip
    for exc in deterministic:
        assert not is_restartable(exc), exc


@pytest.mark.slow
def test_pipelined_periodic_eval_replaces_a_worker_hung_on_the_in_flight_rollout(
    tmp_path: Path, verifier_file: Path
) -> None:
    """Pipelined AGAPO evaluates after step 1 while step 2's rollout is in flight. Worker 0 hangs right
    after its step-1 job: the pool's throughput query after step 1 and step 2's rollout both wait on it.
    Both are bounded by rollout.job_timeout_s and the worker is replaced (the evaluation used to wait on
    the rollout, and collect on the query, with no time limit)."""
    import time

    from kexaone_align.stages import run_recipe

    submits: list[int] = []

    def hang_after_step_1(pool: Any, jobs: list[Any]) -> None:
        submits.append(len(jobs))
        if len(submits) == 2:  # 1: the evaluation before training; 2: step 1's rollout
            jobs[0].actor.__ray_call__.remote(lambda _self: time.sleep(900))  # step 2's queues behind it

    recipe = _recipe(
        tmp_path / "run", verifier_file, "agapo.steps=2", "rollout.max_staleness=1",
        "agapo.eval_every_steps=1", "rollout.job_timeout_s=40", "checkpoint.every_steps=0",
    )  # fmt: skip
    started = time.monotonic()
    with faults.injected("rollout.submitted", hang_after_step_1):
        summary = run_recipe(recipe)
    steps = _steps(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2] and summary["steps"] == 2
    # replaced after the job timeout, not waited for until the stall ended
    assert steps[1]["rollout/worker_restarts"] == 1.0, "the evaluation waited for the hung worker"
    assert time.monotonic() - started < 900
    evals = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in r and r["step"] == 1 for r in evals)
