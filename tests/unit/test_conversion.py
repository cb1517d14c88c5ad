"""How a GGUF conversion writes its tokenizer (members/conversion.py): a folder that
`AutoTokenizer` builds in Rust alone, with the same token ids, and older conversions
upgraded in place. Tiny tokenizers trained in the test stand for Gemma's (a class with
its own `__init__`, BPE merges) and for a vocabulary whose pieces hold spaces.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

from deepen_engine.alignment.vocabulary import CanonicalVocab
from deepen_engine.errors import MemberLoadError
from deepen_engine.members import conversion
from tests.conftest import CORPUS

TEXTS = [*CORPUS[:7], "<bos>a <start_of_turn> b\n\n\n c 😀", "  two spaces\tand a tab"]


@pytest.fixture(scope="module")
def gemma_like(sp_tokenizer) -> GemmaTokenizer:
    """A tokenizer of Gemma's class (its `__init__` builds the backend from vocab and
    merges) with an added text token and an added special token, as Gemma-3 has."""
    merges = json.loads(sp_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    tokenizer = GemmaTokenizer(
        vocab=sp_tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False),
        merges=[tuple(m) for m in merges],
    )
    tokenizer.add_tokens([AddedToken("\n\n\n", special=False, normalized=False)])
    tokenizer.add_tokens([AddedToken("<start_of_turn>", special=True)], special_tokens=True)
    return tokenizer


def _ids(tokenizer) -> list[list[int]]:
    return [tokenizer(t).input_ids for t in TEXTS] + [
        tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS
    ]


def _python_json_reads(monkeypatch) -> list[str]:
    """Names of the files json.load reads from now on."""
    reads: list[str] = []
    load = json.load

    def spy(handle, *args, **kwargs):
        reads.append(getattr(handle, "name", "?"))
        return load(handle, *args, **kwargs)

    monkeypatch.setattr(json, "load", spy)
    return reads


def test_written_tokenizer_loads_in_rust_alone_with_the_same_ids(gemma_like, tmp_path, monkeypatch):
    conversion.write_tokenizer(gemma_like, tmp_path, "tiny")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend"
    assert config["padding_side"] == "left"  # GemmaTokenizer's, fixed in its code
    # of the added tokens, the named special ones only (transformers keeps each listed)
    listed = {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()}
    named = set(gemma_like.special_tokens_map.values())
    added = gemma_like.added_tokens_decoder.items()
    assert listed == {i: t.content for i, t in added if t.content in named}
    assert "<bos>" in listed.values() and "\n\n\n" not in listed.values()
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)

    reads = _python_json_reads(monkeypatch)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert not any(name.endswith("tokenizer.json") for name in reads), reads
    assert type(loaded).__name__ == "TokenizersBackend"
    assert _ids(loaded) == _ids(gemma_like)
    assert loaded.get_vocab() == gemma_like.get_vocab()
    assert loaded.all_special_ids == gemma_like.all_special_ids
    assert CanonicalVocab.from_tokenizer(loaded, len(loaded)) == CanonicalVocab.from_tokenizer(
        gemma_like, len(gemma_like)
    )


@pytest.mark.parametrize(("first", "second"), [("a ", "b"), ("#version", "2")])
def test_merges_stay_pairs_when_strings_would_read_back_wrong(first, second, tmp_path):
    # "a  b" would split in three; a line starting "#version" is skipped as a header
    merged = first + second
    # each part built character by character, then the two parts merged
    pairs = [(w[:i], w[i]) for w in (first, second) for i in range(1, len(w))]
    pairs.append((first, second))
    pieces = ["<unk>", *dict.fromkeys([*merged, *(a + b for a, b in pairs)])]
    vocab = {p: i for i, p in enumerate(pieces)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    conversion.write_tokenizer(tokenizer, tmp_path, "tiny")
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    assert merges == [list(p) for p in pairs]
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(merged).input_ids == tokenizer(merged).input_ids == [vocab[merged]]


def test_a_tokenizer_that_loads_back_different_is_refused(gemma_like, tmp_path, monkeypatch):
    def reversed_merges(path):  # merges ranked the other way round: other ids
        spec = json.loads(path.read_text())
        spec["model"]["merges"] = spec["model"]["merges"][::-1]
        path.write_text(json.dumps(spec))

    monkeypatch.setattr(conversion, "_merges_as_strings", reversed_merges)
    with pytest.raises(MemberLoadError, match=r"'tiny': its tokenizer written to .* loads back "):
        conversion.write_tokenizer(gemma_like, tmp_path, "tiny")


def test_an_older_conversion_is_upgraded_in_place(gemma_like, tmp_path, monkeypatch):
    folder = tmp_path / "models" / "tiny-1.0"
    gemma_like.save_pretrained(str(folder))  # as conversions before FORMAT 2 wrote it
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")

    def no_conversion():
        raise AssertionError("an existing folder is upgraded, not converted again")

    conversion.ensure_folder(folder, no_conversion, "tiny", torch.float32)
    assert json.loads((folder / conversion.MARKER).read_text()) == {"format": conversion.FORMAT}
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == ["tiny-1.0"]
    loaded = AutoTokenizer.from_pretrained(str(folder))
    assert type(loaded).__name__ == "TokenizersBackend"
    assert _ids(loaded) == _ids(gemma_like)

    def no_upgrade(folder, name):
        raise AssertionError("a current folder is left as it is")

    monkeypatch.setattr(conversion, "upgrade", no_upgrade)
    conversion.ensure_folder(folder, no_conversion, "tiny", torch.float32)


def test_an_upgrade_that_cannot_write_warns_and_keeps_the_folder(gemma_like, tmp_path, monkeypatch):
    folder = tmp_path / "models" / "tiny-1.0"
    gemma_like.save_pretrained(str(folder))
    (folder / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(folder.parent))

    monkeypatch.setattr(conversion.tempfile, "mkdtemp", read_only)
    with pytest.warns(UserWarning, match=r"'tiny': could not rewrite the tokenizer of .*loads as"):
        conversion.ensure_folder(folder, lambda: folder, "tiny", torch.float32)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
