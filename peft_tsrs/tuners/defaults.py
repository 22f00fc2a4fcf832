"""Default target modules per transformers ``model_type`` (names of transformers 4.x and 5.x both listed, so the
defaults keep working across versions; names absent from a model are simply not matched)."""

from __future__ import annotations

# Names of the classification head in transformers' *ForImageClassification / *ForSequenceClassification models
# (``classifier``: encoders and ViTs; ``score``: decoder-only LMs' last-token classifiers): the default heads that PACE
# noises (PACEConfig.head_modules). A causal LM's ``lm_head`` is not one: its logits are not noised. A tuple, so no
# caller can change it in place; pass ``list(DEFAULT_HEAD_MODULES)`` where a list is wanted (``modules_to_save``).
DEFAULT_HEAD_MODULES: tuple[str, ...] = ("classifier", "score")

_BERT_LIKE = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_VIT_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", *_BERT_LIKE]
# Decoder-only LMs with Llama's block layout: attention projections and the gated MLP.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LINEAR_TARGETS: dict[str, list[str]] = {
    "vit": _VIT_LIKE,
    "deit": _VIT_LIKE,
    "vit_mae": _VIT_LIKE,
    "dinov2": _VIT_LIKE,
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}

# LayerNorms (and the ViT patch embedding) that get SSF scale/shift.
SSF_TARGETS: dict[str, list[str]] = {
    "vit": ["layernorm_before", "layernorm_after", "layernorm", "patch_embeddings.projection"],
    "deit": ["layernorm_before", "layernorm_after", "layernorm", "patch_embeddings.projection"],
    "dinov2": ["norm1", "norm2", "layernorm", "patch_embeddings.projection"],
    "bert": ["LayerNorm"],
    "roberta": ["LayerNorm"],
    "xlm-roberta": ["LayerNorm"],
    "electra": ["LayerNorm"],
    "camembert": ["LayerNorm"],
    "distilbert": ["sa_layer_norm", "output_layer_norm", "LayerNorm"],
}


def default_targets(table: dict[str, list[str]], model_type: str | None, what: str, method: str) -> set[str]:
    """Look up defaults or say how to pass them explicitly."""
    if model_type not in table:
        known = ", ".join(sorted(table))
        raise ValueError(
            f"{method}: no default `{what}` for model type {model_type!r} (known: {known}). Pass `{what}` "
            f"explicitly, e.g. {what}=['q_proj', 'v_proj'] with the nn.Linear names printed by `print(model)`."
        )
    return set(table[model_type])
