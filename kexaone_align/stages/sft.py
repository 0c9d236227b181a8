"""SFT: next-token likelihood of the assistant's tokens (reasoning and non-reasoning chats alike).

Read as the recipe does: load chat rows (generated or from files), tokenize them with the K-EXAONE
template and an assistant-only loss mask, hold some out, then run ``sft.epochs`` passes (or
``sft.max_steps`` optimizer steps) of ``sft.loss`` (``sft_loss`` unless the recipe names another) on the
DeepSpeed learners, evaluate held-out loss, checkpoint along the way and export the policy for the next
stage.

With ``sft.packing`` several conversations share a row of ``max_seq_len`` tokens (``sft.batch_size``
then counts packed rows); the learner restarts positions and masks attention per conversation, so
nothing leaks between them. Without it each conversation is a right-padded row of its own.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import Tensor

from kexaone_align.config import Recipe
from kexaone_align.errors import KexaoneError
from kexaone_align.losses import stage_loss
from kexaone_align.stages.common import (
    StageRun,
    finish_stage,
    make_learners,
    prepare_policy,
    start_ray,
    tokenizer_source,
    write_summary,
)

logger = logging.getLogger(__name__)
EVAL_BATCH_ROWS = 64
ACCURACY_ROWS = 200  # held-out prompts answered greedily after training (tiny generator only)


# ------------------------------------------------------------------------------------------ data
def load_sft_rows(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) chat rows from ``data``: the offline generator, or train/eval files.

    Rows of other shapes are mapped by ``data.columns``. Without ``eval_files`` or ``eval_split``,
    ``data.eval_fraction`` of the training rows is held out.
    """
    from kexaone_align.data.columns import ColumnMap
    from kexaone_align.data.sft import load_chat_dataset, train_eval_split
    from kexaone_align.data.sources import recipe_sources

    data = recipe.data
    if data is None:
        raise KexaoneError("stage 'sft' needs a data section")
    if data.generator:
        from kexaone_align.data.tiny_tasks import generate_rows

        opts = dict(data.generator_options)
        frac = data.reasoning_fraction
        train = generate_rows(data.generator, "sft", data.num_train, recipe.seed, "train",
                              reasoning_fraction=frac, **opts)  # fmt: skip
        held = generate_rows(data.generator, "sft", data.num_eval, recipe.seed, "heldout",
                             reasoning_fraction=frac, **opts)  # fmt: skip
        return train, held
    if not data.train_files:
        raise KexaoneError("data: give train_files or a generator for stage 'sft'")
    src = recipe_sources(data)
    columns = ColumnMap.from_section(data.columns)
    ds = load_chat_dataset(src.train, columns=columns, options=src.train_options)
    if src.held is not None:
        held_ds = load_chat_dataset(src.held, columns=columns, options=src.held_options)
    else:
        ds, held_ds = train_eval_split(ds, data.eval_fraction, recipe.seed)
    return [dict(r) for r in ds], [dict(r) for r in held_ds]


def epoch_order(num_rows: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Row order of one epoch: a seeded permutation (or the file order), the same on every resume."""
    if not shuffle:
        return list(range(num_rows))
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_rows, generator=gen).tolist()


def step_rows(num_rows: int, batch_size: int, step: int, seed: int, shuffle: bool) -> list[int]:
    """Rows optimizer step ``step`` (0-based) trains on; epochs wrap, an epoch's last batch may be short."""
    per_epoch = math.ceil(num_rows / batch_size)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(num_rows, epoch, seed, shuffle)
    return order[index * batch_size : (index + 1) * batch_size]


def make_batch(rows: list[Any], pad_token_id: int) -> dict[str, Tensor]:
    """Learner batch of tokenized ``(input_ids, loss_mask)`` rows (right-padded) or of ``PackedBatch`` rows.

    Packed batches carry ``sequence_ids``, which is what tells the learner to keep samples apart.
    """
    from kexaone_align.data.packing import PackedBatch, collate_packed
    from kexaone_align.runtime.batching import collate

    if rows and isinstance(rows[0], PackedBatch):
        packed = collate_packed(rows, pad_token_id=pad_token_id)
        return {
            "input_ids": packed["input_ids"],
            "attention_mask": (packed["sequence_ids"] >= 0).long(),
            "loss_mask": packed["loss_mask"],
            "sequence_ids": packed["sequence_ids"],
        }
    return collate([r[0] for r in rows], [r[1] for r in rows], pad_token_id=pad_token_id)


def pack_rows(rows: list[tuple[list[int], list[int]]], max_seq_len: int, seed: int) -> list[Any]:
    """Conversations packed first-fit into rows of ``max_seq_len`` tokens, after a seeded shuffle.

    Shuffling first mixes short and long (reasoning and non-reasoning) conversations within a row.
    """
    from kexaone_align.data.packing import pack_sequences

    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return pack_sequences([rows[i] for i in order], max_seq_len, sort_by_length=False)


# ------------------------------------------------------------------------------------- training
def evaluate_loss(
    learners: Any, rows: list[tuple[list[int], list[int]]], pad_token_id: int
) -> dict[str, float]:
    """Held-out mean NLL per assistant token (and its perplexity)."""
    if not rows:
        return {}
    total, count = 0.0, 0.0
    for start in range(0, len(rows), EVAL_BATCH_ROWS):
        batch = make_batch(rows[start : start + EVAL_BATCH_ROWS], pad_token_id)
        logprobs = learners.forward_logprobs(batch)
        mask = batch["loss_mask"].bool()
        total += float(-logprobs[mask].sum())
        count += float(mask.sum())
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _prompt_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in row["messages"] if m["role"] != "assistant"]


def greedy_accuracy(
    model_dir: str, rows: list[dict[str, Any]], limit: int, max_new_tokens: int = 96
) -> dict[str, float]:
    """Greedy held-out accuracy of the exported model on generated arithmetic rows (last ``\\boxed{}``).

    Only for the tiny generator, whose rows carry the true answer in ``metadata.answer``. Reported overall
    and per mode: non-reasoning rows must answer unseen problems from memory, reasoning rows can work
    them out digit by digit, so the two differ a lot. Prompts are decoded in left-padded batches.
    """
    from transformers import AutoModelForCausalLM

    from kexaone_align.data.chat_format import render_prompt
    from kexaone_align.models import load_tokenizer

    # tool-use rows need an environment to answer (their AGAPO evaluation plays the episodes): not here
    rows = [r for r in rows if (r.get("metadata") or {}).get("answer") is not None and not r.get("tools")]
    rows = rows[:limit]
    if not rows:
        return {}
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    results: dict[bool, list[bool]] = {True: [], False: []}
    formatted = 0
    for start in range(0, len(rows), EVAL_BATCH_ROWS):
        chunk = rows[start : start + EVAL_BATCH_ROWS]
        prompts = [render_prompt(tok, _prompt_messages(r), bool(r.get("enable_thinking"))) for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tok.eos_token_id, pad_token_id=pad,
            )  # fmt: skip
        for row, generated in zip(chunk, out[:, width:], strict=True):
            found = [f.strip() for f in _BOXED.findall(tok.decode(generated, skip_special_tokens=True))]
            formatted += bool(found and found[-1])
            correct = bool(found) and found[-1] == str(row["metadata"]["answer"])
            results[bool(row.get("enable_thinking"))].append(correct)
    scored = results[True] + results[False]
    out_metrics = {"eval_accuracy": sum(scored) / len(scored), "eval_boxed_frac": formatted / len(rows)}
    for thinking, name in ((True, "reasoning"), (False, "non_reasoning")):
        if results[thinking]:
            out_metrics[f"eval_accuracy_{name}"] = sum(results[thinking]) / len(results[thinking])
    out_metrics["eval_n"] = len(rows)
    return out_metrics


def total_steps(recipe: Recipe, num_rows: int) -> int:
    """Optimizer steps of the run: ``sft.epochs`` over the data, capped by ``sft.max_steps``."""
    sft = recipe.sft
    steps = sft.epochs * math.ceil(num_rows / sft.batch_size)
    return min(steps, sft.max_steps) if sft.max_steps else steps


def run(recipe: Recipe) -> dict[str, Any]:
    """Run the SFT stage; returns (and writes to ``<run_dir>/summary.json``) its summary."""
    from kexaone_align.data.sft import tokenize_sft_rows
    from kexaone_align.models import load_tokenizer

    sft = recipe.sft
    if sft is None:
        raise KexaoneError("stage 'sft' needs an sft section")
    if not sft.assistant_only_loss:
        raise KexaoneError("sft.assistant_only_loss: false is not supported (loss is on assistant tokens)")
    loss = stage_loss(recipe, "sft")  # checked before Ray starts
    start_ray(recipe)
    model_path = prepare_policy(recipe)
    tok_path = tokenizer_source(recipe, model_path)
    tokenizer = load_tokenizer(tok_path)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    train_rows, held_rows = load_sft_rows(recipe)
    train = tokenize_sft_rows(train_rows, tokenizer, sft.max_seq_len)
    held = tokenize_sft_rows(held_rows, tokenizer, sft.max_seq_len)
    if not train:
        raise KexaoneError("sft: no training row has an assistant token left after tokenization")
    examples = pack_rows(list(train), sft.max_seq_len, recipe.seed) if sft.packing else list(train)
    steps = total_steps(recipe, len(examples))
    shuffle = recipe.data.shuffle
    with StageRun(recipe, steps) as run_:
        learners = make_learners(recipe, model_path, steps, overrides={"loss_aggregation": loss.aggregation})
        try:
            run_.restore(learners)
            while run_.step < steps:
                picked = step_rows(len(examples), sft.batch_size, run_.step, recipe.seed, shuffle)
                metrics = learners.train_step(make_batch([examples[i] for i in picked], pad), loss)
                metrics["learner_tokens_per_s"] = metrics.pop("tokens_per_s", 0.0)
                metrics["epoch"] = min(run_.step + 1, steps) * sft.batch_size / len(examples)
                run_.log(metrics)
                if sft.eval_every_steps and run_.step % sft.eval_every_steps == 0 and run_.step < steps:
                    run_.log_eval(evaluate_loss(learners, held, pad))
                run_.maybe_checkpoint(learners)
            evaluation = evaluate_loss(learners, held, pad)
            run_.log_eval(evaluation)
            data = {
                "train_rows": len(train),
                "heldout_rows": len(held),
                "truncated": len(train.truncated),
                "dropped": len(train.dropped),
                "packed_rows": len(examples) if sft.packing else None,
            }
            summary = finish_stage(run_, learners, {"eval": evaluation, "data": data}, tokenizer=tok_path)
        finally:
            learners.shutdown()
    if recipe.data.generator and summary.get("export"):
        greedy = greedy_accuracy(summary["export"], held_rows, ACCURACY_ROWS)
        summary["eval"].update(greedy)
        if "eval_accuracy" in greedy:  # the key the pipeline summary reads, like AGAPO's
            summary["eval"]["accuracy"] = greedy["eval_accuracy"]
        write_summary(recipe.resolved_run_dir, summary)
    return summary
