"""`TokenTexts` (alignment/token_texts.py) reads back exactly the texts it was given."""

from __future__ import annotations

import pickle

import pytest

from deepen_engine.alignment.token_texts import TokenTexts
from deepen_engine.alignment.vocabulary import CanonicalVocab
from deepen_engine.fusion.context import END, EndKeys

TEXTS = [None, b" a", "é".encode(), None, b"\n\n\n", bytes([0xFF]), b"<0x41>", None]


def test_texts_read_back_by_index_slice_and_iteration():
    texts = TokenTexts(TEXTS)
    assert len(texts) == len(TEXTS)
    assert [texts[i] for i in range(len(TEXTS))] == TEXTS
    assert [texts[-i] for i in range(1, len(TEXTS) + 1)] == [TEXTS[-i] for i in range(1, 9)]
    assert list(texts) == TEXTS and texts[2:6] == TEXTS[2:6] and texts[::-3] == TEXTS[::-3]
    assert texts.index(b"\n\n\n") == 4 and b"\xff" in texts
    with pytest.raises(IndexError):
        texts[len(TEXTS)]
    with pytest.raises(IndexError):
        texts[-len(TEXTS) - 1]


def test_an_empty_text_is_no_text_and_equality_is_by_value():
    assert list(TokenTexts([b"", b"a"])) == [None, b"a"]
    texts = TokenTexts(TEXTS)
    assert texts == TEXTS and TEXTS == texts and texts == TokenTexts(iter(TEXTS))
    assert texts != TEXTS[:-1] and texts != [*TEXTS[:-1], b"x"] and texts != TokenTexts(TEXTS[1:])
    assert pickle.loads(pickle.dumps(texts)) == texts
    assert CanonicalVocab("byte_level", TEXTS, frozenset()).texts == texts  # a list is stored


def test_end_keys_read_end_tokens_as_end():
    keys = EndKeys(TokenTexts(TEXTS), frozenset({1, 3, 99}))
    expected = [None, END, TEXTS[2], END, *TEXTS[4:]]
    assert list(keys) == expected and [keys[i] for i in range(len(keys))] == expected
    assert keys[-7] == END and keys[1:4] == expected[1:4] and len(keys) == len(TEXTS)
