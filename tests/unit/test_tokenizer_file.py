"""How members read a generic BPE `tokenizer.json` (members/tokenizer_file.py): the Rust
tokenizer built from Python objects is the one `Tokenizer.from_file` gives, and the
transformers tokenizer around it the one `AutoTokenizer` gives. Tiny tokenizers trained in
the test stand for Gemma's (SentencePiece-style, byte fallback, added tokens) and SmolLM2's
(byte-level).
"""

from __future__ import annotations

import json
import pickle

import pytest
from tokenizers import Tokenizer
from transformers import AddedToken, AutoTokenizer, TokenizersBackend

from deepen_engine.members import conversion
from deepen_engine.members.tokenizer_file import generic_folder, load_tokenizer, read_backend
from tests.conftest import CORPUS

TEXTS = [*CORPUS[:7], "<bos>a <start_of_turn> b\n\n\n c 😀 é", "  two spaces\tand a tab", ""]


@pytest.fixture(scope="module", params=["sp", "bpe"])
def folder(request, sp_tokenizer, bpe_tokenizer, tmp_path_factory):
    """A folder as a GGUF conversion writes it, with an added text and special token."""
    tokenizer = sp_tokenizer if request.param == "sp" else bpe_tokenizer
    tokenizer = AutoTokenizer.from_pretrained(_saved(tokenizer, tmp_path_factory))
    tokenizer.add_tokens([AddedToken("\n\n\n", special=False, normalized=False)])
    tokenizer.add_tokens([AddedToken("<start_of_turn>", special=True)], special_tokens=True)
    path = tmp_path_factory.mktemp("tokenizer")
    conversion.write_tokenizer(tokenizer, path, "tiny")
    return path


def _saved(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("original")
    tokenizer.save_pretrained(str(path))
    return str(path)


def test_the_backend_is_the_one_the_rust_parser_gives(folder):
    built = read_backend(folder / "tokenizer.json")
    parsed = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert built.to_str() == parsed.to_str()  # vocabulary, merge ranks, added tokens, ...
    for text in TEXTS:
        assert built.encode(text).ids == parsed.encode(text).ids
        ids = parsed.encode(text).ids
        assert built.decode(ids, skip_special_tokens=False) == parsed.decode(
            ids, skip_special_tokens=False
        )


def test_the_tokenizer_is_the_one_autotokenizer_gives(folder):
    mine, theirs = load_tokenizer(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert type(mine) is TokenizersBackend
    assert mine.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    for attribute in ("all_special_ids", "special_tokens_map", "padding_side", "chat_template"):
        assert getattr(mine, attribute) == getattr(theirs, attribute), attribute
    assert {i: t.__getstate__() for i, t in mine.added_tokens_decoder.items()} == {
        i: t.__getstate__() for i, t in theirs.added_tokens_decoder.items()
    }
    for text in TEXTS:
        for special in (True, False):
            assert (
                mine(text, add_special_tokens=special).input_ids
                == theirs(text, add_special_tokens=special).input_ids
            )
    copy = pickle.loads(pickle.dumps(mine))  # a plain TokenizersBackend (Ray ships it)
    assert type(copy) is TokenizersBackend and copy(TEXTS[0]).input_ids == mine(TEXTS[0]).input_ids


def test_only_generic_folders_are_read_this_way(folder, tmp_path):
    assert generic_folder(str(folder))
    assert not generic_folder(str(tmp_path))  # no files
    assert not generic_folder("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    for change in ({"tokenizer_class": "GemmaTokenizer"}, {"auto_map": {"AutoTokenizer": "x.Y"}}):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
        assert not generic_folder(str(tmp_path)), change


def test_a_model_field_this_code_does_not_know_is_left_to_the_rust_parser(folder, tmp_path):
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["some_new_option"] = True  # a field of a later tokenizers version
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    assert read_backend(path).to_str() == Tokenizer.from_file(str(path)).to_str()


def test_merges_python_cannot_build_are_left_to_the_rust_parser(folder, tmp_path):
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["merges"].append("a b c")  # three pieces: refused by both readers
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(Exception) as parsed:
        Tokenizer.from_file(str(path))
    with pytest.raises(Exception) as built:
        read_backend(path)
    assert str(built.value) == str(parsed.value)  # the Rust parser's own error
