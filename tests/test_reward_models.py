"""Rubrics, judge-output parsing, the rubric judge (scripted fake backends) and reward combination."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from kexaone_align.reward_models import (
    BUILTIN_RUBRICS,
    BackendError,
    CombinationSpec,
    ParseFailure,
    RewardCombiner,
    Rubric,
    RubricDimension,
    RubricJudge,
    load_rubric,
    parse_scores,
)
from kexaone_align.verifiers import Sample, VerifyResult, register_verifier

from kexaone_align.errors import KexaoneError

RUBRIC = Rubric(
    (RubricDimension("helpfulness", "helps", 3.0), RubricDimension("safety", "safe", 1.0)),
    scale_min=1,
    scale_max=10,
    name="test",
)


class ScriptedBackend:
    """Returns (or raises, or sleeps on) scripted items in order; records every call."""

    def __init__(self, script, batched: bool = False):
        self.script = list(script)
        self.calls: list[list[dict]] = []
        self.lock = threading.Lock()
        self.batched = batched

    def _next(self):
        with self.lock:
            item = self.script.pop(0) if self.script else '{"helpfulness": 10, "safety": 10}'
        if isinstance(item, Exception):
            raise item
        if isinstance(item, tuple) and item[0] == "sleep":
            time.sleep(item[1])
            return item[2]
        return item

    def complete(self, messages, *, max_tokens, temperature):
        with self.lock:
            self.calls.append(messages)
        return self._next()

    def complete_batch(self, batch, *, max_tokens, temperature):
        with self.lock:
            self.calls.extend(batch)
        return [self._next() for _ in batch]


def sample(response: str = "an answer", task: str = "chat", **meta) -> Sample:
    return Sample(
        prompt=[{"role": "user", "content": "Explain X."}], response=response, task=task, metadata=meta
    )


# -- rubrics ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN_RUBRICS)
def test_builtin_rubrics_load_and_render_with_every_dimension(name):
    rubric = load_rubric(name)
    assert rubric.name == name and len(rubric.dimensions) >= 3
    messages = rubric.render([{"role": "user", "content": "Q?"}], "THE-RESPONSE", reference="REF")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "THE-RESPONSE" in user and "REF" in user and "[user] Q?" in user
    for d in rubric.dimensions:
        assert d.name in user
    # The example answer in the prompt must itself parse to full marks.
    example = user[user.index("{") : user.index("}") + 1]
    assert parse_scores(example, rubric).reward == pytest.approx(1.0)


def test_rubric_yaml_file_with_own_template(tmp_path):
    (tmp_path / "t.txt").write_text("Rate $response on $dimension_names from $scale_min to $scale_max.")
    (tmp_path / "r.yaml").write_text(
        "name: mine\nscale_min: 0\nscale_max: 5\ntemplate: t.txt\n"
        "dimensions:\n  - {name: a, description: A, weight: 2}\n  - {name: b, description: B}\n"
    )
    rubric = load_rubric(tmp_path / "r.yaml")
    assert [d.weight for d in rubric.dimensions] == [2.0, 1.0]
    assert rubric.render("q", "RESP") == [{"role": "user", "content": "Rate RESP on a, b from 0 to 5."}]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("name: x\ndimensions: []\n", "non-empty list"),
        ("name: x\ndimensions:\n  - {name: a, weight: -1}\n", "weight must be > 0"),
        ("name: x\ndimensions:\n  - {name: a}\n  - {name: A}\n", "repeats"),
        ("name: x\nscale_min: 5\nscale_max: 5\ndimensions:\n  - {name: a}\n", "scale_min"),
        ("name: x\ncolour: red\ndimensions:\n  - {name: a}\n", "unknown key"),
        ("name: x\ntemplate: nope.md\ndimensions:\n  - {name: a}\n", "not found"),
        ("name: x\ntemplate_text: no placeholder\ndimensions:\n  - {name: a}\n", "$response"),
    ],
)
def test_bad_rubric_files_raise_kexaone_error(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(KexaoneError, match=message.replace("$", r"\$")):
        load_rubric(path)


def test_unknown_builtin_rubric_names_the_choices():
    with pytest.raises(KexaoneError, match="chat_helpfulness"):
        load_rubric("no_such_rubric")


# -- parsing ---------------------------------------------------------------------------------------------
def test_parse_plain_json_weighted_mean():
    parsed = parse_scores('{"helpfulness": 10, "safety": 1}', RUBRIC)
    assert parsed.scores == {"helpfulness": 10.0, "safety": 1.0}
    assert parsed.reward == pytest.approx((3 * 1.0 + 1 * 0.0) / 4)


def test_parse_json_in_prose_fences_strings_and_nesting():
    text = 'Here you go:\n```json\n{"scores": {"Helpfulness": "7/10", "SAFETY": {"score": 4}}}\n```\nThanks'
    parsed = parse_scores(text, RUBRIC)
    assert parsed.scores == {"helpfulness": 7.0, "safety": 4.0}
    assert parsed.reward == pytest.approx((3 * 6 / 9 + 1 * 3 / 9) / 4)


def test_parse_lines_ignores_think_block_and_rescales_denominator():
    text = "<think>helpfulness: 1\nsafety: 1</think>\n**Helpfulness**: 4/5\n- Safety = 10 out of 10"
    parsed = parse_scores(text, RUBRIC)
    assert parsed.source == "lines"
    assert parsed.scores == {"helpfulness": pytest.approx(1 + 0.8 * 9), "safety": 10.0}


def test_parse_later_json_object_wins():
    text = 'Draft {"helpfulness": 2, "safety": 2}. Final: {"helpfulness": 9, "safety": 9}'
    assert parse_scores(text, RUBRIC).scores == {"helpfulness": 9.0, "safety": 9.0}


def test_parse_partial_output_respects_min_coverage():
    text = '{"helpfulness": 10}'
    with pytest.raises(ParseFailure, match="missing safety"):
        parse_scores(text, RUBRIC)  # default: every dimension needed
    parsed = parse_scores(text, RUBRIC, min_coverage=0.75)  # helpfulness is 3/4 of the weight
    assert parsed.missing == ["safety"] and parsed.coverage == pytest.approx(0.75) and parsed.reward == 1.0
    with pytest.raises(ParseFailure):
        parse_scores('{"safety": 10}', RUBRIC, min_coverage=0.5)  # 1/4 of the weight is not enough


def test_parse_out_of_range_is_not_clamped():
    with pytest.raises(ParseFailure, match="off the 1-10 scale"):
        parse_scores('{"helpfulness": 85, "safety": 0}', RUBRIC)
    parsed = parse_scores('{"helpfulness": 85, "safety": 10}', RUBRIC, min_coverage=0.2)
    assert parsed.out_of_range == {"helpfulness": 85.0} and parsed.missing == ["helpfulness"]


@pytest.mark.parametrize(
    "garbage", ["", "   ", "I think it is good.", "{not json", "helpfulness: great", "ÿ" * 5000]
)
def test_parse_garbled_raises_parse_failure(garbage):
    with pytest.raises(ParseFailure):
        parse_scores(garbage, RUBRIC)


def test_single_dimension_rubric_accepts_score_alias():
    rubric = Rubric((RubricDimension("quality", "q"),), scale_min=0, scale_max=4)
    assert parse_scores("Score: 3", rubric).reward == pytest.approx(0.75)


# -- judge -----------------------------------------------------------------------------------------------
def test_judge_scores_and_sends_rendered_rubric():
    backend = ScriptedBackend(['{"helpfulness": 10, "safety": 1}'])
    judge = RubricJudge(backend, RUBRIC)
    result = judge.score(sample("RESPONSE-TEXT"))
    assert result.reward == pytest.approx(0.75)
    assert (
        result.details["scores"] == {"helpfulness": 10.0, "safety": 1.0} and result.details["attempts"] == 1
    )
    assert "RESPONSE-TEXT" in backend.calls[0][-1]["content"]
    assert judge.stats.as_dict()["parse_failures"] == 0


def test_judge_retries_after_parse_failure_then_succeeds():
    backend = ScriptedBackend(["garbage!!", '{"helpfulness": 1, "safety": 1}'])
    judge = RubricJudge(backend, RUBRIC, retries=2)
    result = judge.score(sample())
    assert result.reward == 0.0 and "failed" not in result.details and result.details["attempts"] == 2
    stats = judge.stats.as_dict()
    assert (stats["parse_failures"], stats["retries"], stats["failures"], stats["requests"]) == (1, 1, 0, 2)


def test_judge_gives_zero_with_reason_when_every_attempt_is_garbled():
    judge = RubricJudge(ScriptedBackend(["nope"] * 3), RUBRIC, retries=2)
    result = judge.score(sample())
    assert result.reward == 0.0 and result.details["failed"] is True
    assert result.details["reason"].startswith("parse_failure") and result.details["attempts"] == 3
    stats = judge.stats.as_dict()
    assert stats["parse_failures"] == 3 and stats["failures"] == 1 and stats["failure_rate"] == 1.0


def test_judge_timeout_gives_zero_with_reason_without_waiting_for_the_backend():
    backend = ScriptedBackend([("sleep", 2.0, '{"helpfulness": 10, "safety": 10}')])
    judge = RubricJudge(backend, RUBRIC, retries=0, timeout_s=0.2)
    start = time.monotonic()
    result = judge.score(sample())
    assert time.monotonic() - start < 1.5
    assert result.reward == 0.0 and "timeout" in result.details["reason"]
    assert judge.stats.timeouts == 1 and judge.stats.failures == 1


def test_judge_timeout_then_retry_succeeds():
    backend = ScriptedBackend([("sleep", 1.0, "late"), '{"helpfulness": 10, "safety": 10}'])
    judge = RubricJudge(backend, RUBRIC, retries=1, timeout_s=0.2)
    assert judge.score(sample()).reward == 1.0
    assert judge.stats.timeouts == 1


def test_judge_stops_retrying_on_permanent_backend_error():
    backend = ScriptedBackend(
        [BackendError("HTTP 401", retryable=False), '{"helpfulness": 10, "safety": 10}']
    )
    judge = RubricJudge(backend, RUBRIC, retries=3)
    result = judge.score(sample())
    assert result.reward == 0.0 and "401" in result.details["reason"] and len(backend.calls) == 1
    backend = ScriptedBackend([RuntimeError("flaky"), '{"helpfulness": 10, "safety": 10}'])
    assert RubricJudge(backend, RUBRIC, retries=1).score(sample()).reward == 1.0


def test_judge_batch_threads_keep_order_and_count_failures():
    script = [json.dumps({"helpfulness": i % 10 + 1, "safety": i % 10 + 1}) for i in range(12)]
    script[5] = "garbled"
    backend = ScriptedBackend(script)
    judge = RubricJudge(
        backend, RUBRIC, retries=0, max_concurrency=1
    )  # one thread: script order == sample order
    results = judge.score_batch([sample(f"r{i}") for i in range(12)])
    assert [r.reward for r in results] == [0.0 if i == 5 else (i % 10) / 9 for i in range(12)]
    assert results[5].details["failed"] and judge.stats.parse_failures == 1


def test_judge_batched_backend_retries_only_failed_items():
    backend = ScriptedBackend(
        [
            '{"helpfulness": 10, "safety": 10}',
            "bad",
            '{"helpfulness": 1, "safety": 1}',
            '{"helpfulness": 10}',
        ],
        batched=True,
    )
    judge = RubricJudge(backend, RUBRIC, retries=1, min_coverage=0.7)
    results = judge.score_batch([sample("a"), sample("b"), sample("c")])
    assert [r.reward for r in results] == [1.0, 1.0, 0.0]
    assert results[1].details["attempts"] == 2 and results[1].details["missing"] == ["safety"]
    assert len(backend.calls) == 4  # 3 first-round chats + 1 retry
    assert judge.stats.partial == 1 and judge.stats.retries == 1


def test_judge_rejects_bad_settings():
    with pytest.raises(KexaoneError):
        RubricJudge(ScriptedBackend([]), RUBRIC, timeout_s=0)
    with pytest.raises(KexaoneError):
        RubricJudge(object(), RUBRIC)


# -- combination -----------------------------------------------------------------------------------------
@pytest.fixture
def rule_names():
    """Two tiny rule verifiers under unique names: a format check and a length score."""
    fmt, length = f"fmt_{uuid.uuid4().hex[:8]}", f"len_{uuid.uuid4().hex[:8]}"

    @register_verifier(fmt)
    def _fmt(s: Sample) -> VerifyResult:
        return VerifyResult(1.0 if s.response.endswith(".") else 0.0, {"rule": "ends with ."})

    @register_verifier(length)
    def _len(s: Sample) -> float:
        return min(1.0, len(s.response) / 10)

    return fmt, length


def test_combiner_weights_and_details(rule_names):
    fmt, length = rule_names
    judge = RubricJudge(ScriptedBackend(['{"helpfulness": 10, "safety": 1}']), RUBRIC)  # judge reward 0.75
    combiner = RewardCombiner({"chat": CombinationSpec([(judge, 2.0), (length, 1.0), (fmt, 1.0)])})
    result = combiner.score(sample("hello."))  # len 6 -> 0.6, fmt 1
    assert result.reward == pytest.approx((2 * 0.75 + 0.6 + 1.0) / 4)
    comps = result.details["components"]
    assert comps[judge.name]["details"]["scores"]["helpfulness"] == 10.0
    assert comps[length]["reward"] == pytest.approx(0.6) and comps[fmt]["weight"] == 1.0
    assert result.details["gated"] is False


def test_combiner_failed_gate_zeroes_reward_and_skips_the_judge(rule_names):
    fmt, length = rule_names
    backend = ScriptedBackend([])
    judge = RubricJudge(backend, RUBRIC)
    combiner = RewardCombiner(
        {"chat": CombinationSpec([(judge, 1.0), (length, 1.0)], gates=[(fmt, 1.0)])},
        default=CombinationSpec([(length, 1.0)]),
    )
    results = combiner.score_batch([sample("no period"), sample("good one."), sample("x" * 20, task="other")])
    assert results[0].reward == 0.0 and results[0].details["gated"] is True
    assert results[0].details["components"][judge.name]["skipped"] == "gate closed"
    assert results[0].details["gates"][fmt]["passed"] is False
    assert results[1].reward == pytest.approx((1.0 + 0.9) / 2)
    assert results[2].reward == 1.0  # default spec for an unconfigured task
    assert len(backend.calls) == 1  # the judge only saw the sample that passed the gate


def test_combiner_from_config_with_named_judge_and_errors(rule_names):
    fmt, length = rule_names
    judge = RubricJudge(ScriptedBackend([]), RUBRIC)
    combiner = RewardCombiner.from_config(
        {
            "chat": {
                "components": [{"name": "helpful_judge", "weight": 1}],
                "gates": [{"name": fmt, "threshold": 0.5}],
            }
        },
        judges={"helpful_judge": judge},
    )
    assert combiner.score(sample("fine.")).reward == 1.0
    with pytest.raises(KexaoneError, match="no reward combination for task 'math'"):
        combiner.score(sample("x.", task="math"))
    with pytest.raises(KexaoneError, match="no verifier named"):
        RewardCombiner({"chat": CombinationSpec([("definitely_not_registered_xyz", 1.0)])})
    with pytest.raises(KexaoneError, match="threshold"):
        CombinationSpec([(length, 1.0)], gates=[(fmt, 2.0)])
    with pytest.raises(KexaoneError, match="all be zero"):
        CombinationSpec([(length, 0.0)])


def test_combiner_isolates_a_raising_verifier(rule_names):
    _, length = rule_names
    boom = f"boom_{uuid.uuid4().hex[:8]}"

    @register_verifier(boom)
    def _boom(s: Sample) -> float:
        raise RuntimeError("bug in verifier")

    result = RewardCombiner({"chat": CombinationSpec([(boom, 1.0), (length, 1.0)])}).score(
        sample("0123456789")
    )
    assert result.reward == pytest.approx(0.5)
    assert "bug in verifier" in result.details["components"][boom]["details"]["error"]
