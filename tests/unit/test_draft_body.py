"""Drafting in bfloat16 (members/draft_body.py, `SchedulerConfig.draft_precision`): the
draft body shares the member's tensors but its linear weights, keeps activations and the KV
cache in float32, and a row a draft body fed is fed again exactly before anything reads
it (`MemberBatch.draft_body`, `RowIds.drafted`)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from deepen_engine import ConfigError, MemberSpec, SchedulerConfig, load_member
from deepen_engine.decoding.member_batch import MemberBatch
from deepen_engine.members.draft_body import Bfloat16Linear, bfloat16_body
from deepen_engine.members.output_layer import OutputLayer
from tests.conftest import tiny_gemma3, tiny_llama


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_the_draft_body_shares_everything_but_its_linear_weights(make):
    torch.manual_seed(0)
    model = make(300).eval()
    layer = OutputLayer.of(model)
    assert layer is not None
    draft = bfloat16_body(layer.body)
    linears = [m for m in layer.body.modules() if type(m) is torch.nn.Linear]
    swapped = [m for m in draft.modules() if type(m) is Bfloat16Linear]
    assert len(swapped) == len(linears) > 0
    assert not [m for m in draft.modules() if type(m) is torch.nn.Linear]
    for mine, theirs in zip(swapped, linears):
        assert mine.weight.dtype == torch.bfloat16
        assert torch.equal(mine.weight, theirs.weight.detach().to(torch.bfloat16))
    own = {id(p) for p in layer.body.parameters()}
    # embeddings, norms (every float32 tensor of the copy) are the body's own objects
    assert all(id(p) in own for p in draft.parameters())
    assert draft.get_input_embeddings().weight is layer.body.get_input_embeddings().weight

    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    exact_cache, draft_cache = DynamicCache(), DynamicCache()
    with torch.no_grad():
        want = layer.body(input_ids=ids, cache=exact_cache, use_cache=True)
        got = draft(input_ids=ids, cache=draft_cache, use_cache=True)
    assert got.last_hidden_state.dtype == torch.float32
    assert draft_cache.layers[0].keys.dtype == torch.float32  # the member's own cache works
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0.05, atol=0.05)
    assert not torch.equal(got.last_hidden_state, want.last_hidden_state)  # bfloat16 products


def test_draft_body_by_precision():
    model = tiny_llama(300).eval()
    layer = OutputLayer.of(model)
    assert layer is not None
    assert layer.draft_body("float32") is None
    body = layer.draft_body("bfloat16")
    assert body is not None and layer.draft_body("bfloat16") is body  # built once
    half = OutputLayer.of(tiny_llama(300).to(torch.bfloat16))
    assert half is not None and half.draft_body("bfloat16") is None  # not float32 weights
    with pytest.raises(ConfigError, match="draft_precision"):
        SchedulerConfig(draft_precision="int8")


def test_a_row_the_draft_body_fed_is_fed_again_exactly(tiny_pair):
    member = load_member(MemberSpec(source=tiny_pair[1], name="m"))
    body = member.output_layer.draft_body("bfloat16")
    prompts = [member.tokenizer(t).input_ids for t in ("Once upon a", "The capital of France")]
    batch = MemberBatch(member, prompts)
    batch.forward()
    batch.draft_body = body
    for b, token in enumerate((40, 41)):
        batch.append(b, token)
    batch.forward()
    batch.append(0, 42)  # row 0 drafts once more
    batch.forward()
    assert [r.drafted for r in batch.rows] == [2, 1]
    batch.draft_body = None
    logits = batch.require_logits()  # the exact forward feeds the drafted positions again
    assert [r.drafted for r in batch.rows] == [0, 0]
    assert [r.cached == len(r.ids) for r in batch.rows] == [True, True]
    for b, r in enumerate(batch.rows):
        with torch.inference_mode():
            fresh = member.model(input_ids=torch.tensor([r.ids])).logits[0, -1]
        torch.testing.assert_close(logits[b], fresh.float(), atol=1e-4, rtol=1e-4)


def test_heads_set_for_a_block_and_restore_the_settings_before(tiny_pair):
    """`MemberBatch.heads`: the shortlist and draft body forwards read inside the block,
    and whatever was set before it afterwards, also when the block raises."""
    member = load_member(MemberSpec(source=tiny_pair[0], name="m"))
    batch = MemberBatch(member, [member.tokenizer("Hi there").input_ids])
    body = torch.nn.Identity()
    with batch.heads(None, body):
        assert batch.shortlist is None and batch.draft_body is body
        with batch.heads(None, None):  # an exact forward inside a drafting block
            assert batch.draft_body is None
        assert batch.draft_body is body
    assert batch.shortlist is None and batch.draft_body is None
    with pytest.raises(RuntimeError), batch.heads(None, body):
        raise RuntimeError("a forward failed")
    assert batch.draft_body is None
