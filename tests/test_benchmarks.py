"""The benchmark scripts measure what they claim: small, fast versions of each measurement."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import logprob_memory  # noqa: E402
import overlap  # noqa: E402
import verifier_throughput  # noqa: E402
import weight_sync  # noqa: E402


def run_script(cmd: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a benchmark; past ``timeout`` kill it with every process it started (its Ray cluster and
    run children), so one hung benchmark fails its test without starving the tests after it."""
    from kexaone_align.rehearsal import kill_process_tree

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{cmd[1]} ran past {timeout} s and was killed with its children: {stderr[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_logprob_child_sees_the_naive_logits_and_not_the_chunked_ones():
    # S=4096, V=32768: naive logits are 537 MB (x ~3 with log_softmax and grads); chunks of 128 are 17 MB,
    # plus ~100 MB of one-off allocator/thread overhead seen in the child on this machine.
    naive = logprob_memory.run_point("naive", 4096, 16, 32768, 128, 1)
    chunked = logprob_memory.run_point("chunked", 4096, 16, 32768, 128, 1)
    logits = 4096 * 32768 * 4
    assert naive["finite"] and chunked["finite"]
    assert naive["peak_extra_bytes"] > 2 * logits
    assert chunked["peak_extra_bytes"] < 0.5 * logits


def test_verifier_sample_sets_are_seeded_and_mixed():
    from kexaone_align.verifiers import get_verifier, score_batch

    first = verifier_throughput.math_samples(16, seed=3)
    assert first == verifier_throughput.math_samples(16, seed=3)
    rewards = score_batch(first, get_verifier("math"), max_workers=2).rewards
    assert 0 < sum(rewards) < len(rewards)  # some right, some wrong, none broken
    code = verifier_throughput.code_samples(4, seed=0)
    assert {("fn_name" in s.reference) for s in code} == {True, False}


def test_memcpy_bandwidth_is_positive_and_recorded():
    out = weight_sync.memcpy_bandwidth(8 << 20, repeats=3)
    assert out["torch_copy_"]["gb_per_s_median"] > 0
    assert out["numpy_copyto"]["gb_per_s_median"] > 0
    assert len(out["torch_copy_"]["seconds_runs"]) == 3


@pytest.mark.parametrize(
    "name",
    [
        "logprob_memory",
        "verifier_throughput",
        "weight_sync",
        "overlap",
        "moe_kernels",
        "rollout_backends",
        "rollout_compaction",
        "rollout_decode_paths",
        "code_humaneval",
        "grading_latency",
    ],
)
def test_committed_results_are_traceable(name):
    path = BENCH / "results" / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not generated yet")
    data = json.loads(path.read_text())
    assert data["benchmark"] == name
    assert data["machine"]["nproc"] >= 1 and data["command"]


def test_scripts_show_help():
    scripts = ("logprob_memory", "verifier_throughput", "weight_sync", "overlap", "moe_kernels",
               "rollout_backends", "rollout_compaction", "rollout_decode_paths",
               "code_humaneval", "grading_latency", "rl_time_to_accuracy_pool")  # fmt: skip
    for script in (f"{name}.py" for name in scripts):
        out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--out" in out.stdout


# ------------------------------------------------------------------ RL time to accuracy (ours vs TRL)
def test_rl_time_to_accuracy_target_and_ratios():
    import _tta_summary as tta

    curve = [{"step": s, "train_seconds": t, "accuracy": a} for s, t, a in ((0, 0.0, 0.1), (5, 7.0, 0.2),
                                                                           (10, 15.0, 0.3))]  # fmt: skip
    assert tta.time_to_target(curve, 0.2) == 7.0
    assert tta.time_to_target(curve, 0.1) == 0.0
    assert tta.time_to_target(curve, 0.31) is None

    def run(system, ttt, seconds):
        return {"system": system, "time_to_target_s": ttt, "train_seconds": seconds, "steps_per_minute": 60.0,
                "learner_tokens_per_s": 100.0, "rollout_tokens_per_s": 50.0, "curve": curve,
                "rollout_seconds": 5.0, "learner_seconds": 4.0, "other_seconds": 1.0,
                "learner_steps": 3}  # fmt: skip

    summary = tta.summarize([run("ours", 10.0, 20.0), run("trl", 30.0, 40.0), run("ours", 14.0, 22.0),
                             run("trl", 34.0, 44.0)], target=0.2)  # fmt: skip
    assert summary["ours"]["time_to_target_s"] == 12.0 and summary["trl"]["time_to_target_s"] == 32.0
    assert summary["ratio_trl_over_ours"]["time_to_target_s"] == pytest.approx(32.0 / 12.0)
    assert summary["ratio_trl_over_ours"]["train_seconds"] == pytest.approx(42.0 / 21.0)
    # One run that never reached the target: no median time to target, no ratio, and it says so.
    partial = tta.summarize([run("ours", None, 20.0), run("ours", 10.0, 20.0), run("trl", 5.0, 40.0)], 0.2)
    assert partial["ours"]["reached_target"] == "1/2" and partial["ours"]["time_to_target_s"] is None
    assert partial["ratio_trl_over_ours"]["time_to_target_s"] is None
    # a third arm (AGAPO's overlapped pipeline) gets its own ratios against TRL
    three = tta.summarize([run("ours", 10.0, 20.0), run("trl", 30.0, 40.0), run("ours_overlap", 6.0, 12.0)],
                          0.2, ("ours", "trl", "ours_overlap"))  # fmt: skip
    assert three["speedup_time_to_target"] == pytest.approx(3.0)
    assert three["speedup_time_to_target_ours_overlap"] == pytest.approx(5.0)
    assert three["ratio_trl_over_ours_overlap"]["train_seconds"] == pytest.approx(40.0 / 12.0)


def test_rl_time_to_accuracy_summarizes_each_seed_and_their_ratios():
    import _tta_summary as tta

    def run(system, seed, ttt):
        return {"system": system, "seed": seed, "time_to_target_s": ttt, "train_seconds": 2.0 * (ttt or 50.0),
                "steps_per_minute": 60.0, "learner_tokens_per_s": 100.0, "rollout_tokens_per_s": 50.0,
                "curve": [{"step": 0, "train_seconds": 0.0, "accuracy": 0.1 * seed}], "rollout_seconds": 5.0,
                "learner_seconds": 4.0, "other_seconds": 1.0, "learner_steps": 3}  # fmt: skip

    runs = [run("ours", 0, 10.0), run("trl", 0, 30.0), run("ours", 1, 20.0), run("trl", 1, 20.0),
            run("ours", 2, 40.0), run("trl", 2, 60.0)]  # fmt: skip
    out = tta.summarize_seeds(runs, {0: 0.2, 1: 0.3, 2: 0.4})
    assert out["per_seed_ratio_time_to_target_ours"] == pytest.approx([3.0, 1.0, 1.5])
    assert out["median_per_seed_ratio_time_to_target_ours"] == pytest.approx(1.5)
    assert out["ours"]["time_to_target_s"] == 20.0 and out["trl"]["time_to_target_s"] == 30.0
    assert out["ratio_trl_over_ours"]["time_to_target_s"] == pytest.approx(1.5)  # ratio of medians
    assert out["per_seed"]["1"]["target_accuracy"] == 0.3 and out["target_accuracy"]["2"] == 0.4
    # a seed where TRL never reached the target: that seed's ratio and the median of ratios are None
    runs[5] = run("trl", 2, None)
    out = tta.summarize_seeds(runs, {0: 0.2, 1: 0.3, 2: 0.4})
    assert out["per_seed_ratio_time_to_target_ours"][2] is None
    assert out["median_per_seed_ratio_time_to_target_ours"] is None and out["trl"]["reached_target"] == "2/3"
    import rl_time_to_accuracy as script

    assert script.parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("0,0", "a", "", "-1"):
        with pytest.raises(script.BenchmarkError, match="--seeds"):
            script.parse_seeds(bad)


def test_rl_time_to_accuracy_refuses_unknown_arms(tmp_path):
    script = str(BENCH / "rl_time_to_accuracy.py")
    for arms, message in (("ours,fast", "give distinct arms"), ("trl,ours_overlap", "must include 'ours'")):
        cmd = [sys.executable, script, "--quick", "--arms", arms, "--out", str(tmp_path / "x.json")]
        proc = run_script(cmd, timeout=120, cwd=BENCH.parent)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_rl_time_to_accuracy_trl_config_mirrors_the_agapo_recipe(tmp_path):
    import rl_time_to_accuracy as tta
    from trl import GRPOConfig

    from kexaone_align.errors import KexaoneError
    from kexaone_align.models import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "toy", seed=0)
    recipe = tta.stage_recipe(str(BENCH.parent / "recipes/tiny/agapo.yaml"), str(ckpt),
                              ["agapo.is_cap=3.0", "agapo.lr=1e-4"], str(tmp_path / "run"))  # fmt: skip
    kwargs = tta.trl_config_kwargs(recipe, str(tmp_path / "trl"), micro_batch=32)
    cfg = recipe.agapo
    assert (kwargs["loss_type"], kwargs["beta"], kwargs["scale_rewards"]) == ("cispo", 0.0, "batch")
    assert kwargs["epsilon_high"] == 3.0 and kwargs["learning_rate"] == 1e-4
    assert kwargs["num_generations"] == cfg.group_size
    per_step = cfg.prompts_per_step * cfg.group_size
    assert kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"] == per_step
    assert kwargs["max_completion_length"] == recipe.rollout.max_new_tokens
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (1.0, 0.95, 0)
    args = GRPOConfig(**kwargs)  # TRL accepts every name and value
    assert args.generation_batch_size == per_step and args.epsilon_high == 3.0
    with pytest.raises(KexaoneError, match="trl-micro-batch"):
        tta.trl_config_kwargs(recipe, str(tmp_path / "trl"), micro_batch=12)


@pytest.mark.slow
def test_rl_time_to_accuracy_quick_runs_both_systems_end_to_end(tmp_path):
    out = tmp_path / "tta.json"
    cmd = [sys.executable, str(BENCH / "rl_time_to_accuracy.py"), "--quick", "--out", str(out)]
    proc = run_script(cmd, timeout=300, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "rl_time_to_accuracy" and data["command"] and data["machine"]["nproc"] >= 1
    assert [r["system"] for r in data["runs"]] == ["ours", "trl"]
    assert data["settings"]["seeds"] == [0] and [r["seed"] for r in data["runs"]] == [0, 0]
    for run in data["runs"]:
        assert run["steps"] == 2
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]  # before, every step (--quick: eval every 1)
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in run["curve"])
        seconds = [p["train_seconds"] for p in run["curve"]]
        assert seconds[0] == 0.0 and seconds == sorted(seconds) and seconds[-1] > 0
        assert run["steps_per_minute"] > 0 and run["rollout_tokens_per_s"] > 0 and run["rollout_tokens"] > 0
    trl = data["runs"][1]
    assert trl["learner_steps"] == 2 and trl["learner_tokens_per_s"] > 0
    # Same checkpoint, same evaluation procedure and random numbers: the before-RL accuracy must agree.
    assert data["runs"][0]["curve"][0]["accuracy"] == trl["curve"][0]["accuracy"]
    summary = data["summary"]
    for system in ("ours", "trl"):
        assert {"time_to_target_s", "steps_per_minute", "learner_tokens_per_s", "rollout_tokens_per_s",
                "reached_target"} <= set(summary[system])  # fmt: skip
    assert summary["ratio_trl_over_ours"]["steps_per_minute"] > 0
    assert summary["before_rl_identical_across_arms_within_each_seed"] is True
    before = data["settings"]["target"]["eval_before_per_seed"]["0"]
    # default target: that seed's accuracy before RL + 0.05
    assert summary["per_seed"]["0"]["target_accuracy"] == pytest.approx(before + 0.05)
    assert len(summary["per_seed_ratio_time_to_target_ours"]) == 1


def test_overlap_reads_steady_step_time_from_training_rows_only(tmp_path):
    rows = [{"stage": "agapo", "step": 0, "time": 0.0, "eval_before/accuracy": 0.0}]
    ends = [17.0, 22.0, 24.0, 26.0, 28.0]  # steps 1-5; step 2 is slow (a warm-up step)
    rows += [{"stage": "agapo", "step": s, "time": t, "policy_version": s} for s, t in enumerate(ends, 1)]
    rows.append({"stage": "agapo", "step": 5, "time": 99.0, "eval_after/accuracy": 0.0})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = overlap.step_rows(path)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert overlap.steady_seconds_per_step(got, warmup=1) == pytest.approx(11 / 4)
    assert overlap.steady_seconds_per_step(got, warmup=2) == pytest.approx(2.0)  # slow step 2 left out
    with pytest.raises(ValueError):
        overlap.steady_seconds_per_step(got[:1], warmup=1)


@pytest.mark.slow
def test_overlap_quick_mode_end_to_end(tmp_path):
    """Both arms really run the AGAPO stage (sync at staleness 0, overlap at 1) and the JSON says so."""
    out = tmp_path / "overlap.json"
    proc = run_script([sys.executable, str(BENCH / "overlap.py"), "--quick", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "overlap" and data["settings"]["quick"] is True
    assert data["settings"]["overrides"]["agapo.steps"] == 4
    runs = {r["arm"]: r for r in data["runs"]}
    assert set(runs) == {"sync", "overlap"} == set(data["seconds_per_step_median"])
    assert runs["sync"]["staleness_median"] == 0 and runs["overlap"]["staleness_median"] == 1
    for run in runs.values():
        assert run["steps"] == 4 and run["skipped_steps"] == 0 and run["dropped_stale"] == 0
        assert run["seconds_per_step"] > 0 and len(run["step_intervals_s"]) == 3
        assert run["learner_step_seconds_median"] > 0 and run["rollout_seconds_median"] > 0
    ratio = data["ratios"]["sync_over_overlap"]
    assert ratio == pytest.approx(runs["sync"]["seconds_per_step"] / runs["overlap"]["seconds_per_step"])


@pytest.mark.parametrize(
    "name",
    [
        "rl_time_to_accuracy.json",
        "rl_time_to_accuracy_sync_2cpus.json",
        "rl_time_to_accuracy_decode_paths.json",
        "rl_time_to_accuracy_shared_prefix.json",
        "rl_time_to_accuracy_turns.json",
        "rl_time_to_accuracy_seeds345.json",
    ],
)
def test_rl_time_to_accuracy_committed_results_are_traceable(name):
    path = BENCH / "results" / name
    if not path.exists():
        pytest.skip(f"{path} not generated yet")
    data = json.loads(path.read_text())
    assert data["benchmark"] == "rl_time_to_accuracy" and data["command"] and data["settings"]["recipe"]
    systems = [r["system"] for r in data["runs"]]
    arms = list(data["settings"].get("arms", ("ours", "trl")))
    seeds = data["settings"]["seeds"]
    assert len(seeds) >= 3, "the committed comparison runs every arm on at least 3 seeds"
    assert systems == arms * data["settings"]["repeats"] * len(seeds)  # interleaved
    for run in data["runs"]:
        assert run["curve"][0]["step"] == 0 and run["curve"][-1]["step"] == data["settings"]["steps"]
    summary = data["summary"]
    assert set(summary["ratio_trl_over_ours"]) >= {"time_to_target_s", "steps_per_minute"}
    assert summary["before_rl_identical_across_arms_within_each_seed"] is True
    for arm in arms:
        if arm != "trl":
            assert len(summary[f"per_seed_ratio_time_to_target_{arm}"]) == len(seeds)


def test_moe_kernels_quick_times_each_kernel_on_identical_logits(tmp_path):
    import moe_kernels

    out = moe_kernels.main(["--quick", "--threads", "1", "--out", str(tmp_path / "mk.json")])
    assert json.loads((tmp_path / "mk.json").read_text())["benchmark"] == "moe_kernels"
    assert set(out["results"]) == set(moe_kernels.KERNELS)
    for result in out["results"].values():
        assert result["max_abs_logit_diff_vs_first"] < 1e-4  # same weights, same function
        assert len(result["train_step_s_runs"]) == 2 and result["train_step_s_median"] > 0
    assert out["results"]["grouped_mm"]["train_speedup_vs_grouped_mm"] == 1.0


def test_rollout_decode_paths_quick_checks_identical_samples_and_records_both_paths(tmp_path):
    """The CPU decode path and the one before it run on one batch; the script refuses different samples."""
    out = tmp_path / "paths.json"
    script = str(BENCH / "rollout_decode_paths.py")
    cmd = [sys.executable, script, "--quick", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    proc = run_script(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["settings"]["attention"] == {"fast": "kexaone_gqa_sdpa", "before": "sdpa"}
    (row,) = data["rounds"]
    assert 0 < row["fast"]["tokens"] == row["before"]["tokens"] <= 2 * 4 * 12
    assert data["fast_over_before"]["ratio_of_medians"] > 0


def _as_seeds(data: dict, shift: int) -> dict:
    """``data`` (a committed TTA result) as if its seeds had been ``seed + shift``."""
    out = json.loads(json.dumps(data))
    out["settings"]["seeds"] = [s + shift for s in data["settings"]["seeds"]]
    targets = data["summary"]["target_accuracy"]
    out["summary"]["target_accuracy"] = {str(int(k) + shift): v for k, v in targets.items()}
    for run in out["runs"]:
        run["seed"] += shift
    return out


def test_pooled_tta_results_cover_every_seed_and_refuse_what_does_not_pool():
    import rl_time_to_accuracy_pool as tta_pool

    data = json.loads((BENCH / "results" / "rl_time_to_accuracy_turns.json").read_text())
    pooled = tta_pool.pool([data, _as_seeds(data, 10)], ["a.json", "b.json"])
    summary = pooled["summary"]
    for arm in ("ours", "ours_turns", "ours_overlap"):
        alone = data["summary"][f"per_seed_ratio_time_to_target_{arm}"]
        assert summary[f"per_seed_ratio_time_to_target_{arm}"] == alone + alone
        assert summary[f"median_per_seed_ratio_time_to_target_{arm}"] == pytest.approx(
            data["summary"][f"median_per_seed_ratio_time_to_target_{arm}"]
        )
    assert pooled["settings"]["seeds"] == [0, 1, 2, 10, 11, 12]
    assert len(pooled["runs"]) == 2 * len(data["runs"])
    with pytest.raises(tta_pool.PoolError, match=r"seed 0 is in both a\.json and b\.json"):
        tta_pool.pool([data, data], ["a.json", "b.json"])
    other = _as_seeds(data, 10)
    other["settings"]["steps"] = 40
    with pytest.raises(tta_pool.PoolError, match=r"settings\.steps"):
        tta_pool.pool([data, other], ["a.json", "b.json"])
    other = _as_seeds(data, 10)
    other["machine"]["cpu_model"] = "Intel Xeon"
    with pytest.raises(tta_pool.PoolError, match="another machine kind"):
        tta_pool.pool([data, other], ["a.json", "b.json"])
    fewer = _as_seeds(data, 10)
    fewer["settings"]["arms"].pop("ours_turns")
    fewer["runs"] = [r for r in fewer["runs"] if r["system"] != "ours_turns"]
    shared = tta_pool.pool([data, fewer], ["a.json", "b.json"])
    assert list(shared["settings"]["arms"]) == ["ours", "ours_overlap", "trl"]
    assert len(shared["summary"]["per_seed_ratio_time_to_target_ours_overlap"]) == 6
    assert "per_seed_ratio_time_to_target_ours_turns" not in shared["summary"]
    fewer["settings"]["arms"]["ours_overlap"]["overrides"] = ["rollout.max_staleness=2"]
    with pytest.raises(tta_pool.PoolError, match="'ours_overlap' is defined differently"):
        tta_pool.pool([data, fewer], ["a.json", "b.json"])
    script = str(BENCH / "rl_time_to_accuracy_pool.py")
    proc = subprocess.run([sys.executable, script, script, "--out", "x.json"], capture_output=True, text=True)
    assert proc.returncode != 0 and "give at least two" in proc.stderr and "Traceback" not in proc.stderr


def test_committed_pooled_tta_result_is_its_sources_pooled():
    import rl_time_to_accuracy_pool as tta_pool

    path = BENCH / "results" / "rl_time_to_accuracy_pooled_6seeds.json"
    committed = json.loads(path.read_text())
    assert committed["command"].startswith("python benchmarks/rl_time_to_accuracy_pool.py")
    names = [source["file"] for source in committed["pooled_from"]]
    sources = [json.loads((BENCH.parent / name).read_text()) for name in names]
    again = tta_pool.pool(sources, names)
    assert again["summary"] == committed["summary"] and again["settings"]["seeds"] == [0, 1, 2, 3, 4, 5]
