"""Unit tests for deepen_engine.decoding.text (TextAssembler): UTF-8 assembly, stop strings,
deltas."""

from __future__ import annotations

import random

import pytest

from deepen_engine.decoding.text import TextAssembler

# UTF-8 assembly -------------------------------------------------------------------------


def test_ascii_passes_through():
    asm = TextAssembler()
    assert asm.add(b"Hello") == "Hello"
    assert asm.add(b", world") == ", world"
    assert asm.text == "Hello, world"
    assert not asm.stopped


def test_emoji_byte_by_byte_is_held_until_complete():
    asm = TextAssembler()
    data = "😀".encode()
    assert len(data) == 4
    assert [asm.add(data[i : i + 1]) for i in range(4)] == ["", "", "", "😀"]
    assert asm.text == "😀"


@pytest.mark.parametrize("char", ["é", "東", "😀"])
def test_multibyte_char_split_across_tokens(char):
    data = b"a" + char.encode() + b"b"
    for cut in range(1, len(data)):
        asm = TextAssembler()
        out = asm.add(data[:cut]) + asm.add(data[cut:])
        assert out == "a" + char + "b"
        assert asm.text == "a" + char + "b"
        # Nothing partial is ever visible.
        asm2 = TextAssembler()
        first = asm2.add(data[:cut])
        assert "\ufffd" not in first
        assert ("a" + char + "b").startswith(first)


def test_finish_flushes_incomplete_sequence_as_replacement_char():
    asm = TextAssembler()
    assert asm.add(b"a" + "😀".encode()[:2]) == "a"
    assert asm.finish() == "\ufffd"
    assert asm.text == "a\ufffd"
    assert asm.delta(final=True) == "a\ufffd"


def test_finish_with_nothing_pending_adds_nothing():
    asm = TextAssembler()
    asm.add("é".encode())
    assert asm.finish() == ""
    assert asm.text == "é"


# stop strings --------------------------------------------------------------------------


def test_stop_string_cuts_before_first_occurrence():
    asm = TextAssembler(stop=["STOP"])
    assert asm.add(b"abc STOP def STOP") == "abc "
    assert asm.text == "abc "
    assert asm.stopped
    assert asm.add(b"more") == ""
    assert asm.finish() == ""
    assert asm.text == "abc "


def test_stop_string_spanning_two_adds():
    asm = TextAssembler(stop=["END"])
    assert asm.add(b"the E") == "the E"
    assert not asm.stopped
    asm.add(b"ND of it")
    assert asm.stopped
    assert asm.text == "the "


def test_stop_string_spanning_many_adds_and_a_multibyte_char():
    asm = TextAssembler(stop=["é!"])
    data = b"caf" + "é!".encode() + b" more"
    for i in range(len(data)):
        asm.add(data[i : i + 1])
    assert asm.stopped
    assert asm.text == "caf"


def test_earliest_of_several_stop_strings_wins():
    asm = TextAssembler(stop=["world", "lo w", "xyz"])
    asm.add(b"hello world")
    assert asm.stopped
    assert asm.text == "hel"


def test_earliest_stop_string_wins_across_adds():
    asm = TextAssembler(stop=["zz", "ab"])
    asm.add(b"xxa")
    asm.add(b"b zz")
    assert asm.text == "xx"


def test_no_stop_strings_never_stops():
    asm = TextAssembler()
    asm.add(b"STOP END")
    assert not asm.stopped
    assert asm.delta() == "STOP END"


def test_empty_stop_strings_are_ignored():
    asm = TextAssembler(stop=[""])
    assert asm.add(b"abc") == "abc"
    assert not asm.stopped
    assert asm.delta() == "abc"


def test_stop_string_completed_by_finish_replacement_char():
    asm = TextAssembler(stop=["\ufffd"])
    asm.add(b"ok\xe6")
    assert not asm.stopped
    asm.finish()
    assert asm.stopped
    assert asm.text == "ok"


# delta ---------------------------------------------------------------------------------


def test_delta_holds_back_possible_stop_prefix():
    asm = TextAssembler(stop=["END"])
    asm.add(b"abc E")
    assert asm.delta() == "abc "
    asm.add(b"N")
    assert asm.delta() == ""
    asm.add(b"d")  # "ENd" can no longer become "END"
    assert asm.delta() == "ENd"
    assert asm.delta() == ""


def test_delta_holds_longest_prefix_over_several_stops():
    asm = TextAssembler(stop=["abc", "bcd"])
    asm.add(b"xab")
    assert asm.delta() == "x"  # "ab" may become "abc"
    asm.add(b"x")
    assert asm.delta() == "abx"


def test_delta_final_releases_everything():
    asm = TextAssembler(stop=["END"])
    asm.add(b"abc EN")
    assert asm.delta() == "abc "
    assert asm.delta(final=True) == "EN"
    assert asm.delta(final=True) == ""


def test_delta_after_stop_releases_text_before_it():
    asm = TextAssembler(stop=["END"])
    asm.add(b"abc EN")
    assert asm.delta() == "abc "
    asm.add(b"D tail")
    assert asm.stopped
    assert asm.delta() == ""
    assert asm.text == "abc "


def test_delta_after_stop_releases_held_text():
    asm = TextAssembler(stop=["abcd", "x"])
    asm.add(b"1ab")
    assert asm.delta() == "1"
    asm.add(b"x")  # "x" stops; the held "ab" turned out not to be a stop string
    assert asm.stopped
    assert asm.delta() == "ab"


def test_delta_never_holds_a_complete_multibyte_char_back_without_cause():
    asm = TextAssembler(stop=["END"])
    asm.add("東".encode()[:2])
    assert asm.delta() == ""
    asm.add("東".encode()[2:])
    assert asm.delta() == "東"


def _expected_cut(text: str, stops: list[str]) -> str:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return text[: min(hits)] if hits else text


_ALPHABET = ["a", "b", "c", " ", "\n", "é", "東", "😀", "ab", "END"]


@pytest.mark.parametrize("seed", range(300))
def test_random_splits_deltas_concatenate_to_final_text(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 30)))
    stops: list[str] = []
    for _ in range(rng.randint(0, 3)):
        if text and rng.random() < 0.6:  # a substring of the text, often one that fires
            i = rng.randrange(len(text))
            stops.append(text[i : i + rng.randint(1, 4)])
        else:
            stops.append("".join(rng.choice("abcé😀 ") for _ in range(rng.randint(1, 3))))
    # Keep the expected text unambiguous: no stop string inside another one.
    stops = [s for s in dict.fromkeys(stops) if not any(s != o and s in o for o in stops)]
    data = text.encode()
    cuts = sorted(rng.sample(range(1, len(data)), max(0, min(len(data) - 1, rng.randint(0, 12)))))
    pieces = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)]) if j > i]
    expected = _expected_cut(text, stops)

    asm = TextAssembler(stop=stops)
    streamed = ""
    for piece in pieces:
        asm.add(piece)
        streamed += asm.delta()
        assert expected.startswith(streamed)  # never emits text that is later cut
    asm.finish()
    streamed += asm.delta(final=True)
    assert asm.text == expected
    assert streamed == expected
    assert asm.stopped == (expected != text)
