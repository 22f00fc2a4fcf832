"""WordNet noun glosses as a 26-way noun-category text classification data set."""

from __future__ import annotations

import os
from pathlib import Path

import datasets

DEFAULT_WORDNET_NOUNS = "/usr/share/wordnet/data.noun"
INSTALL_HINT = "sudo apt-get update && sudo apt-get install wordnet-base"

# Lexicographer files 03..28 (WordNet's lexnames), in order: lexfile 3 + i -> label i.
NOUN_CATEGORIES: tuple[str, ...] = (
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
)
_FIRST_NOUN_LEXFILE = 3


def wordnet_features() -> datasets.Features:
    """``text`` (str) and ``label`` (ClassLabel over the 26 noun categories)."""
    return datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(NOUN_CATEGORIES))}
    )


def _parse_line(line: str, lineno: int, path: str) -> tuple[str, int]:
    """``(text, label)`` of one synset line: first lemma + ': ' + gloss, lexfile 03..28 -> 0..25."""
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    if len(fields) < 5 or not sep:
        raise ValueError(
            f"{path}:{lineno}: not a WordNet data line (expected 'offset lexfile n count lemma ... | gloss')."
        )
    label = int(fields[1]) - _FIRST_NOUN_LEXFILE
    if not 0 <= label < len(NOUN_CATEGORIES):
        raise ValueError(f"{path}:{lineno}: lexicographer file {fields[1]} is not a noun category (03..28).")
    lemma = fields[4].replace("_", " ")
    return f"{lemma}: {gloss.strip()}", label


def load_wordnet_nouns(path: str | os.PathLike | None = None) -> datasets.Dataset:
    """Every noun synset of WordNet's ``data.noun`` as ``{"text": "lemma: gloss", "label": category}``.

    The label is the synset's lexicographer file (``noun.animal``, ``noun.artifact``, ... 26 classes). The first
    lemma is kept in the text so the task is the fair "which category is this noun" question.
    """
    file = Path(path) if path is not None else Path(DEFAULT_WORDNET_NOUNS)
    if not file.is_file():
        raise FileNotFoundError(
            f"WordNet noun file not found at {file}. Install it with `{INSTALL_HINT}` "
            "or pass path= to a WordNet 3.x `data.noun`."
        )
    texts: list[str] = []
    labels: list[int] = []
    with open(file, encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.startswith("  ") or not line.strip():  # licence header
                continue
            text, label = _parse_line(line.rstrip("\n"), lineno, str(file))
            texts.append(text)
            labels.append(label)
    if not texts:
        raise ValueError(f"{file} holds no synset lines; is it a WordNet `data.noun` file?")
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=wordnet_features())


def category_name(category: str) -> str:
    """The human-readable name of a lexicographer category, as an instruction-tuned model would answer it:
    ``noun.animal`` -> ``animal`` (``noun.Tops`` -> ``tops``)."""
    return category.split(".", 1)[-1].lower()
