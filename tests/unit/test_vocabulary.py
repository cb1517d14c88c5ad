"""Unit tests for deepen_engine.alignment.vocabulary: canonical token bytes and anchors."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from deepen_engine.alignment.vocabulary import (
    CanonicalVocab,
    byte_level_decoding,
    find_anchors,
    tokenizer_kind,
)
from deepen_engine.errors import AlignmentError, MemberLoadError

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "Zürich, Genève and Malmö",
    "ñandú àéîõü ß Ærø",
    "東京 is Tokyo; 日本語のテキスト",
    "emoji 😀👍🏽 and 🇫🇷 flags",
    "line one\nline two\n\nline four\r\n",
    "many    spaces   here  ",
    "  leading spaces",
    "tabs\tand\t\tmore\ttabs",
    "def add(a, b):\n    return a + b\n",
    "mixed\t \n \t end",
]


def _expected_texts(tok: PreTrainedTokenizerFast, size: int) -> list[bytes | None]:
    """Canonical bytes of every id, computed independently of the engine."""
    kind = "byte_level" if "ByteLevel" in tok.backend_tokenizer.to_str() else "sentencepiece"
    special = set(tok.all_special_ids)
    unicode_to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    out: list[bytes | None] = [None] * size
    for idx in range(min(size, len(tok))):
        if idx in special:
            continue
        piece = tok.convert_ids_to_tokens(idx)
        if kind == "byte_level":
            out[idx] = bytes(unicode_to_byte[ch] for ch in piece)
        else:
            m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
            out[idx] = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
    return [t or None for t in out]


def _vocab(tok: PreTrainedTokenizerFast) -> CanonicalVocab:
    return CanonicalVocab.from_tokenizer(tok, len(tok))


def _wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


# byte_level_decoding -------------------------------------------------------------------


def test_byte_level_decoding_is_a_bijection_onto_all_bytes():
    table = byte_level_decoding()
    assert len(table) == 256
    assert sorted(table.values()) == list(range(256))
    assert all(len(symbol) == 1 for symbol in table)


def test_byte_level_decoding_known_symbols():
    table = byte_level_decoding()
    assert table["Ġ"] == 0x20
    assert table["Ċ"] == 0x0A
    assert table["!"] == 0x21
    assert table["ĉ"] == 0x09


def test_byte_level_decoding_matches_gpt2_table_and_tokenizers_alphabet():
    reference = {ch: b for b, ch in bytes_to_unicode().items()}
    assert byte_level_decoding() == reference
    assert set(byte_level_decoding()) == set(pre_tokenizers.ByteLevel.alphabet())


# tokenizer_kind ------------------------------------------------------------------------


def test_tokenizer_kind_byte_level(bpe_tokenizer):
    assert tokenizer_kind(bpe_tokenizer) == ("byte_level", False)


def test_tokenizer_kind_sentencepiece(sp_tokenizer):
    assert tokenizer_kind(sp_tokenizer) == ("sentencepiece", True)


@pytest.mark.parametrize("fallback", [True, False])
def test_tokenizer_kind_reads_a_unigram_models_byte_fallback(fallback):
    # Unigram has no byte_fallback attribute in Python: the flag comes from its JSON
    vocab = [("<unk>", 0.0), ("▁a", -1.0), ("b", -2.0), ("<0x41>", -3.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=fallback))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert tokenizer_kind(wrapped) == ("sentencepiece", fallback)
    vocab_ = CanonicalVocab.from_tokenizer(wrapped, 4)
    assert vocab_.texts[1:] == [b" a", b"b", b"A" if fallback else b"<0x41>"]


def test_tokenizer_kind_rejects_wordpiece():
    with pytest.raises(MemberLoadError, match="Unsupported tokenizer decoder"):
        tokenizer_kind(_wordpiece_tokenizer())


def test_from_tokenizer_rejects_wordpiece_naming_member():
    with pytest.raises(MemberLoadError, match=r"Member 'bert'.*Unsupported tokenizer decoder"):
        CanonicalVocab.from_tokenizer(_wordpiece_tokenizer(), 3, member="bert")


# CanonicalVocab ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sp_tokenizer"])
@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_concatenate_to_text(request, which, text):
    tok = request.getfixturevalue(which)
    vocab = _vocab(tok)
    ids = tok.encode(text, add_special_tokens=False)
    assert all(vocab.texts[i] is not None for i in ids)
    joined = b"".join(vocab.texts[i] for i in ids)
    assert joined == text.encode("utf-8")
    assert joined.decode("utf-8") == tok.decode(ids)


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sp_tokenizer"])
def test_texts_equal_independent_canonicalisation(request, which):
    tok = request.getfixturevalue(which)
    vocab = _vocab(tok)
    assert vocab.texts == _expected_texts(tok, len(tok))


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sp_tokenizer"])
def test_no_space_marker_leaks(request, which):
    tok = request.getfixturevalue(which)
    vocab = _vocab(tok)
    for text in vocab.texts:
        if text is not None:
            assert "Ġ".encode() not in text
            assert "▁".encode() not in text
            assert "Ċ".encode() not in text


def test_space_symbol_maps_to_space(bpe_tokenizer, sp_tokenizer):
    bpe = _vocab(bpe_tokenizer)
    sp = _vocab(sp_tokenizer)
    assert bpe.texts[bpe_tokenizer.convert_tokens_to_ids("Ġ")] == b" "
    assert bpe.texts[bpe_tokenizer.convert_tokens_to_ids("Ċ")] == b"\n"
    assert sp.texts[sp_tokenizer.convert_tokens_to_ids("▁")] == b" "
    (space_id,) = sp_tokenizer.encode(" ", add_special_tokens=False)
    assert sp.texts[space_id] == b" "


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sp_tokenizer"])
def test_special_tokens_have_no_text(request, which):
    tok = request.getfixturevalue(which)
    vocab = _vocab(tok)
    assert tok.all_special_ids  # the fixture has specials
    for idx in tok.all_special_ids:
        assert vocab.texts[idx] is None
    assert sum(t is None for t in vocab.texts) == len(set(tok.all_special_ids))


def test_byte_fallback_pieces(sp_tokenizer):
    vocab = _vocab(sp_tokenizer)
    newline = sp_tokenizer.convert_tokens_to_ids("<0x0A>")
    assert vocab.texts[newline] == b"\n"
    assert newline in vocab.byte_fallback_ids
    assert len(vocab.byte_fallback_ids) == 256
    for b in range(256):
        idx = sp_tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>")
        assert idx in vocab.byte_fallback_ids
        assert vocab.texts[idx] == bytes([b])
    regular = sp_tokenizer.convert_tokens_to_ids("a")
    assert regular not in vocab.byte_fallback_ids


def test_byte_level_vocab_has_no_byte_fallback(bpe_tokenizer):
    assert _vocab(bpe_tokenizer).byte_fallback_ids == frozenset()


@pytest.mark.parametrize("which", ["bpe_tokenizer", "sp_tokenizer"])
def test_ids_beyond_tokenizer_have_no_text(request, which):
    tok = request.getfixturevalue(which)
    size = len(tok) + 37
    vocab = CanonicalVocab.from_tokenizer(tok, size)
    assert len(vocab) == size
    assert vocab.texts[len(tok) :] == [None] * 37
    assert vocab.texts[: len(tok)] == _vocab(tok).texts


def test_size_smaller_than_tokenizer_truncates(bpe_tokenizer):
    vocab = CanonicalVocab.from_tokenizer(bpe_tokenizer, 100)
    assert len(vocab) == 100
    assert vocab.texts == _expected_texts(bpe_tokenizer, 100)


def test_text_to_id_prefers_regular_piece_over_byte_fallback(sp_tokenizer):
    vocab = _vocab(sp_tokenizer)
    mapping = vocab.text_to_id()
    for char in ["a", "\n", "e", " "]:
        regular = sp_tokenizer.convert_tokens_to_ids(char.replace(" ", "▁"))
        fallback = sp_tokenizer.convert_tokens_to_ids(f"<0x{ord(char):02X}>")
        assert vocab.texts[regular] == vocab.texts[fallback] == char.encode()
        assert mapping[char.encode()] == regular
    # A byte with no regular piece is reached through its fallback piece.
    assert mapping[b"\xff"] == sp_tokenizer.convert_tokens_to_ids("<0xFF>")


def test_text_to_id_prefers_regular_even_when_fallback_id_is_lower():
    vocab = CanonicalVocab(
        kind="sentencepiece",
        texts=[None, b"a", b"b", b"a", b"b", b"b"],
        byte_fallback_ids=frozenset({1, 2}),
    )
    assert vocab.text_to_id() == {b"a": 3, b"b": 4}


# find_anchors --------------------------------------------------------------------------


def _text_set(tok: PreTrainedTokenizerFast) -> set[bytes]:
    return {t for t in _expected_texts(tok, len(tok)) if t is not None}


def test_anchors_are_sorted_intersection(bpe_tokenizer, sp_tokenizer):
    vocabs = [_vocab(bpe_tokenizer), _vocab(sp_tokenizer)]
    anchors = find_anchors(vocabs, ["bpe", "sp"], min_anchors=50)
    expected = sorted(_text_set(bpe_tokenizer) & _text_set(sp_tokenizer))
    assert len(expected) >= 50
    assert anchors.texts == expected
    assert len(anchors) == len(expected)


def test_anchor_token_ids_and_token_to_anchor(bpe_tokenizer, sp_tokenizer):
    toks = [bpe_tokenizer, sp_tokenizer]
    vocabs = [_vocab(t) for t in toks]
    anchors = find_anchors(vocabs, ["bpe", "sp"], min_anchors=50)
    index = {t: a for a, t in enumerate(anchors.texts)}
    for i, (tok, vocab) in enumerate(zip(toks, vocabs)):
        ids = anchors.token_ids[i]
        assert ids.dtype == torch.long
        assert ids.shape == (len(anchors),)
        special = set(tok.all_special_ids)
        for a, idx in enumerate(ids.tolist()):
            assert idx not in special
            assert vocab.texts[idx] == anchors.texts[a]
            assert anchors.token_to_anchor[i][idx] == a
        to_anchor = anchors.token_to_anchor[i]
        assert to_anchor.dtype == torch.long
        assert to_anchor.shape == (len(vocab),)
        expected = [index.get(t, -1) if t is not None else -1 for t in vocab.texts]
        assert to_anchor.tolist() == expected
        for idx in special:
            assert to_anchor[idx] == -1


def test_byte_fallback_duplicates_map_to_same_anchor(bpe_tokenizer, sp_tokenizer):
    vocabs = [_vocab(bpe_tokenizer), _vocab(sp_tokenizer)]
    anchors = find_anchors(vocabs, ["bpe", "sp"], min_anchors=50)
    a = anchors.texts.index(b"a")
    regular = sp_tokenizer.convert_tokens_to_ids("a")
    fallback = sp_tokenizer.convert_tokens_to_ids("<0x61>")
    assert anchors.token_ids[1][a] == regular
    assert anchors.token_to_anchor[1][regular] == a
    assert anchors.token_to_anchor[1][fallback] == a


def test_special_tokens_never_anchors():
    shared = [b"x%d" % i for i in range(10)]
    v1 = CanonicalVocab("byte_level", [None, *shared], frozenset())
    v2 = CanonicalVocab("sentencepiece", [*reversed(shared), None, None], frozenset())
    anchors = find_anchors([v1, v2], ["one", "two"], min_anchors=10)
    assert anchors.texts == sorted(shared)
    assert None not in anchors.texts
    assert anchors.token_to_anchor[0][0] == -1
    assert anchors.token_to_anchor[1][10:].tolist() == [-1, -1]
    assert anchors.token_ids[1].tolist() == [9 - a for a in range(10)]


def test_three_members_intersection(bpe_tokenizer, sp_tokenizer):
    from tests.conftest import train_byte_level_tokenizer

    small = train_byte_level_tokenizer(vocab_size=300)
    toks = [bpe_tokenizer, sp_tokenizer, small]
    anchors = find_anchors([_vocab(t) for t in toks], ["a", "b", "c"], min_anchors=50)
    expected = sorted(_text_set(bpe_tokenizer) & _text_set(sp_tokenizer) & _text_set(small))
    assert anchors.texts == expected
    assert len(anchors.token_ids) == len(anchors.token_to_anchor) == 3


def test_too_few_anchors_raises_naming_members_and_count(bpe_tokenizer, sp_tokenizer):
    vocabs = [_vocab(bpe_tokenizer), _vocab(sp_tokenizer)]
    shared = len(_text_set(bpe_tokenizer) & _text_set(sp_tokenizer))
    # Exactly enough passes.
    assert len(find_anchors(vocabs, ["alpha", "beta"], min_anchors=shared)) == shared
    with pytest.raises(AlignmentError) as info:
        find_anchors(vocabs, ["alpha", "beta"], min_anchors=shared + 1)
    message = str(info.value)
    assert "alpha" in message
    assert "beta" in message
    assert str(shared) in message
    assert isinstance(info.value, ValueError)


def test_disjoint_vocabularies_raise_with_zero_count():
    v1 = CanonicalVocab("byte_level", [b"a", b"b", None], frozenset())
    v2 = CanonicalVocab("sentencepiece", [b"c", b"d"], frozenset())
    with pytest.raises(AlignmentError, match=r"'left'.*'right'.*share 0 "):
        find_anchors([v1, v2], ["left", "right"], min_anchors=1)
