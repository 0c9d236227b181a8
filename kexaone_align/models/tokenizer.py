"""An offline tokenizer that speaks K-EXAONE's chat format, for the tiny model kit.

The real K-EXAONE tokenizer (150k SuperBPE vocabulary) cannot be downloaded here, so the tiny kit trains a
small byte-level BPE on a built-in corpus. Byte-level means any UTF-8 text encodes and decodes exactly;
the corpus is English prose, digits and arithmetic, so math words are a token or two; every digit is
its own token.
Training is single-threaded over a fixed corpus, so the same code always builds the same tokenizer.

The chat format reproduces the structure of K-EXAONE's published template (the EXAONE 4.0 layout with
``<|role|>`` tokens). Every turn is ``<|role|>\\n`` + body + ``<|endofturn|>\\n``:

    <|system|>\\n{system}<|endofturn|>\\n
    <|user|>\\n{question}<|endofturn|>\\n
    <|assistant|>\\n<think>\\n\\n</think>\\n\\n{earlier answer}<|endofturn|>\\n
    <|user|>\\n{follow-up}<|endofturn|>\\n
    <|assistant|>\\n<think>\\n{reasoning}\\n</think>\\n\\n{answer}<|endofturn|>\\n

* Generation prompt: ``<|assistant|>\\n<think>\\n`` in reasoning mode (``enable_thinking=True``, the default,
  as in K-EXAONE), ``<|assistant|>\\n<think>\\n\\n</think>\\n\\n`` in non-reasoning mode.
* Assistant reasoning comes from ``message["reasoning_content"]`` or from a ``<think>...</think>`` prefix of
  ``message["content"]``. It is kept only for assistant messages after the last user message and only in
  reasoning mode; earlier turns (and everything in non-reasoning mode) render an empty think block, the way
  the real template drops the reasoning of past turns.
* Tools (``tools=[...]``) are listed in the system turn; assistant ``tool_calls`` render as
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` lines after the content; consecutive ``tool``
  messages share one ``<|tool|>`` turn, each result wrapped in ``<tool_result>...</tool_result>``.
* No BOS is written; ``<|endofturn|>`` is the EOS token the model stops on.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "[PAD]"
BOS_TOKEN = "[BOS]"
EOS_TOKEN = "<|endofturn|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
# Markup the model writes inside its own turns; added (matched in text) but not "special", so
# ``decode(..., skip_special_tokens=True)`` keeps them and reasoning can still be parsed out.
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_result>", "</tool_result>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

DEFAULT_VOCAB_SIZE = 1536
MODEL_MAX_LENGTH = 4096

CHAT_TEMPLATE = r"""{#- K-EXAONE chat format, reimplemented for kexaone-align -#}
{%- set reasoning_mode = enable_thinking if enable_thinking is defined else true -%}
{%- macro tool_listing(tools) -%}
{{- "# Tools\nYou may call one or more of the functions below. Their JSON schemas, one per <tool> tag:\n" -}}
{%- for tool in tools -%}
{{- "<tool>" ~ (tool | tojson) ~ "</tool>\n" -}}
{%- endfor -%}
{{- "\nTo call a function, write a JSON object with its name and arguments" -}}
{{- " between <tool_call> and </tool_call>:\n" -}}
{{- "<tool_call>{\"name\": \"function_name\", \"arguments\": {\"argument\": \"value\"}}</tool_call>" -}}
{%- endmacro -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for message in messages -%}
{%- if message.role == "user" -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- set i = loop.index0 -%}
{%- if message.role not in ["system", "user", "assistant", "tool"] -%}
{{- raise_exception("unknown chat role: " ~ message.role) -}}
{%- endif -%}
{%- if i == 0 and message.role != "system" and tools -%}
{{- "<|system|>\n" ~ tool_listing(tools) ~ "<|endofturn|>\n" -}}
{%- endif -%}
{%- if message.content is string -%}
{%- set text = message.content -%}
{%- elif message.content is iterable and message.content is not mapping -%}
{%- set text = message.content | selectattr("type", "equalto", "text") | map(attribute="text") | join("") -%}
{%- else -%}
{%- set text = "" -%}
{%- endif -%}
{%- if message.role == "system" -%}
{{- "<|system|>\n" ~ text -}}
{%- if i == 0 and tools -%}{{- "\n\n" ~ tool_listing(tools) -}}{%- endif -%}
{{- "<|endofturn|>\n" -}}
{%- elif message.role == "user" -%}
{{- "<|user|>\n" ~ text ~ "<|endofturn|>\n" -}}
{%- elif message.role == "assistant" -%}
{%- set reasoning = "" -%}
{%- set answer = text -%}
{%- if "</think>" in text -%}
{%- set reasoning = text.split("</think>")[0].replace("<think>", "").strip() -%}
{%- set answer = text.split("</think>")[-1].strip() -%}
{%- endif -%}
{%- if message.reasoning_content is string and message.reasoning_content -%}
{%- set reasoning = message.reasoning_content.strip() -%}
{%- endif -%}
{{- "<|assistant|>\n" -}}
{%- if reasoning_mode and i > ns.last_user and reasoning -%}
{{- "<think>\n" ~ reasoning ~ "\n</think>\n\n" -}}
{%- else -%}
{{- "<think>\n\n</think>\n\n" -}}
{%- endif -%}
{{- answer -}}
{%- if message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- if answer or not loop.first -%}{{- "\n" -}}{%- endif -%}
{%- set args = fn.arguments if fn.arguments is string else (fn.arguments | tojson) -%}
{{- "<tool_call>{\"name\": " ~ (fn.name | tojson) ~ ", \"arguments\": " ~ args ~ "}</tool_call>" -}}
{%- endfor -%}
{%- endif -%}
{{- "<|endofturn|>\n" -}}
{%- elif message.role == "tool" -%}
{%- if i == 0 or messages[i - 1].role != "tool" -%}{{- "<|tool|>\n" -}}{%- else -%}{{- "\n" -}}{%- endif -%}
{{- "<tool_result>" ~ text ~ "</tool_result>" -}}
{%- if loop.last or messages[i + 1].role != "tool" -%}{{- "<|endofturn|>\n" -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "<|assistant|>\n" -}}
{%- if reasoning_mode -%}{{- "<think>\n" -}}{%- else -%}{{- "<think>\n\n</think>\n\n" -}}{%- endif -%}
{%- endif -%}
"""

_PROSE = """\
The quick brown fox jumps over the lazy dog. A language model reads text and predicts the next token.
You are a helpful assistant. Answer the question and explain your reasoning step by step.
Let me think about this problem carefully before I answer. First, we need to find the total.
Then we add the numbers together and check the result. So the final answer is shown below.
The answer is correct because each step follows from the one before it. Therefore the answer holds.
If a train travels at a constant speed for two hours, how far does it go? Distance equals speed times time.
Alice has some apples and Bob gives her more. How many apples does Alice have now?
A rectangle has a width and a height; its area is the width multiplied by the height.
Write a short function that returns the sum of a list of numbers. The function should handle an empty list.
Please summarize the following paragraph in one sentence. The summary should be clear and concise.
Translate the sentence into simple English. Use short words and keep the meaning the same.
The weather today is sunny with a light wind. Tomorrow it will rain in the morning and clear up later.
Reward models score responses; the policy learns to prefer answers with higher reward.
We sample several responses for each prompt, compare them within the group, and update the policy.
Is the statement true or false? Choose one option: A, B, C or D. The correct option is B.
The user asked for a list. Here is the list, with one item on each line.
Sorry, I cannot help with that request, but I can suggest a safer alternative.
Thank you for your question. I hope this helps! Let me know if you have any other questions.
In this task you will read a story and answer questions about the people and places in it.
She opened the door, looked outside, and decided to walk to the library instead of taking the bus.
The experiment shows that the method works well on small models and scales to larger ones.
Check your work: substitute the value back into the equation and confirm both sides are equal.
The function call returned a result. Use the tool result to answer the question.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
if x > 0 and y < 0:
    return "mixed"
{"name": "calculator", "arguments": {"expression": "12 * 7"}}
Reply in lowercase letters only. End your reply with the word "done". Say thanks, then bye.
Follow the instructions in the question: the format, the style and the length of the reply all matter.
"""

_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve hundred thousand".split()


def _arithmetic_lines() -> list[str]:
    """Deterministic arithmetic drills, so digits, operators and answer phrasing get their own merges."""
    lines = []
    for a in range(0, 100, 3):
        for b in range(1, 60, 7):
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.")
            lines.append(f"Compute {a} * {b}. We get {a} * {b} = {a * b}.")
            lines.append(f"{a} - {b} = {a - b}, and {a + b} / {b} is about {round((a + b) / b, 2)}.")
    for n in range(200):
        lines.append(f"{n} + 1 = {n + 1}, {n} - 1 = {n - 1}, so {n} is between {n - 1} and {n + 1}.")
        lines.append(f"{n}: the answer is \\boxed{{{n}}}. Reply done. The answer is \\boxed{{{n}}}.")
    for i, word in enumerate(_NUMBER_WORDS):
        lines.append(f"The number {word} is written as {i if i < 13 else 10 ** (i - 11)}.")
    for d in range(10):  # column arithmetic in words: ones, tens, carry, borrow
        lines.append(f"ones: {d} + {9 - d} = 9, carry 0\ntens: {d} - {d} - 0 = 0, borrow 0\nso {d}")
    return lines


def training_corpus() -> list[str]:
    """The built-in corpus the tiny tokenizer is trained on (prose, code, JSON, arithmetic)."""
    prose = _PROSE.splitlines()
    # Paragraph breaks and indented code, so "\n\n" and runs of spaces are single tokens as in chat turns.
    paragraphs = ["\n\n".join(prose[i : i + 3]) for i in range(0, len(prose), 3)]
    return prose * 4 + paragraphs * 4 + _arithmetic_lines()


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE and wrap it with K-EXAONE's special tokens and chat template."""
    tokenizer = Tokenizer(models.BPE())
    # Newline runs are their own pre-tokens, so "\n\n" encodes the same at the end of a generation prompt
    # as in the middle of a turn ("</think>\n\nThe"), and the SFT and inference token streams agree.
    # Digits are split one per token (as many LLM tokenizers do): a number is a sequence of
    # digit tokens, so column arithmetic is copying digits, not recalling how each 2-digit token is spelt.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[*SPECIAL_TOKENS, *MARKUP_TOKENS],
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    # Register them as added tokens so they are matched whole in raw text (ids stay those from training).
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
