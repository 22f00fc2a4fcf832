"""Evaluation of instruction tasks by generation: greedy answers to the chat prompts, scored by exact match.

:func:`generate_answers` feeds ``model.generate`` the prompt ids of :func:`~peft_tsrs.app.data.tokenize_chat`
(``input_ids[:prompt_length]``: the same tokens the model was trained on), left-padded in batches of similar length,
and decodes the new tokens up to the end-of-turn marker. :func:`exact_match` compares the normalized answers
(:func:`normalize_answer`: first line, lower case, whitespace collapsed, surrounding punctuation and quotes removed)
with the references; ``valid_answer`` is the fraction of answers that are one of the allowed names at all (the model
follows the instruction), right or wrong.

:class:`GenerationEvalMixin` adds these metrics to every ``Trainer.evaluate`` (``eval_exact_match``, ...), so a run
can select its checkpoint on validation exact match; the loss is still the teacher-forced loss on the answer tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from transformers import GenerationConfig

GENERATION_METRICS = ("exact_match", "valid_answer")
_STRIP = " \t\"'`*.,;:!?()[]{}<>"


def normalize_answer(text: str) -> str:
    """The comparable form of an answer: its first non-empty line, lower case, whitespace collapsed, surrounding
    punctuation, quotes and Markdown emphasis removed (``" Animal."`` -> ``"animal"``)."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    first = " ".join(lines[0].lower().split()) if lines else ""
    return first.strip(_STRIP)


def exact_match(predictions: Sequence[str], references: Sequence[str],
                answers: Optional[Sequence[str]] = None) -> dict[str, float]:
    """``exact_match``: fraction of predictions equal to their reference after :func:`normalize_answer`;
    ``valid_answer`` (when ``answers`` lists the allowed names): fraction of predictions that are one of them."""
    if len(predictions) != len(references):
        raise ValueError(f"exact_match: {len(predictions)} predictions for {len(references)} references.")
    pred = [normalize_answer(p) for p in predictions]
    ref = [normalize_answer(r) for r in references]
    n = max(1, len(pred))
    out = {"exact_match": sum(p == r for p, r in zip(pred, ref)) / n}
    if answers is not None:
        allowed = {normalize_answer(a) for a in answers}
        out["valid_answer"] = sum(p in allowed for p in pred) / n
    return out


def _stop_ids(tokenizer: Any, end: str) -> list[int]:
    """Token ids that end an answer: the end-of-turn marker when it is one token, and the EOS token."""
    ids = []
    if end:
        end_ids = tokenizer(end, add_special_tokens=False)["input_ids"]
        if len(end_ids) == 1:
            ids.append(int(end_ids[0]))
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int = 8,
                     batch_size: int = 32, end: str = "") -> list[str]:
    """Greedy completions of the token-id ``prompts`` (in their order), decoded without special tokens and cut at
    the end-of-turn string ``end``. Prompts are sorted by length and left-padded in batches of ``batch_size``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token; set "
                         f"tokenizer.pad_token before generating.")
    stops = _stop_ids(tokenizer, end)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=int(pad),
                              eos_token_id=stops or None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        for start in range(0, len(order), max(1, batch_size)):
            rows = order[start:start + max(1, batch_size)]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in rows], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows],
                                device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, tokens in zip(rows, out[:, width:].tolist()):
                cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
                text = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
                answers[row] = text.split(end)[0] if end else text
    finally:
        model.train(was_training)
    return answers


@dataclass
class GenerationEval:
    """How an instruction task is scored: greedy answers (``max_new_tokens``, ``batch_size``) to the prompts of a
    :func:`~peft_tsrs.app.data.tokenize_chat` dataset, exact match against its ``answer`` column; ``answers``
    lists the allowed names (for ``valid_answer``), ``end`` is the chat template's end-of-turn marker."""

    tokenizer: Any
    answers: Sequence[str]
    end: str = ""
    max_new_tokens: int = 8
    batch_size: int = 32

    def predict(self, model: Any, dataset: Any) -> list[str]:
        prompts = [ids[:n] for ids, n in zip(dataset["input_ids"], dataset["prompt_length"])]
        return generate_answers(model, self.tokenizer, prompts, self.max_new_tokens, self.batch_size, self.end)

    def __call__(self, model: Any, dataset: Any) -> dict[str, float]:
        """``exact_match``, ``valid_answer`` and ``generation_seconds`` of ``model`` on ``dataset``."""
        missing = [c for c in ("input_ids", "prompt_length", "answer") if c not in dataset.column_names]
        if missing:
            raise ValueError(f"generation evaluation needs the columns of tokenize_chat; missing {missing}.")
        start = time.perf_counter()
        predictions = self.predict(model, dataset)
        scores = exact_match(predictions, dataset["answer"], self.answers)
        scores["generation_seconds"] = round(time.perf_counter() - start, 2)
        return scores


class GenerationEvalMixin:
    """Adds generation metrics to ``Trainer.evaluate``: ``<prefix>_exact_match``, ``<prefix>_valid_answer`` and
    ``<prefix>_generation_seconds`` on the dataset evaluated, next to the teacher-forced ``<prefix>_loss``.

    ``class MyTrainer(GenerationEvalMixin, Trainer)``, built with ``generation=GenerationEval(...)``. Every process
    generates on the whole evaluation set (the same numbers everywhere; fine for the small sets of the recipes).
    """

    def __init__(self, *args: Any, generation: GenerationEval, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generation = generation
        self._generation_dataset = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):  # one of several named eval sets (Trainer's dict form)
            dataset = self.eval_dataset[dataset]
        if isinstance(dataset, dict):  # Trainer calls evaluate again for each named set
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        previous, self._generation_dataset = self._generation_dataset, dataset
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._generation_dataset = previous

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        # the loss only: the logits of a causal LM (batch x length x vocabulary) are never gathered
        output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
        if self._generation_dataset is not None:
            scores = self.generation(self.model, self._generation_dataset)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
        return output

