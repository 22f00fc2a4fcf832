"""Train a tiny model with RegularizedTrainer and dump the regularizer state of this process (used by test_distributed).

Run as ``accelerate launch --multi_gpu --num_processes 2 ddp_train.py OUT MODE PER_DEVICE_BATCH`` or as a plain
single process. MODE is ``deterministic`` (PACE-fast without noise, distance projection, label correction on RLRR, no
dropout), ``stochastic`` (PACE-full and TSRS on a PACE adapter) or ``causal_lm`` (a LoRA Llama with the distance
penalty: token-level loss, rows with different numbers of supervised tokens).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import make_tiny_bert  # noqa: E402
from peft import get_peft_model  # noqa: E402
from test_trainer import make_dataset  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from peft_tsrs import PACEConfig, RLRRConfig, RegularizerConfig, RegularizedTrainer  # noqa: E402


def causal_lm(out: str, per_device_batch: int) -> None:
    from datasets import Dataset
    from test_causal_lm import collate, lm_rows, lora, tiny_llama

    model = lora(tiny_llama())
    cfg = RegularizerConfig(distance_norm="frob", distance_mode="penalty", distance_penalty_weight=0.1)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device_batch, num_train_epochs=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
        train_sampling_strategy="sequential", optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        remove_unused_columns=False,
    )
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=Dataset.from_list(lm_rows(16)),
                                 data_collator=collate, regularizers=cfg)
    trainer.train()
    torch.save({"logs": [h for h in trainer.state.log_history if "loss" in h],
                "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                "world": trainer.accelerator.num_processes},
               os.path.join(out, f"rank{trainer.accelerator.process_index}.pt"))


def main(out: str, mode: str, per_device_batch: int) -> None:
    if mode == "causal_lm":
        return causal_lm(out, per_device_batch)
    torch.manual_seed(0)
    base = make_tiny_bert()
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if mode == "deterministic":
        model = get_peft_model(base, RLRRConfig(init_weights="kaiming", modules_to_save=["classifier"]))
        # threshold 0.2 < 1/3: every disagreeing 3-class prediction from epoch 1 on overwrites its label
        cfg = RegularizerConfig(pace_weight=0.5, pace_mode="fast", pace_sigma=0.0, distance_norm="frob",
                                distance_radius=0.05, label_correction_threshold=0.2, label_correction_start_epoch=1)
    else:
        model = get_peft_model(base, PACEConfig(r=2, sigma=0.5, modules_to_save=["classifier"]))
        cfg = RegularizerConfig(pace_weight=0.5, pace_mode="full", tsrs_weight=0.5, tsrs_inject_layer=1,
                         label_correction_threshold=0.34, label_correction_start_epoch=1, reweight_start_epoch=1)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device_batch, num_train_epochs=3, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
        train_sampling_strategy="sequential", optim="sgd", lr_scheduler_type="constant",
    )
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=make_dataset(32), regularizers=cfg)
    trainer.train()
    evaluation = trainer.evaluate(make_dataset(32, seed=1))  # sharded over the processes: histograms are summed
    rank = trainer.accelerator.process_index
    store = trainer.regularizers["pace"].store
    torch.save(
        {
            "labels": trainer.regularizers["self_labeling"].corrector.labels,
            "initial_labels": trainer.train_dataset["label"],
            "fast_store": None if store is None else store.stored.cpu(),
            "logs": [h for h in trainer.state.log_history if "loss" in h],
            "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "world": trainer.accelerator.num_processes,
            "predicted_classes": evaluation["eval_predicted_classes"],
            "predicted_histogram": trainer.collapse_monitor.last_predicted,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    finally:
        # Tear gloo down before the interpreter exits: left to the destructors, its worker threads can still be
        # running and the process aborts ("terminate called without an active exception") after a finished run.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
