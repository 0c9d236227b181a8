"""Chunked token log-probabilities: equal to the naive result, and flat in memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from kexaone_align.algorithms import logprobs as logprobs_module
from kexaone_align.algorithms.logprobs import (
    chunked_token_entropy,
    chunked_token_logprobs,
    naive_token_logprobs,
    truncation_mask,
)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_equals_naive_values_and_grads(temperature):
    torch.manual_seed(0)
    hidden = torch.randn(3, 41, 24, requires_grad=True)
    weight = torch.randn(97, 24, requires_grad=True)
    targets = torch.randint(0, 97, (3, 41))
    out = chunked_token_logprobs(hidden, weight, targets, chunk_size=16, temperature=temperature)
    ref = naive_token_logprobs(hidden, weight, targets, temperature=temperature)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    g_h, g_w = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
    r_h, r_w = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(g_h, r_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w, r_w, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    torch.manual_seed(1)
    hidden = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (9,))
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_token_logprobs(h, w, targets, chunk_size=4, temperature=0.8), (hidden, weight)
    )


def test_bf16_inputs_are_reduced_in_fp32():
    torch.manual_seed(2)
    hidden = torch.randn(10, 16, dtype=torch.bfloat16)
    weight = torch.randn(50, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (10,))
    out = chunked_token_logprobs(hidden, weight, targets, chunk_size=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_token_logprobs(hidden, weight, targets), rtol=1e-3, atol=1e-3)


def test_entropy_matches_definition():
    torch.manual_seed(3)
    hidden, weight = torch.randn(7, 8), torch.randn(13, 8)
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1)
    torch.testing.assert_close(
        chunked_token_entropy(hidden, weight, chunk_size=2), -(logp.exp() * logp).sum(-1)
    )


def test_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="line up"):
        chunked_token_logprobs(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 4, dtype=torch.long))


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from kexaone_align.algorithms.logprobs import chunked_token_logprobs, naive_token_logprobs
    torch.set_num_threads(1)
    seq, vocab, hidden_size, mode = int(sys.argv[1]), 153600, 64, sys.argv[2]
    hidden = torch.randn(seq, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (seq,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "chunked":
        out = chunked_token_logprobs(hidden, weight, targets, chunk_size=128)
    else:
        out = naive_token_logprobs(hidden, weight, targets)
    out.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mib": (peak - base) / 1024}))
    """
)


def _extra_peak_mib(seq: int, mode: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(seq), mode], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_mib"]


@pytest.mark.slow
def test_peak_memory_is_flat_in_sequence_length_at_kexaone_vocab():
    short = _extra_peak_mib(256, "chunked")
    long = _extra_peak_mib(2048, "chunked")
    naive = _extra_peak_mib(1024, "naive")
    # Chunk logits are 128 x 153600 fp32 = 75 MiB whatever the length; naive holds 1024 x 153600
    # logits (600 MiB) and their gradient, and grows linearly with length.
    assert long < short * 1.3 + 32, (short, long)
    assert naive > 3 * long, (long, naive)


def _sorted_nucleus(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by a stable sort of the whole vocabulary: the rule the probe must reproduce."""
    sorted_logp, order = torch.sort(logp, dim=-1, descending=True, stable=True)
    probs = sorted_logp.exp()
    dropped = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    return ~torch.zeros_like(dropped).scatter(-1, order, dropped)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.999])
def test_nucleus_from_the_top_tokens_equals_the_full_sort(top_p):
    """Peaked rows (a trained policy) are decided from the most likely tokens alone; flat rows and ties
    across the cut fall back to the sort. Either way the kept set is the full sort's."""
    gen = torch.Generator().manual_seed(3)
    peaked = torch.log_softmax(torch.randn(64, 1000, generator=gen) * 12, dim=-1)
    assert logprobs_module._nucleus_drop_from_top(peaked, top_p) is not None  # the probe decides these
    flat = torch.log_softmax(torch.randn(8, 1000, generator=gen) * 0.1, dim=-1)
    assert logprobs_module._nucleus_drop_from_top(flat, top_p) is None  # nucleus wider than the probe
    tied = torch.full((2, 1000), -30.0)
    tied[:, :4] = 0.0  # four equally likely tokens: any cut inside them splits a tie
    tied = torch.log_softmax(tied, dim=-1)
    assert logprobs_module._nucleus_drop_from_top(tied, 0.6) is None
    rounded = torch.log_softmax(torch.round(torch.randn(32, 1000, generator=gen) * 6), dim=-1)  # many ties
    for logp in (peaked, flat, tied, rounded):
        assert torch.equal(truncation_mask(logp, top_p), _sorted_nucleus(logp, top_p))
