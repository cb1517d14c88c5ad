"""What `deepen generate` reads: escape sequences, bytes that are not UTF-8, request checks
before any model loads, and errors worded for the command line.
"""

from __future__ import annotations

import io
import json
import os

import pytest

from deepen_engine import ConfigError, Ensemble, GenerationConfig, MemberSpec
from deepen_engine.commands import generate
from deepen_engine.commands.cli import main
from deepen_engine.commands.inputs import unescape
from tests.conftest import member_args


@pytest.fixture(scope="module")
def reference(tiny_folders):
    return Ensemble([MemberSpec(source=p) for p in tiny_folders], min_anchors=50)


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading members fail the test: the checks under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("members were loaded before the request was checked")

    monkeypatch.setattr(generate, "Ensemble", refuse)


def _undecodable(data: bytes) -> str:
    """What Python makes of argument bytes that are not UTF-8 (surrogateescape)."""
    return os.fsdecode(data)


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        (r"Q: 12 + 7?\nA:", "Q: 12 + 7?\nA:"),
        (r"a\tb\rc", "a\tb\rc"),
        (r"C:\\new", "C:\\new"),  # an escaped backslash is not the start of \n
        (r"\x41 \q \"", r"\x41 \q \""),  # other escapes stay as typed
        ("trailing \\", "trailing \\"),
        ("no escapes", "no escapes"),
    ],
)
def test_unescape(typed, meant):
    assert unescape(typed) == meant


def test_stop_escape_stops_at_a_newline(tiny_folders, reference, capsys):
    # the shell passes "\n" as a backslash and an n; deepen turns it into a newline
    assert "\n" in reference.generate("Q:", max_new_tokens=24).text  # it would go on
    flags = ["--json", "--max-new-tokens", "24", *member_args(tiny_folders)]
    assert main(["generate", "Q:", "--stop", "\\n", *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = reference.generate("Q:", max_new_tokens=24, stop=["\n"])
    assert (out["text"], out["finish_reason"]) == (expected.text, "stop")
    assert main(["generate", "Q:", "--stop", "\\n", "--no-escape", *flags]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert (raw["finish_reason"], raw["text"]) == ("length", reference.generate(
        "Q:", max_new_tokens=24, stop=["\\n"]).text)  # fmt: skip


def test_prompt_escape(tiny_folders, reference, capsys):
    typed, meant = "Q: 12 + 7?\\nA:", "Q: 12 + 7?\nA:"
    flags = ["--json", "--max-new-tokens", "6", *member_args(tiny_folders)]
    name = reference.members[0].name
    lengths = {p: len(reference.members[0].tokenizer(p).input_ids) for p in (typed, meant)}
    assert lengths[typed] != lengths[meant]
    assert main(["generate", typed, *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == reference.generate(meant, max_new_tokens=6).text
    assert out["usage"]["prompt_tokens"][name] == lengths[meant]
    assert main(["generate", typed, "--no-escape", *flags]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["text"] == reference.generate(typed, max_new_tokens=6).text
    assert raw["usage"]["prompt_tokens"][name] == lengths[typed]


def test_stdin_is_taken_as_it_is(tiny_folders, reference, capsys, monkeypatch):
    text = "A path C:\\new\nand a newline"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert main(["generate", "--json", "--max-new-tokens", "4", *member_args(tiny_folders)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == reference.generate(text, max_new_tokens=4).text


def test_argument_that_is_not_utf8_fails_before_loading(no_loading, capsys):
    assert main(["generate", _undecodable(b"caf\xe9 au lait")]) == 2
    err = capsys.readouterr().err
    assert "the prompt argument is not UTF-8 text: byte 3 (0xe9, after 'caf')" in err
    assert "Traceback" not in err
    assert main(["generate", "x", "--stop", _undecodable(b"\xff")]) == 2
    assert "is not UTF-8 text: byte 0 (0xff" in capsys.readouterr().err


def test_stdin_that_is_not_utf8_fails_before_loading(no_loading, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Hello\nw\xf6rld")))
    assert main(["generate"]) == 2
    err = capsys.readouterr().err
    assert "the prompt read from stdin is not UTF-8 text: byte 7 (0xf6, after 'Hello\\nw')" in err


def test_prompts_file_errors_name_the_line(no_loading, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    assert main(["generate", "--prompts-file", str(path)]) == 2
    assert f"{path}:2 is not UTF-8 text: byte 15 (0xe9" in capsys.readouterr().err
    path.write_text('{"prompt": "fine"}\n\n{"prompt": ""}\n')
    assert main(["generate", "--prompts-file", str(path)]) == 2
    assert f"{path}:3: the prompt is empty; give some text" in capsys.readouterr().err
    path.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    assert main(["generate", "--prompts-file", str(path)]) == 2
    assert f"{path}:1: messages[0] has role 'robot'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", ""], "the prompt is empty; give some text to continue."),
        (["generate", "x", "--batch-size", "0"], "--batch-size must be >= 1, got 0."),
        (["generate", "x", "--top-p", "2"], "--top-p: Input should be less than or equal to 1"),
        (["generate", "x", "--stop", ""], "--stop: stop strings must not be empty"),
        (["generate", "x", "--min-new-tokens", "9", "--max-new-tokens", "3"],
         "--min-new-tokens (9) must not exceed --max-new-tokens (3)"),
    ],
)  # fmt: skip
def test_request_settings_are_checked_before_loading(no_loading, capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_errors_name_flags_not_python_settings(tiny_folders, capsys):
    long_prompt = "the river runs " * 400  # past the tiny members' 1024 positions
    assert main(["generate", long_prompt, *member_args(tiny_folders)]) == 2
    err = capsys.readouterr().err
    assert "or pass --truncation left to drop its oldest tokens" in err
    assert "truncation='left'" not in err
    assert main(["generate", "x", "--main", "5", *member_args(tiny_folders)]) == 2
    assert "deepen: error: --main: index 5 is out of range for 2 members" in capsys.readouterr().err


def test_engine_refuses_text_that_is_not_unicode(tiny_ensemble):
    bad = _undecodable(b"caf\xe9")
    with pytest.raises(ConfigError, match=r"prompt at position 1 holds '\\udce9' at character 3"):
        tiny_ensemble.generate(["fine", bad], max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"messages\[0\]\['content'\] holds '\\udce9'"):
        tiny_ensemble.generate([{"role": "user", "content": bad}], max_new_tokens=2)
    with pytest.raises(ConfigError, match="stop string 0 holds"):
        GenerationConfig(stop=[bad])


def test_bench_needs_two_members_before_loading(capsys, monkeypatch):
    from deepen_engine.commands.bench import command

    monkeypatch.setattr(command, "Ensemble", lambda *a, **k: pytest.fail("members were loaded"))
    assert main(["bench", "-m", "gemma-3-270m"]) == 2
    assert "give 2 or more" in capsys.readouterr().err
