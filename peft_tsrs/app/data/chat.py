"""Instruction examples for a causal LM: a chat prompt and its answer as token ids, with the loss on the answer only.

Each example is the tokenizer's chat template applied to ``[system, user: text]`` with the generation prompt (the
prompt), followed by the answer and the template's end-of-turn marker (the answer). ``labels`` copy the answer's ids
and hold -100 on every prompt token, so a causal LM's loss (``model(..., labels=labels).loss``, which shifts by one)
counts the answer tokens only. The prompt ids are exactly what :func:`~peft_tsrs.app.generation.generate_answers` feeds
``model.generate``, so teacher-forced training and greedy generation see the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import datasets
import torch

IGNORE_INDEX = -100  # label of the tokens the loss skips (prompt, padding): PyTorch's cross-entropy ignore_index
_USER = "\x00USER\x00"  # placeholders located in the rendered template, so any template's wording is kept
_ANSWER = "\x00ANSWER\x00"


@dataclass(frozen=True)
class ChatFormat:
    """A chat template cut around the user text and the answer: ``prefix + text + suffix`` is the prompt,
    ``answer + end`` the completion (e.g. ``end = "<|im_end|>"``)."""

    prefix: str
    suffix: str
    end: str

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, system: str) -> "ChatFormat":
        """Render the tokenizer's chat template once with placeholders and cut it into the parts."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no chat template; an instruction task "
                             f"needs an instruct model (e.g. model.name: smollm2-135m-instruct).")
        turns = [{"role": "system", "content": system}, {"role": "user", "content": _USER}]
        prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": _ANSWER}], tokenize=False)
        if prompt.count(_USER) != 1 or not full.startswith(prompt) or _ANSWER not in full[len(prompt):]:
            raise ValueError(f"the chat template of {type(tokenizer).__name__} does not render a conversation as its "
                             f"generation prompt followed by the answer; it cannot be used for answer-only labels.")
        prefix, suffix = prompt.split(_USER)
        before, end = full[len(prompt):].split(_ANSWER)
        if before.strip():
            raise ValueError(f"the chat template puts {before!r} before the answer; not supported.")
        return cls(prefix=prefix, suffix=suffix + before, end=end.rstrip())


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def tokenize_chat(
    ds: datasets.Dataset | datasets.DatasetDict,
    tokenizer: Any,
    system: str,
    answers: Sequence[str],
    max_length: int = 64,
    text_column: str = "text",
    label_column: str = "label",
) -> datasets.Dataset | datasets.DatasetDict:
    """Instruction examples: ``text_column`` is the user turn, ``answers[label]`` the answer.

    Adds ``input_ids``, ``attention_mask``, ``labels`` (-100 on the prompt), ``prompt_length`` (the prompt's token
    count: ``input_ids[:prompt_length]`` is what generation starts from) and ``answer`` (the reference string); drops
    ``text_column`` and ``label_column``, keeps the rest (``index``). A text too long for ``max_length`` is cut at its
    end, never the template or the answer.
    """
    chat = ChatFormat.from_tokenizer(tokenizer, system)
    prefix, suffix = _ids(tokenizer, chat.prefix), _ids(tokenizer, chat.suffix)
    completions = [_ids(tokenizer, answer + chat.end) for answer in answers]
    room = max_length - len(prefix) - len(suffix) - max(len(c) for c in completions)
    if room < 1:
        raise ValueError(f"max_length {max_length} leaves no room for the text: the chat template takes "
                         f"{len(prefix) + len(suffix)} tokens and the longest answer {max(map(len, completions))}; "
                         f"raise task.max_length.")

    def encode(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_length": [],
                                "answer": []}
        texts = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        for text, label in zip(texts, batch[label_column]):
            prompt = prefix + list(text[:room]) + suffix
            completion = completions[label]
            out["input_ids"].append(prompt + completion)
            out["attention_mask"].append([1] * (len(prompt) + len(completion)))
            out["labels"].append([IGNORE_INDEX] * len(prompt) + completion)
            out["prompt_length"].append(len(prompt))
            out["answer"].append(answers[label])
        return out

    return ds.map(encode, batched=True, remove_columns=[text_column, label_column], desc="Tokenizing chat")


class ChatCollator:
    """Pads instruction examples on the right into a batch: ``input_ids`` with ``pad_token_id``, ``attention_mask``
    with 0, ``labels`` with -100. Integer columns listed in ``keep`` (the example ``index`` the regularizers read)
    become tensors; every other column (``answer``, ``prompt_length``) is dropped."""

    def __init__(self, pad_token_id: int, keep: Sequence[str] = ("index",)) -> None:
        self.pad_token_id = int(pad_token_id)
        self.keep = tuple(keep)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {key: torch.tensor([list(f[key]) + [pad] * (width - len(f[key])) for f in features], dtype=torch.long)
                 for key, pad in pads.items() if key in features[0]}
        for key in self.keep:
            if key in features[0]:
                batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        return batch
