"""The benchmark scripts measure what they claim: small, fast versions of each measurement."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import logprob_memory  # noqa: E402
import verifier_throughput  # noqa: E402
import weight_sync  # noqa: E402


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


@pytest.mark.parametrize("name", ["logprob_memory", "verifier_throughput", "weight_sync"])
def test_committed_results_are_traceable(name):
    path = BENCH / "results" / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path} not generated yet")
    data = json.loads(path.read_text())
    assert data["benchmark"] == name
    assert data["machine"]["nproc"] >= 1 and data["command"]


def test_scripts_show_help():
    for script in ("logprob_memory.py", "verifier_throughput.py", "weight_sync.py"):
        out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--out" in out.stdout
