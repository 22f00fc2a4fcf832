"""TSRS beyond encoders: decoder-only (Llama, GPT-2, Qwen2, Mistral) and encoder-decoder (BART, T5) sequence
classifiers, whose heads pool with ``input_ids`` after the blocks; tiny models built from configs."""

from __future__ import annotations

import datasets
import pytest
import torch
import transformers as tf
from conftest import make_tiny_bert
from peft import LoraConfig, get_peft_model
from test_regularizers_noise_stability import _no_dropout, _reference
from torch import nn

from peft_tsrs import RegularizerConfig
from peft_tsrs.regularizers import NoiseStability, find_blocks, relative_perturbation, shared_dropout
from peft_tsrs.trainer import RegularizedTrainer

VOCAB, LABELS, PAD = 50, 3, 0


def _build(cls, config):
    torch.manual_seed(0)
    return cls(config).train()


def llama(layers=3, dropout=0.1):
    return _build(tf.LlamaForSequenceClassification, tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, num_labels=LABELS, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2, attention_dropout=dropout, use_cache=False))


def qwen2(layers=3, dropout=0.1):
    return _build(tf.Qwen2ForSequenceClassification, tf.Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, num_labels=LABELS, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2, attention_dropout=dropout, use_cache=False))


def mistral(layers=3, dropout=0.1):
    return _build(tf.MistralForSequenceClassification, tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, num_labels=LABELS, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=2, attention_dropout=dropout, use_cache=False))


def gpt2(layers=3, dropout=0.1):
    return _build(tf.GPT2ForSequenceClassification, tf.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=32, num_labels=LABELS, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, use_cache=False))


def bart(layers=3, dropout=0.1):  # pad 1, bos 0, eos 2 as in facebook/bart-*
    return _build(tf.BartForSequenceClassification, tf.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=layers, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        num_labels=LABELS, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        dropout=dropout, attention_dropout=dropout, use_cache=False))


def t5(layers=3, dropout=0.1):  # pad 0 (also the decoder start), eos 1 as in t5-*
    return _build(tf.T5ForSequenceClassification, tf.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=layers, num_heads=2,
        num_labels=LABELS, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=dropout,
        use_cache=False))


_LENGTHS = (7, 5, 4, 6)  # real tokens per row: padding in every row but the first


def padded_inputs(side: str = "right", batch: int = 4, seq: int = 7) -> dict[str, torch.Tensor]:
    """Token ids padded on the ``side`` with ``PAD`` (decoder-only models pool the last non-pad token)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, n in enumerate(_LENGTHS[:batch]):
        mask[row, :n] = 1
        if side == "left":
            mask[row] = mask[row].flip(0)
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}


def eos_inputs(bos, eos, pad, batch: int = 4, seq: int = 7) -> dict[str, torch.Tensor]:
    """``[bos] tokens <eos> <pad>…``: one ``<eos>`` per row (BART and T5 pool it), padded on the right."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, n in enumerate(_LENGTHS[:batch]):
        mask[row, :n] = 1
        if bos is not None:
            ids[row, 0] = bos
        ids[row, n - 1] = eos
        ids[row, n:] = pad
    return {"input_ids": ids, "attention_mask": mask}


# name -> (factory, inputs factory, blocks path, LoRA targets)
ARCHS = {
    "llama-right": (llama, lambda **kw: padded_inputs("right", **kw), "model.layers", ["q_proj", "v_proj"]),
    "llama-left": (llama, lambda **kw: padded_inputs("left", **kw), "model.layers", ["q_proj", "v_proj"]),
    "gpt2-right": (gpt2, lambda **kw: padded_inputs("right", **kw), "transformer.h", ["c_attn"]),
    "gpt2-left": (gpt2, lambda **kw: padded_inputs("left", **kw), "transformer.h", ["c_attn"]),
    "qwen2-left": (qwen2, lambda **kw: padded_inputs("left", **kw), "model.layers", ["q_proj", "v_proj"]),
    "mistral-right": (mistral, lambda **kw: padded_inputs("right", **kw), "model.layers", ["q_proj", "v_proj"]),
    "bart": (bart, lambda **kw: eos_inputs(0, 2, 1, **kw), "model.decoder.layers", ["q_proj", "v_proj"]),
    "t5": (t5, lambda **kw: eos_inputs(None, 1, 0, **kw), "transformer.decoder.block", ["q", "v"]),
}


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return ARCHS[request.param]


def test_blocks_are_those_feeding_the_head(arch):
    make, _, path, _ = arch
    model = make()
    found, blocks = find_blocks(model)
    assert found == path and len(blocks) == 3  # the decoder of BART / T5, not their (2-block) encoder


def test_halves_zero_noise_and_clean_path(arch):
    make, inputs_fn, _, _ = arch
    inputs = inputs_fn()
    # σ = 0 with dropout on: the clean and noisy copies share every dropout mask, so they are identical
    model = make()
    ns = NoiseStability(model, inject_layer=1, noise_std=0.0)
    with shared_dropout(4), ns.capture():
        out = model(**inputs)
    clean, noisy = ns.split(out.logits)
    assert out.logits.shape == (8, LABELS) and clean.shape == noisy.shape == (4, LABELS)
    torch.testing.assert_close(clean, noisy, atol=1e-6, rtol=0)
    assert ns.loss(ns.token_mask(inputs)).item() == pytest.approx(0.0, abs=1e-6)
    # without dropout the clean half is the plain forward (the head pooled each row's own token), the noisy one is not
    model = make(dropout=0.0)
    with torch.no_grad():
        plain = model(**inputs).logits
    ns = NoiseStability(model, inject_layer=1, noise_std=0.5)
    with ns.capture():
        clean, noisy = ns.split(model(**inputs).logits)
    torch.testing.assert_close(clean, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(clean, noisy)
    assert torch.isfinite(ns.loss(ns.token_mask(inputs)))


def test_below_injection_runs_once_on_the_batch(arch):
    make, inputs_fn, path, _ = arch
    model = make(dropout=0.0)
    ns = NoiseStability(model, inject_layer=2)
    rows: dict[str, set[int]] = {}

    def spy(name):
        def hook(module, args, output):
            out = output if isinstance(output, torch.Tensor) else output[0]
            rows.setdefault(name, set()).add(out.shape[0])
        return hook

    watched = [("tokens", m) for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == VOCAB]
    watched += [("block 1", ns.blocks[1]), ("block 2", ns.blocks[2])]
    if "decoder" in path:  # BART / T5: the encoder runs once too
        watched += [("encoder", block) for block in find_blocks(model, path.replace("decoder", "encoder"))[1]]
    handles = [m.register_forward_hook(spy(name)) for name, m in watched]
    with ns.capture():
        model(**inputs_fn())
    for handle in handles:
        handle.remove()
    expected = {"tokens": {4}, "block 1": {4}, "block 2": {8}}
    assert rows == (expected | {"encoder": {4}} if "decoder" in path else expected)


@pytest.mark.parametrize("name", ["llama-left", "gpt2-right"])
def test_loss_matches_hand_rolled_reference(name):
    make, inputs_fn, _, _ = ARCHS[name]
    model = make(layers=4, dropout=0.0)
    _, blocks = find_blocks(model)
    ns, out, clean_logits, _, _, expected = _reference(model, blocks, inputs_fn(batch=3), 1, 2, 0.2, 0.7)
    torch.testing.assert_close(ns.split(out.logits)[0], clean_logits, atol=1e-5, rtol=1e-5)
    assert ns.loss().item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", ["llama-left", "llama-right", "bart"])
def test_norms_cover_real_tokens_only(name):
    make, inputs_fn, _, _ = ARCHS[name]
    model = make(dropout=0.0)
    inputs = inputs_fn()
    ns = NoiseStability(model, inject_layer=0, noise_std=0.3)
    with ns.capture():
        model(**inputs)
    mask = ns.token_mask(inputs)
    keep = mask.bool()
    by_index = torch.stack([relative_perturbation(*(half[keep] for half in ns.split(out))) for out in ns._records])
    assert ns.loss(mask).item() == pytest.approx(by_index.mean().item(), rel=1e-5)
    assert ns.loss(mask).item() != pytest.approx(ns.loss().item(), rel=1e-3)  # padding would change the term


def test_decoder_mask_follows_the_shifted_decoder_inputs():
    inputs = ARCHS["bart"][1]()
    model = bart()
    ns = NoiseStability(model)
    decoder_ids = tf.models.bart.modeling_bart.shift_tokens_right(inputs["input_ids"], 1, 2)
    torch.testing.assert_close(ns.token_mask(inputs), (decoder_ids != 1).long())  # start token + every real token
    assert ns.token_mask({**inputs, "decoder_attention_mask": inputs["attention_mask"]}) is inputs["attention_mask"]
    assert ns.token_mask({**inputs, "decoder_input_ids": decoder_ids}) is None
    assert NoiseStability(llama()).token_mask(inputs) is inputs["attention_mask"]


def test_trainer_step_reaches_lora(arch, tmp_path):
    make, inputs_fn, path, targets = arch
    inputs = inputs_fn()
    labels = torch.tensor([0, 1, 2, 1])
    ds = datasets.Dataset.from_dict({**{k: v.tolist() for k, v in inputs.items()}, "label": labels.tolist()})
    model = get_peft_model(make(), LoraConfig(target_modules=targets, r=2, fan_in_fan_out=targets == ["c_attn"]))
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                save_strategy="no", disable_tqdm=True)
    cfg = RegularizerConfig(tsrs_weight=0.5, tsrs_inject_layer=1)
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=ds, regularizers=cfg)
    assert trainer.regularizers["tsrs"].stability.block_path == path
    model.train()
    loss = trainer.compute_loss(model, {**inputs, "labels": labels})
    assert torch.isfinite(loss) and trainer._components["loss_tsrs"][-1] > 0
    loss.backward()
    lora_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values())


# --- what stays unsupported is refused with the cause ------------------------------------------------------
def test_encoder_of_an_encoder_decoder_is_refused():
    with pytest.raises(ValueError, match=r"BartForSequenceClassification.*encoder.*block_path='model\.decoder\.layers'"):
        NoiseStability(bart(), block_path="model.encoder.layers")
    with pytest.raises(ValueError, match=r"T5ForSequenceClassification.*'transformer\.decoder\.block'"):
        NoiseStability(t5(), block_path="transformer.encoder.block")


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, hidden_states):
        return self.lin(hidden_states)


class _PoolsInsideTrunk(nn.Module):
    """Pools by ``ids`` after its blocks, inside the module that holds them (as CLIP's text transformer does)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_Block() for _ in range(2)])

    def forward(self, ids, repeat=1):
        h = self.emb(ids)
        for _ in range(repeat):
            for layer in self.layers:
                h = layer(h)
        return h[torch.arange(h.shape[0]), ids.argmax(-1)]


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _PoolsInsideTrunk()
        self.head = nn.Linear(4, 2)

    def forward(self, ids, repeat=1):
        return self.head(self.trunk(ids, repeat))


def test_errors_in_the_forward_name_the_cause():
    model = _Classifier().train()
    ns = NoiseStability(model, inject_layer=1)
    ids = torch.randint(0, 10, (3, 5))
    with pytest.raises(IndexError) as info:
        with ns.capture():
            model(ids)
    assert any("doubled the batch (3 -> 6 rows" in note and "block_path" in note for note in info.value.__notes__)
    with pytest.raises(RuntimeError, match=r"ran twice in one forward.*weight-shared"):
        with ns.capture():
            model(ids, repeat=2)
    decoder = llama()
    with pytest.raises(ValueError, match=r"do not pass `labels`.*ns\.split"):
        with NoiseStability(decoder).capture():
            decoder(**padded_inputs(), labels=torch.zeros(4, dtype=torch.long))


def test_multiple_choice_head_reshaping_its_inputs_still_works():
    """The top-level forward views ``(B, C, L)`` inputs as ``(B·C, L)`` before the trunk: mapped back to ``B·C``."""
    torch.manual_seed(0)
    model = tf.BertForMultipleChoice(make_tiny_bert().config)
    model = _no_dropout(model).train()
    ids = torch.randint(1, 50, (2, 3, 6))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    ns = NoiseStability(model, inject_layer=1)
    with ns.capture():
        out = model(input_ids=ids)
    assert ns.active_batch == 6 and out.logits.shape == (4, 3)
    clean, noisy = ns.split(out.logits)
    torch.testing.assert_close(clean, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(clean, noisy) and ns.loss().item() > 0
