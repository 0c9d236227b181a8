"""The offline tiny tokenizer: deterministic, lossless on any UTF-8, K-EXAONE's special tokens."""

import random

import pytest
from transformers import AutoTokenizer

from kexaone_align.models.tokenizer import MARKUP_TOKENS, ROLE_TOKENS, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x09, 0x0A), (0xA0, 0x2FF), (0x370, 0x3FF), (0x400, 0x4FF), (0x3040, 0x30FF),
              (0x4E00, 0x4FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1F64F), (0x10000, 0x1007F)]  # fmt: skip
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_build_is_deterministic(tok):
    again = build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_vocab_and_special_tokens(tok):
    assert 300 <= len(tok) <= 2048
    assert tok.eos_token == "<|endofturn|>"
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {0, 1, 2}
    for token in (*ROLE_TOKENS, *MARKUP_TOKENS):
        ids = tok.encode(f"x{token}y", add_special_tokens=False)
        assert tok.convert_tokens_to_ids(token) in ids, token  # matched whole inside running text
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)


@pytest.mark.parametrize(
    "text",
    ["", " ", "\n\n\t  ", "안녕하세요, K-EXAONE!", "naïve café — 🙂👍🏽", "x = 3.14159e-10\r\n", "\x00\x7f"],
)
def test_roundtrip_fixed(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_roundtrip_random_utf8(tok):
    rng = random.Random(1234)
    for _ in range(200):
        text = _random_text(rng, rng.randint(1, 60))
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_numbers_are_digit_tokens_and_arithmetic_words_are_short(tok):
    digit_ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    for n in range(200):  # the tiny tasks' operands and answers: one token per digit, with or without a space
        ids = tok.encode(str(n), add_special_tokens=False)
        assert ids == [digit_ids[int(d)] for d in str(n)], n
        assert tok.encode(f" {n}", add_special_tokens=False)[-len(ids) :] == ids
    question = "What is 23 + 45? The answer is 68."
    assert len(tok.encode(question, add_special_tokens=False)) <= 20
    for word in ("ones", "tens", " carry", " borrow"):  # the worked-steps vocabulary of the tiny tasks
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word


def test_newline_runs_encode_the_same_in_any_context(tok):
    nn = tok.encode("\n\n", add_special_tokens=False)
    assert len(nn) == 1
    assert tok.encode("</think>\n\nThe answer", add_special_tokens=False)[1:2] == nn


def test_skip_special_tokens_keeps_think_markup(tok):
    ids = tok.encode("<|assistant|>\n<think>\nhm\n</think>\n\nok<|endofturn|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "\n<think>\nhm\n</think>\n\nok"


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Let me think: 12 * 7 = 84. 🙂"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.chat_template == tok.chat_template
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (
        tok.eos_token_id,
        tok.pad_token_id,
        tok.bos_token_id,
    )
