"""Train with checkpoints every 2 steps, optionally slowed down so a test can SIGKILL it mid-run, optionally resuming.

    python kill_resume_train.py OUT [--slow] [--resume]

Writes OUT/final.pt (trainable parameters and regularizer state) when training completes.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import make_tiny_bert  # noqa: E402
from peft import get_peft_model  # noqa: E402
from test_trainer import make_dataset  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from peft_tsrs import RLRRConfig, RegularizerConfig, RegularizedTrainer  # noqa: E402


class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"step {state.global_step}", flush=True)
        time.sleep(0.4)


def main(out: str, slow: bool, resume: bool) -> None:
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_bert(), RLRRConfig(init_weights="kaiming", modules_to_save=["classifier"]))
    cfg = RegularizerConfig(tsrs_weight=0.5, tsrs_inject_layer=1, pace_weight=0.5, pace_mode="fast", pace_sigma=1.0,
                     label_correction_threshold=0.34, label_correction_start_epoch=1, distance_norm="frob",
                     distance_radius=0.05)
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, num_train_epochs=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=2,
                             logging_steps=1, seed=0, full_determinism=True)
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=make_dataset(), regularizers=cfg,
                          callbacks=[Slow()] if slow else None)
    trainer.train(resume_from_checkpoint=resume or None)
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                "state": trainer.regularizer_state()}, os.path.join(out, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1], "--slow" in sys.argv, "--resume" in sys.argv)
