"""Evidence v2 (issue #24): a stronger Fashion-MNIST ViT backbone, measured by the few-shot linear probe.

Each candidate is pretrained on the source classes 0-4 (``peft_tsrs.app.data.pretrained_fmnist_vit``, cached per
machine) and scored by :func:`~peft_tsrs.app.data.vit_pretrain.linear_probe_accuracy`: a logistic regression on its
frozen ``[CLS]`` features, trained on 8 (and 32) images per target class 5-9, tested on 200 per class, 5 draws.
The first candidate is v1's backbone. Writes ``results/v2/vit_backbone.{json,md}``::

    python -m benchmarks.vit_backbone            # pretrains what is not cached yet (minutes each on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Optional, Sequence

from . import RESULTS

OUT = os.path.join(RESULTS, "v2")
# pretrained_fmnist_vit keyword arguments; "key" names the candidate in the tables
CANDIDATES: tuple[dict[str, Any], ...] = (
    {"key": "v1", "epochs": 2.0},
    {"key": "s-aug-e8", "epochs": 8.0, "augment": True},
    {"key": "s-aug-rot-e4", "epochs": 4.0, "augment": True, "rotation_weight": 1.0},
)
SHOTS = (8, 32)


def measure(candidate: dict[str, Any]) -> dict[str, Any]:
    """Pretrain (or read the cache) and probe one candidate."""
    from peft_tsrs.app.data.vit_pretrain import METRICS_FILE, linear_probe_accuracy, pretrained_fmnist_vit

    kwargs = {k: v for k, v in candidate.items() if k != "key"}
    start = time.perf_counter()
    path = pretrained_fmnist_vit(**kwargs)
    with open(os.path.join(path, METRICS_FILE)) as fh:
        pretrain = json.load(fh)
    row = {**candidate, "folder": os.path.basename(path), "source_test_accuracy": pretrain["test_accuracy"],
           "pretrain_seconds": pretrain["train_seconds"], "parameters": pretrain.get("parameters"),
           "seconds_this_call": round(time.perf_counter() - start, 1)}
    for shots in SHOTS:
        row[f"probe_{shots}shot"] = linear_probe_accuracy(path, shots=shots)
    return row


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["# Evidence v2: the Fashion-MNIST ViT backbone", "",
             "Pretrained on Fashion-MNIST classes 0-4 (30k training images); linear probe on frozen `[CLS]` features "
             "of the target classes 5-9: logistic regression on 8 or 32 training images per class, 200 test images "
             "per class, mean ± std over 5 draws (%). Pretraining time as recorded when the backbone was built "
             "(machine and load dependent). Written by `python -m benchmarks.vit_backbone`.", "",
             "| backbone | folder | source test acc | probe 8 shots | probe 32 shots | pretraining s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        p8, p32 = r["probe_8shot"], r["probe_32shot"]
        lines.append(f"| {r['key']} | `{r['folder']}` | {100 * r['source_test_accuracy']:.1f} | "
                     f"{100 * p8['mean']:.1f} ± {100 * p8['std']:.1f} | {100 * p32['mean']:.1f} ± "
                     f"{100 * p32['std']:.1f} | {r['pretrain_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write(rows: Sequence[dict[str, Any]], out: str = OUT) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vit_backbone.json"), "w") as fh:
        json.dump({"candidates": list(rows)}, fh, indent=1)
    with open(os.path.join(out, "vit_backbone.md"), "w") as fh:
        fh.write(markdown(rows))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vit_backbone", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="candidate keys (default: all)")
    args = parser.parse_args(argv)
    rows = [measure(c) for c in CANDIDATES if args.only is None or c["key"] in args.only]
    write(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
