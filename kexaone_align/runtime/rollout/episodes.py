"""Multi-turn tool episodes over any rollout backend's ``generate``.

A request whose ``metadata["episode"]`` is set (see :func:`episode_metadata`) is played as an episode:
the policy generates one assistant turn (to its end-of-turn token), the tool calls in it are run
against the row's environment, the results are appended as K-EXAONE's tool turn followed by the next
assistant header, and the policy continues, until a turn without tool calls (the answer),
``max_turns`` assistant turns, or the token budget (``SamplingConfig.max_new_tokens`` for everything
after the prompt, tool results included) runs out.

Each turn of sample ``k`` of request ``r`` is generated as its own request ``"{r}#{k}#t{turn}"``, so its
sampling seed depends only on the request, the sample and the turn: a re-issued episode (a replaced
worker) draws the same tokens, and with a deterministic environment is the same episode. All live
episodes of a turn go to the backend in one ``generate`` call, so the backend still batches them.

The result is one ``RolloutSample`` per (request, sample) whose ``token_ids`` are everything after the
prompt; ``policy_mask`` marks the tokens the policy sampled (1) and the environment's (0), and
``logprobs`` is 0.0 at environment tokens. ``metadata["episode"]`` holds the reward the environment
gave and the episode's counters (turns, tool calls, tool errors, environment seconds, outcome).

**Trajectory compression** (``compression`` in the metadata, see ``compression.py``): once an episode
has made ``after_calls`` tool calls since its last record, its history is replaced by one JSON record,
and the policy continues from the prompt + the record (a user turn) + a fresh assistant header. The
training sample is that *final context*: ``prompt_token_ids`` stays the request's prompt (a GROUPER group
shares one prompt), ``token_ids`` start with the record's tokens (context, mask 0) followed by the turns
after the last compression. Policy tokens written before it are not in the sample (counted as
``untrained_policy_tokens``), nor are the policy's own record-writing tokens: the learner must score every
trained token in the very context it was sampled in, so that AGAPO's importance ratio compares the same
distributions and ``1/|o_i|`` counts exactly the tokens that carry loss; a sample per segment would instead
split one episode (one reward, one group member) into several rows and change the group statistics.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kexaone_align.errors import KexaoneError
from kexaone_align.runtime.rollout.base import (
    RolloutRequest,
    RolloutSample,
    SamplingConfig,
    expand_requests,
    rollout_metrics,
)
from kexaone_align.runtime.rollout.compression import (
    INSTRUCTION,
    CompressionSpec,
    fallback_record,
    judge_backend,
    judge_messages,
    judge_texts,
    parse_record,
    record_message,
    task_text,
)

END_OF_TURN = "<|endofturn|>"
MAX_TOOL_THREADS = 8
MIN_RECORD_TOKENS = 16  # less room than this for the policy's record: the fallback record instead

_TOKENIZERS: dict[str, Any] = {}
_TOKENIZER_LOCK = threading.Lock()
# A fast tokenizer's encode adjusts its Rust backend's padding/truncation state, which raises "Already
# borrowed" when two threads do it at once: episodes of one turn run their tools in parallel but
# tokenize one at a time.
_TOKENIZE_LOCK = threading.Lock()


def episode_metadata(
    row: Any,
    environment: str,
    *,
    enable_thinking: bool,
    limits: Any = None,
    tokenizer_path: str | None = None,
    base_dir: str | None = None,
    compression: CompressionSpec | None = None,
) -> dict[str, Any]:
    """The ``metadata["episode"]`` entry that makes a request a tool episode (plain data, Ray-picklable);
    ``compression`` turns trajectory compression on."""
    from kexaone_align.environments import ToolLimits

    limits = limits if limits is not None else ToolLimits()
    return {
        "compression": dataclasses.asdict(compression) if compression is not None else None,
        "environment": environment,
        "row": row.to_dict(),
        "enable_thinking": bool(enable_thinking),
        "limits": dataclasses.asdict(limits),
        "tokenizer": tokenizer_path,
        "base_dir": base_dir,
    }


def is_episode(request: RolloutRequest) -> bool:
    """Whether ``request`` is played as a multi-turn tool episode."""
    return bool(request.metadata.get("episode"))


def tool_turn_text(
    tokenizer: Any, results: Sequence[str], enable_thinking: bool, then_user: str | None = None
) -> str:
    """The text the environment adds after the policy's ``<|endofturn|>``: the rest of that line, the tool
    turn holding ``results`` (and a user turn ``then_user``) and the next assistant generation prompt, as
    the chat template renders them."""
    user = {"role": "user", "content": "."}
    done = {"role": "assistant", "content": "."}
    tools = [{"role": "tool", "content": r} for r in results]
    tools += [{"role": "user", "content": then_user}] if then_user is not None else []
    kwargs = {"tokenize": False, "enable_thinking": enable_thinking}
    before = tokenizer.apply_chat_template([user, done], **kwargs)
    after = tokenizer.apply_chat_template([user, done, *tools], add_generation_prompt=True, **kwargs)
    cut = before.rfind(END_OF_TURN)
    if cut < 0 or not after.startswith(before):
        raise KexaoneError("the chat template does not render tool turns after an assistant turn")
    return after[cut + len(END_OF_TURN) :]


def _tokenizer_for(path: str | None, given: Any) -> Any:
    if given is not None:
        return given
    if not path:
        raise KexaoneError("a tool episode needs a tokenizer (the request's episode metadata names none)")
    with _TOKENIZER_LOCK:
        if path not in _TOKENIZERS:
            from kexaone_align.models import load_tokenizer

            _TOKENIZERS[path] = load_tokenizer(path)
        return _TOKENIZERS[path]


@dataclass
class _Episode:
    request: RolloutRequest
    index: int
    env: Any
    row: Any
    state: Any
    limits: Any
    tool_names: set[str]
    tokenizer: Any
    thinking: bool
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    env_seconds: float = 0.0
    outcome: str | None = None
    answer: str | None = None
    policy_version: int = 0
    compression: CompressionSpec | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # tool calls since the last record
    results: list[str] = field(default_factory=list)  # the last tool turn's results
    env_len: int = 0  # tokens of the last tool turn (at the end of ``token_ids``)
    record: dict[str, Any] | None = None
    compressions: int = 0
    compress_fallbacks: int = 0
    untrained_policy_tokens: int = 0

    def wants_compression(self) -> bool:
        c = self.compression
        return c is not None and self.outcome is None and len(self.history) >= c.after_calls

    def turn_request(self, turn: int, budget: int) -> RolloutRequest:
        rid = f"{self.request.request_id}#{self.index}#t{turn}"
        ids = list(self.request.prompt_token_ids) + self.token_ids
        return RolloutRequest(rid, ids, 1, {}, max_new_tokens=budget - len(self.token_ids))


def _start(request: RolloutRequest, index: int, tokenizer: Any) -> _Episode:
    from kexaone_align.data.prompts import parse_prompt_row
    from kexaone_align.environments import ToolLimits, resolve_environment, tool_name

    spec = request.metadata["episode"]
    row = parse_prompt_row(spec["row"], f"episode {request.request_id}")
    env = resolve_environment(spec["environment"], base_dir=spec.get("base_dir"))
    limits = ToolLimits(**spec.get("limits", {}))
    names = {tool_name(t) for t in env.tools(row)}
    tok = _tokenizer_for(spec.get("tokenizer"), tokenizer)
    ep = _Episode(request, index, env, row, env.reset(row), limits, names, tok, spec["enable_thinking"])
    if spec.get("compression"):
        ep.compression = CompressionSpec(**spec["compression"])
    return ep


def _run_calls(ep: _Episode, text: str) -> list[str]:
    from kexaone_align.environments import parse_tool_calls, run_tool_call

    calls = parse_tool_calls(text)
    results = []
    for i, call in enumerate(calls):
        if i >= ep.limits.max_calls_per_turn:
            results.append(f"error: more than {ep.limits.max_calls_per_turn} tool calls in one turn; not run")
            ep.tool_errors += 1
            continue
        outcome = run_tool_call(ep.env, ep.state, call, ep.tool_names, ep.limits)
        ep.history.append(
            {"name": call.name or "?", "arguments": call.arguments, "result": outcome.content,
             "error": outcome.error}
        )  # fmt: skip
        ep.state = outcome.state
        ep.tool_calls += 1
        ep.tool_errors += int(outcome.error)
        ep.tool_timeouts += int(outcome.timed_out)
        results.append(outcome.content)
    return results


def _advance(ep: _Episode, out: RolloutSample, budget: int) -> None:
    """Append one generated turn; run its tool calls and append their tool turn, or end the episode."""
    from kexaone_align.environments import final_answer, parse_tool_calls

    ep.turns += 1
    ep.policy_version = out.policy_version
    ep.token_ids += list(out.token_ids)
    ep.logprobs += [float(x) for x in out.logprobs]
    ep.mask += [1] * len(out.token_ids)
    if out.finish_reason != "stop":
        ep.outcome = "length"
        return
    with _TOKENIZE_LOCK:
        text = ep.tokenizer.decode(list(out.token_ids)[:-1], skip_special_tokens=False)
    if not parse_tool_calls(text):
        ep.outcome, ep.answer = "answer", final_answer(text)
        return
    if ep.turns >= ep.limits.max_turns:  # calls past the turn limit are not run
        ep.outcome = "max_turns"
        return
    started = time.perf_counter()
    results = _run_calls(ep, text)
    with _TOKENIZE_LOCK:
        env_text = tool_turn_text(ep.tokenizer, results, ep.thinking)
        env_ids = list(ep.tokenizer(env_text, add_special_tokens=False)["input_ids"])
    ep.env_seconds += time.perf_counter() - started
    if len(ep.token_ids) + len(env_ids) >= budget:  # no room left for the policy to read and answer
        ep.outcome = "length"
        return
    ep.token_ids += env_ids
    ep.logprobs += [0.0] * len(env_ids)
    ep.mask += [0] * len(env_ids)
    ep.results, ep.env_len = results, len(env_ids)


def _finish(ep: _Episode) -> RolloutSample:
    from kexaone_align.environments import score_episode

    started = time.perf_counter()
    score = score_episode(ep.env, ep.state, ep.row, ep.answer if ep.outcome == "answer" else None, ep.limits)
    ep.env_seconds += time.perf_counter() - started
    last_is_policy_stop = bool(ep.mask) and ep.mask[-1] == 1 and ep.outcome != "length"
    info = {
        "environment": getattr(ep.env, "name", "") or ep.request.metadata["episode"]["environment"],
        "reward": score.reward,
        "passed": bool(score.passed),
        "details": score.details,
        "outcome": ep.outcome,
        "turns": ep.turns,
        "tool_calls": ep.tool_calls,
        "tool_errors": ep.tool_errors,
        "tool_timeouts": ep.tool_timeouts,
        "env_seconds": ep.env_seconds,
        "answer": ep.answer,
        "compressions": ep.compressions,
        "compress_fallbacks": ep.compress_fallbacks,
        "untrained_policy_tokens": ep.untrained_policy_tokens,
        "record": ep.record,
    }
    metadata = {k: v for k, v in ep.request.metadata.items() if k != "episode"}
    metadata["episode"] = info
    return RolloutSample(
        request_id=ep.request.request_id,
        sample_index=ep.index,
        prompt_token_ids=list(ep.request.prompt_token_ids),
        token_ids=ep.token_ids,
        logprobs=ep.logprobs,
        finish_reason="stop" if last_is_policy_stop else "length",
        policy_version=ep.policy_version,
        metadata=metadata,
        policy_mask=ep.mask,
    )


def _compressed_context(ep: _Episode, record: dict[str, Any]) -> list[int]:
    """Tokens after the prompt of the compressed context: an empty assistant turn, the record as a user
    turn and the next assistant header (the chat template's rendering, cut where the prompt ends)."""
    tools = ep.row.tools if ep.row.tools is not None else (ep.env.tools(ep.row) or None)
    kwargs = {"tools": tools, "tokenize": False, "add_generation_prompt": True}
    kwargs["enable_thinking"] = ep.thinking
    messages = list(ep.row.messages)
    added = [{"role": "assistant", "content": ""}, {"role": "user", "content": record_message(record)}]
    with _TOKENIZE_LOCK:
        before = ep.tokenizer.apply_chat_template(messages, **kwargs)
        after = ep.tokenizer.apply_chat_template(messages + added, **kwargs)
        if not after.startswith(before):
            raise KexaoneError("the chat template does not render a compressed context after the prompt")
        return list(ep.tokenizer(after[len(before) :], add_special_tokens=False)["input_ids"])


def _policy_texts(backend: Any, eps: list[_Episode], sampling: SamplingConfig) -> list[str | None]:
    """The policy's own records: each episode's context with the instruction turn after its last tool
    results, generated as request ``{r}#{k}#c{n}`` (a fixed seed, like the turns). A request stays within
    the episode's budget after the prompt (an engine holds no longer sequence); an episode whose record
    would have fewer than ``MIN_RECORD_TOKENS`` tokens of room gets None (the fallback record)."""
    from kexaone_align.environments import final_answer

    requests, asked = [], []
    for ep in eps:
        with _TOKENIZE_LOCK:
            text = tool_turn_text(ep.tokenizer, ep.results, False, then_user=INSTRUCTION)
            ask = list(ep.tokenizer(text, add_special_tokens=False)["input_ids"])
        history = ep.token_ids[: len(ep.token_ids) - ep.env_len]
        room = min(ep.compression.max_tokens, sampling.max_new_tokens - len(history) - len(ask))
        if room < MIN_RECORD_TOKENS:
            continue
        rid = f"{ep.request.request_id}#{ep.index}#c{ep.compressions}"
        requests.append(RolloutRequest(rid, list(ep.request.prompt_token_ids) + history + ask, 1, {}, room))
        asked.append(ep)
    outs = backend.generate(requests, sampling) if requests else []
    if len(outs) != len(requests):
        raise KexaoneError(f"the backend returned {len(outs)} records for {len(requests)} compressions")
    texts: dict[int, str | None] = {}
    for ep, out in zip(asked, outs, strict=True):
        if out.finish_reason != "stop":  # a record cut by its token budget is not a JSON object
            continue
        with _TOKENIZE_LOCK:
            text = ep.tokenizer.decode(list(out.token_ids)[:-1], skip_special_tokens=False)
        texts[id(ep)] = final_answer(text)
    return [texts.get(id(ep)) for ep in eps]


def _compress(
    backend: Any, eps: list[_Episode], sampling: SamplingConfig, compressor: Any, budget: int
) -> None:
    """Replace the history of every episode in ``eps`` by its record (one producer call for all)."""
    spec = eps[0].compression
    previous = [ep.record for ep in eps]
    if spec.producer == "policy":
        texts = _policy_texts(backend, eps, sampling)
    else:
        judge = compressor if compressor is not None else judge_backend(spec.judge or {})
        chats = [judge_messages(task_text(ep.row), ep.history, ep.record) for ep in eps]
        timeout = float((spec.judge or {}).get("timeout_s", 60.0))
        texts = judge_texts(judge, chats, spec.max_tokens, timeout)
    for ep, text, prev in zip(eps, texts, previous, strict=True):
        task = task_text(ep.row)
        record = parse_record(text, task, ep.tool_calls) if text is not None else None
        fallback = record is None
        if fallback:
            record = fallback_record(task, ep.history, prev, ep.tool_calls)
        context = _compressed_context(ep, record)
        if len(context) >= budget - 1:  # no room for a turn after the record: keep the history
            continue
        ep.compress_fallbacks += int(fallback)
        ep.compressions += 1
        ep.untrained_policy_tokens += sum(ep.mask)
        ep.record, ep.history, ep.env_len = record, [], 0
        ep.token_ids, ep.logprobs, ep.mask = context, [0.0] * len(context), [0] * len(context)


def run_episodes(
    backend: Any,
    requests: list[RolloutRequest],
    sampling: SamplingConfig,
    tokenizer: Any = None,
    compressor: Any = None,
) -> list[RolloutSample]:
    """Play every (request, sample) of ``requests`` as a tool episode on ``backend``; samples come back in
    request order, then sample index. ``tokenizer`` overrides the one the episode metadata names;
    ``compressor`` the judge backend of judge-produced compression."""
    rows = expand_requests(requests)
    started = time.perf_counter()
    episodes = [_start(req, idx, tokenizer) for req, idx in rows]
    budget = sampling.max_new_tokens
    max_turns = max((ep.limits.max_turns for ep in episodes), default=0)
    with ThreadPoolExecutor(max_workers=MAX_TOOL_THREADS) as pool:
        for turn in range(max_turns):
            live = [ep for ep in episodes if ep.outcome is None]
            if not live:
                break
            outs = backend.generate([ep.turn_request(turn, budget) for ep in live], sampling)
            if len(outs) != len(live):
                raise KexaoneError(f"the backend returned {len(outs)} samples for {len(live)} episode turns")
            list(pool.map(lambda pair: _advance(pair[0], pair[1], budget), zip(live, outs, strict=True)))
            due: dict[str, list[_Episode]] = {}  # one producer call per compression setting
            for ep in live:
                if ep.wants_compression():
                    due.setdefault(repr(ep.compression), []).append(ep)
            for eps in due.values():
                _compress(backend, eps, sampling, compressor, budget)
        for ep in episodes:
            if ep.outcome is None:
                ep.outcome = "max_turns"
        samples = list(pool.map(_finish, episodes))
    seconds = time.perf_counter() - started
    metrics = rollout_metrics(samples, seconds)
    metrics["rollout/policy_tokens"] = float(sum(sum(s.policy_mask or []) for s in samples))
    backend.last_metrics = metrics
    return samples
