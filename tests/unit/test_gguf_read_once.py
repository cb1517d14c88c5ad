"""A GGUF conversion parses its file once: readers of that file are shared inside
`_read_once`, other files and calls outside it get their own (no model needed: a tiny GGUF
file written in the test). The integration tier checks the converted weights equal
transformers' own loading (tests/integration/test_conversion.py).
"""

from __future__ import annotations

import gguf

from deepen_engine.members.conversion import _read_once


def _write(path) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_readers_of_the_converted_file_are_shared(tmp_path):
    mine, other = tmp_path / "mine.gguf", tmp_path / "other.gguf"
    _write(mine)
    _write(other)
    original = gguf.GGUFReader
    with _read_once(mine):
        first = gguf.GGUFReader(str(mine))
        assert gguf.GGUFReader(mine) is first  # a Path or a str, the same file
        assert isinstance(first, original)
        assert gguf.GGUFReader(str(other)) is not gguf.GGUFReader(str(other))
        assert list(first.fields["tokenizer.ggml.tokens"].data)  # a working reader
    assert gguf.GGUFReader is original  # restored
    assert gguf.GGUFReader(str(mine)) is not first
