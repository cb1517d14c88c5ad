"""The engine's own output layer (members/output_layer.py): the same logits as each supported
model's forward, a shortlist's logits equal the full layer's on its rows, and the members
that keep their own forward."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from deepen_engine.members.output_layer import OutputLayer
from tests.conftest import tiny_gemma3, tiny_llama

SMALL = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _models() -> list[torch.nn.Module]:
    torch.manual_seed(3)
    gemma2 = Gemma2ForCausalLM(
        Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=5.0, initializer_range=0.5)
    )
    untied = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False))
    return [
        tiny_llama(300),
        tiny_gemma3(300),
        gemma2,
        untied,
        Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_logits_equal_the_models_forward(index):
    model = _models()[index].eval()
    layer = OutputLayer.of(model)
    assert layer is not None
    ids = torch.tensor([[5, 17, 42, 8, 99, 3], [7, 7, 250, 1, 60, 11]])
    with torch.no_grad():
        want = model(input_ids=ids, logits_to_keep=4).logits
        got = layer.logits(layer.body(input_ids=ids).last_hidden_state[:, -4:, :])
        one = layer.logits(layer.body(input_ids=ids[:1]).last_hidden_state[:, -1:, :])
    assert got.shape == want.shape == (2, 4, 300)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, want[:1, -1:], rtol=1e-5, atol=1e-5)
    if getattr(model.config, "final_logit_softcapping", None):
        assert layer.softcap == 5.0 and float(got.abs().max()) < 5.0


def test_shortlist_logits_are_the_full_layers_on_its_rows():
    model = _models()[2].eval()  # soft-capped
    layer = OutputLayer.of(model)
    assert layer is not None
    rows = torch.tensor([2, 9, 40, 41, 299])
    hidden = torch.randn(3, 32)
    full = layer.logits(hidden)
    short = layer.shortlist(rows).logits(hidden)
    assert short.shape == (3, 300) and short.dtype == torch.float32
    torch.testing.assert_close(short[:, rows], full[:, rows], rtol=1e-5, atol=1e-5)
    others = torch.ones(300, dtype=torch.bool)
    others[rows] = False
    assert bool(torch.isneginf(short[:, others]).all())


def test_a_shortlist_adds_each_rows_missing_tokens():
    model = _models()[2].eval()  # soft-capped
    layer = OutputLayer.of(model)
    assert layer is not None
    head = layer.shortlist(torch.tensor([2, 9, 40, 41, 299]))
    assert head.missing([9, 7, 300 - 1, 7, 120, 2]).tolist() == [7, 120]
    assert head.missing([]).tolist() == []
    hidden = torch.randn(2, 32)
    full = layer.logits(hidden)
    extras = [torch.tensor([7, 120]), torch.tensor([], dtype=torch.long)]
    short = head.logits(hidden, extras)
    allowed = [[2, 7, 9, 40, 41, 120, 299], [2, 9, 40, 41, 299]]
    for n, ids in enumerate(allowed):
        torch.testing.assert_close(short[n, ids], full[n, ids], rtol=1e-5, atol=1e-5)
        others = torch.ones(300, dtype=torch.bool)
        others[ids] = False
        assert bool(torch.isneginf(short[n, others]).all())


def test_members_that_keep_their_own_forward():
    model = tiny_llama(300)
    assert OutputLayer.of(model, device_map={"": "cpu"}) is None  # accelerate placed it
    with torch.no_grad():
        model.lm_head = torch.nn.Linear(32, 300, bias=True)  # a head with a bias
    assert OutputLayer.of(model) is None

    class Wrapped(LlamaForCausalLM):  # a class whose forward the engine does not know
        pass

    assert OutputLayer.of(Wrapped(model.config)) is None


def test_loaded_members_get_one(tiny_ensemble):
    layers = [m.output_layer for m in tiny_ensemble.members]
    assert all(layer is not None for layer in layers)
    assert layers[1] is not None and layers[1].softcap is None  # Gemma-3: no soft-capping
