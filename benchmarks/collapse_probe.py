"""Where a TSRS collapse starts: how much the classifier's input still depends on the example, a few steps in.

LoRA + TSRS on WordNet / MiniLM (32 shots, 40% noisy labels, lr 2e-3: the setting where λ = 0.1 collapsed on every
seed of the generalization benchmark) is trained for ``--steps`` optimizer steps of the full run's schedule at each λ
of ``--weights``, from the same seed. Then, on the validation split, for every layer: the spread across examples of
the first token's vector (the [CLS] vector BERT's pooler and the classifier read: std over examples, averaged over
dimensions), and the number of distinct predicted classes. A collapsing run has a spread near zero at the top layer
and one predicted class.

    python -m benchmarks.collapse_probe                          # λ 0.1 and 0, 40 steps (≈ 2 min on 2 cores)
    python -m benchmarks.collapse_probe --weights 0.1 0.03 0.01 0 --steps 96

Writes ``benchmarks/results/collapse_probe.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from typing import Any, Optional, Sequence

import torch
from transformers import TrainerCallback, set_seed

from peft_tsrs.app.adapters import apply_adapter
from peft_tsrs.app.recipes import load_recipe
from peft_tsrs.app.run import training_arguments
from peft_tsrs.app.tasks import build_model, build_task
from peft_tsrs.trainer import RegularizedTrainer

from . import RESULTS
from .methods import GENERALIZATION_BY_KEY, recipe_files
from .notes import note

COMMAND = "python -m benchmarks.collapse_probe"
FILES = tuple(recipe_files("wordnet_minilm.yaml", GENERALIZATION_BY_KEY["lora+tsrs"]))  # its recipe files only
SETTING = ("task.shots_per_class=32", "task.label_noise=0.4", "training.learning_rate=2e-3", "diagnostics=false")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _StopAt(TrainerCallback):
    """Stop after ``steps`` optimizer steps, keeping the full run's learning-rate schedule."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True


@torch.no_grad()
def cls_spread(hidden_states: Sequence[torch.Tensor]) -> list[float]:
    """Per layer: std over examples of the first token's vector, averaged over dimensions."""
    return [float(h[:, 0].float().std(0).mean()) for h in hidden_states]


def probe(weight: float, steps: int, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train ``steps`` steps at TSRS weight ``weight`` and measure the validation split."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(list(FILES), [*SETTING, f"regularizers.tsrs_weight={weight}", f"output_dir={tmp}",
                                           *overrides])
        set_seed(recipe.training.seed)
        data = build_task(recipe)
        model = apply_adapter(build_model(recipe, data), recipe)
        args = training_arguments(recipe, recipe.run_dir, progress=False)
        args.eval_strategy, args.save_strategy, args.load_best_model_at_end = "no", "no", False
        trainer = RegularizedTrainer(model=model, args=args, train_dataset=data.splits["train"], data_collator=data.collator,
                              regularizers=recipe.regularizers, callbacks=[_StopAt(steps)])
        trainer.train()
    task_losses = [h["loss_task"] for h in trainer.state.log_history if "loss_task" in h]
    val = data.splits["validation"]
    batch = data.collator([val[i] for i in range(len(val))])
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}, output_hidden_states=True)
    return {"tsrs_weight": weight, "steps": trainer.state.global_step, "cls_spread": cls_spread(out.hidden_states),
            "predicted_classes": int(out.logits.argmax(-1).unique().numel()), "num_labels": data.num_labels,
            "last_task_loss": task_losses[-1] if task_losses else None}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    layers = len(rows[0]["cls_spread"]) if rows else 0
    lines = ["# Collapse probe (`python -m benchmarks.collapse_probe`)", "",
             note("collapse_probe", "Setup", date=meta["date"], command=meta["command"],
                  setting=" ".join(meta["setting"]), steps=meta["steps"]), "",
             "| TSRS λ | " + " | ".join(f"spread L{i}" for i in range(layers)) + " | predicted | last task loss |",
             "|---:|" + "---:|" * layers + "---:|---:|"]
    for r in rows:
        loss = "—" if r["last_task_loss"] is None else f"{r['last_task_loss']:.3f}"
        lines.append(f"| {r['tsrs_weight']:g} | " + " | ".join(f"{s:.4f}" for s in r["cls_spread"])
                     + f" | {r['predicted_classes']} / {r['num_labels']} | {loss} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="TSRS collapse probe (see the module docstring).")
    parser.add_argument("--weights", nargs="+", type=float, default=[0.1, 0.0], help="TSRS λ values (0 = plain LoRA)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps before measuring")
    parser.add_argument("--override", nargs="+", default=[], help="extra recipe overrides")
    parser.add_argument("--out", default=RESULTS, help="folder of collapse_probe.{json,md}")
    args = parser.parse_args(argv)
    if args.steps < 1 or any(w < 0 for w in args.weights):
        parser.error("--steps must be >= 1 and every --weights value >= 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = [probe(w, args.steps, args.override) for w in args.weights]
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "steps": args.steps,
            "setting": [*SETTING, *args.override],
            "command": " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "collapse_probe.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = markdown(rows, meta)
    with open(os.path.join(args.out, "collapse_probe.md"), "w") as f:
        f.write(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
