"""The `deepen` command line on tiny members saved as local folders."""

from __future__ import annotations

import json

import pytest

from deepen_engine import ConfigError, Ensemble, MemberSpec
from deepen_engine.commands.cli import main
from tests.conftest import member_args


@pytest.fixture(scope="module")
def reference(tiny_folders):
    return Ensemble([MemberSpec(source=p) for p in tiny_folders], min_anchors=50)


def test_generate_json(tiny_folders, reference, capsys):
    code = main(["generate", "The capital of France is", "--json", "--max-new-tokens", "6",
                 *member_args(tiny_folders)])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    expected = reference.generate("The capital of France is", max_new_tokens=6)
    assert out["text"] == expected.text
    assert out["finish_reason"] == expected.finish_reason
    assert out["members"] == [f.rsplit("/", 1)[-1] for f in tiny_folders]
    assert out["usage"]["completion_tokens"] == expected.usage.completion_tokens


def test_generate_closes_its_ensemble(tiny_folders, monkeypatch, capsys):
    # closing stops the worker thread and, with --ray, the actors and their resources
    closed, close = [], Ensemble.close
    monkeypatch.setattr(Ensemble, "close", lambda self: (closed.append(self), close(self)))
    args = ["generate", "Hi", "--json", "--max-new-tokens", "2", *member_args(tiny_folders)]
    assert main(args) == 0
    assert len(closed) == 1 and [m.name for m in closed[0].members] == [
        f.rsplit("/", 1)[-1] for f in tiny_folders
    ]


def test_prompts_file_prints_results_in_order(tiny_folders, reference, tmp_path, capsys):
    messages = [{"role": "user", "content": "Capital of France?"}]
    lines = [{"prompt": "Q:"}, {"messages": messages}, {"prompt": "Once upon a time"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code = main(["generate", "--prompts-file", str(path), "--max-new-tokens", "8",
                 "--batch-size", "2", *member_args(tiny_folders)])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = reference.generate(["Q:", messages, "Once upon a time"], max_new_tokens=8)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["text"] for r in rows] == [e.text for e in expected]


def test_stream_json_lines_join_to_the_text(tiny_folders, reference, capsys):
    code = main(["generate", "Q:", "--json", "--stream", "--max-new-tokens", "10",
                 "--temperature", "0.9", "--seed", "3", *member_args(tiny_folders)])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    deltas = "".join(r["delta"] for r in rows if "delta" in r)
    final = rows[-1]
    assert final["text"] == deltas
    expected = reference.generate("Q:", max_new_tokens=10, temperature=0.9, seed=3)
    assert final["text"] == expected.text


def test_errors_exit_2_with_a_message(tiny_folders, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    assert main(["generate", "--prompts-file", str(bad), *member_args(tiny_folders)]) == 2
    assert "exactly one of 'prompt' or 'messages'" in capsys.readouterr().err
    assert main(["generate", "x", "--top-p", "2", *member_args(tiny_folders)]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_generate_truncation_and_min_new_tokens(tiny_folders, reference, capsys):
    long_prompt = "the river runs " * 400  # past the tiny members' 1024 positions
    assert main(["generate", long_prompt, *member_args(tiny_folders)]) == 2
    assert "--truncation left" in capsys.readouterr().err
    flags = ["--truncation", "left", "--json", "--max-new-tokens", "5", "--min-new-tokens", "5"]
    code = main(["generate", long_prompt, *flags, *member_args(tiny_folders)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    expected = reference.generate(
        long_prompt, max_new_tokens=5, min_new_tokens=5, truncation="left"
    )
    assert out["text"] == expected.text
    assert out["usage"]["completion_tokens"] == 5


def test_models_takes_several_members_at_once(tiny_folders, capsys):
    one_by_one = ["members", "-m", tiny_folders[0], "--model", tiny_folders[1], "--json"]
    assert main(one_by_one) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["members", "--models", *tiny_folders, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in got["members"]] == [m["name"] for m in expected["members"]]
    assert got["anchors"] == expected["anchors"]


def test_chat_prompts_lead_with_the_engines_chat_member(tiny_folders, tmp_path, capsys):
    # gemma's tokenizer has no chat template, llama's has: for chat, llama (index 1) leads
    folders = [tiny_folders[1], tiny_folders[0]]
    ens = Ensemble([MemberSpec(source=p) for p in folders], min_anchors=50)
    assert ens.default_chat_main() == 1
    messages = [{"role": "user", "content": "Capital of France?"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    args = ["--models", *folders, "--min-anchors", "50", "--max-new-tokens", "6"]
    assert main(["generate", "--prompts-file", str(path), *args]) == 0
    chat = json.loads(capsys.readouterr().out)
    assert chat["main"] == ens.members[1].name
    assert chat["text"] == ens.with_fusion(main=1).generate(messages, max_new_tokens=6).text
    assert main(["generate", "Q:", "--json", *args]) == 0  # a text prompt: member 0 leads
    assert json.loads(capsys.readouterr().out)["main"] == ens.members[0].name
    assert main(["generate", "--prompts-file", str(path), "--main", "0", *args]) == 0
    assert json.loads(capsys.readouterr().out)["main"] == ens.members[0].name


def test_a_prompts_file_mixing_text_and_chat_leads_each_by_its_rule(tiny_folders, tmp_path, capsys):
    folders = [tiny_folders[1], tiny_folders[0]]  # gemma (no chat template) first
    ens = Ensemble([MemberSpec(source=p) for p in folders], min_anchors=50)
    messages = [{"role": "user", "content": "Capital of France?"}]
    path = tmp_path / "mixed.jsonl"
    lines = [{"prompt": "Q:"}, {"messages": messages}, {"prompt": "Once upon a time"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = ["--models", *folders, "--min-anchors", "50", "--max-new-tokens", "6"]
    assert main(["generate", "--prompts-file", str(path), *args]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    names = [m.name for m in ens.members]
    assert [r["main"] for r in rows] == [names[0], names[1], names[0]]
    texts = ens.generate(["Q:", "Once upon a time"], max_new_tokens=6)
    chat = ens.with_fusion(main=1).generate(messages, max_new_tokens=6)
    assert [r["text"] for r in rows] == [texts[0].text, chat.text, texts[1].text]


def test_option_defaults_come_from_the_engine_settings(capsys, monkeypatch):
    from deepen_engine import FusionConfig, GenerationConfig
    from deepen_engine.commands.cli import build_parser

    args = build_parser().parse_args(["generate", "x"])
    gen, fusion = GenerationConfig(), FusionConfig()
    assert args.max_new_tokens == gen.max_new_tokens == 128
    assert (args.temperature, args.top_p, args.top_k) == (gen.temperature, gen.top_p, gen.top_k)
    assert (args.eta, args.steps, args.tau) == (fusion.eta, fusion.steps, fusion.tau)
    assert (args.fusion_top_k, args.candidates) == (fusion.top_k, fusion.candidates)
    assert args.min_anchors == fusion.min_anchors and args.main is None
    bench = build_parser().parse_args(["bench"])
    assert bench.main == 0 and bench.eta == fusion.eta  # bench times one fixed leader
    monkeypatch.setenv("COLUMNS", "200")  # one line per option in the help
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    help_text = capsys.readouterr().out
    line = next(x for x in help_text.splitlines() if x.startswith("  --max-new-tokens N"))
    assert line.endswith("Most tokens of the main member to generate (default: 128)")


def test_first_hour_command_line(tiny_folders, capsys):
    """Issue 24's command-line items: a loading line, --stream needs JSON, --version,
    unknown flags with the subcommand's usage, an empty prompt in a user's words."""
    assert main(["generate", "Hi", *member_args(tiny_folders), "--max-new-tokens", "2"]) == 0
    names = ", ".join(f.rsplit("/", 1)[-1] for f in tiny_folders)
    assert capsys.readouterr().err == f"deepen: loading members {names} ...\n"
    assert main(["generate", "Hi", *member_args(tiny_folders), "--stream"]) == 2
    err = capsys.readouterr().err
    assert "--stream prints JSON lines and needs --json or --prompts-file" in err
    assert "loading" not in err  # refused before any member loads
    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0
    assert capsys.readouterr().out.startswith("deepen ")
    with pytest.raises(SystemExit) as unknown:
        main(["generate", "Hi", "--max-tokens", "4"])
    assert unknown.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: deepen generate ")
    assert "deepen generate: error: unrecognized arguments: --max-tokens 4" in err
    assert main(["generate", "", *member_args(tiny_folders)]) == 2
    err = capsys.readouterr().err
    assert err == "deepen: error: the prompt is empty; give some text to continue.\n"


def test_member_options_and_members_file(tmp_path):
    """--member-option sets any MemberSpec field, for every member or one; --members-file
    lists members with their own fields (JSON or TOML)."""
    import argparse

    from deepen_engine.commands.options import member_options, member_specs

    parser = argparse.ArgumentParser(parents=[member_options()])
    args = parser.parse_args(
        [
            "-m", "a-hub/model", "-m", "b-hub/model",
            "--member-option", "device_map=auto",
            "--member-option", 'max_memory={"cpu": "150MiB"}',
            "--member-option", "1:dtype=bfloat16",
        ]
    )  # fmt: skip
    first, second = member_specs(args)
    assert (first.device_map, first.max_memory, first.dtype) == (
        "auto",
        {"cpu": "150MiB"},
        "float32",
    )
    assert (second.device_map, second.dtype) == ("auto", "bfloat16")
    bad = parser.parse_args(["-m", "x/y", "--member-option", "device_map=fast"])
    with pytest.raises(ConfigError, match="device_map='fast' is neither a strategy"):
        member_specs(bad)
    for option, message in [
        ("2:dtype=bfloat16", "member 2 does not exist"),
        ("dtype", "FIELD=VALUE"),
    ]:
        with pytest.raises(ConfigError, match=message):
            member_specs(parser.parse_args(["-m", "x/y", "--member-option", option]))
    toml = tmp_path / "members.toml"
    toml.write_text(
        '[[members]]\nsource = "x/big"\ndevice_map = "auto"\noffload_folder = "/tmp/o"\n'
        '[members.max_memory]\ncpu = "1GiB"\n\n'
        '[[members]]\nsource = "y/small"\ndtype = "bfloat16"\n'
    )
    specs = member_specs(parser.parse_args(["--members-file", str(toml)]))
    assert [(s.source, s.device_map, s.max_memory, s.dtype) for s in specs] == [
        ("x/big", "auto", {"cpu": "1GiB"}, "float32"),
        ("y/small", None, None, "bfloat16"),
    ]
    listed = tmp_path / "members.json"
    listed.write_text(json.dumps([{"source": "x/a", "model_kwargs": {"revision": "main"}}]))
    (spec,) = member_specs(parser.parse_args(["--members-file", str(listed)]))
    assert spec.model_kwargs == {"revision": "main"}
    with pytest.raises(ConfigError, match="not both"):
        member_specs(parser.parse_args(["--members-file", str(listed), "-m", "x/b"]))
    listed.write_text('[{"name": "no source"}]')
    with pytest.raises(ConfigError, match="member 0 must be a table with a source"):
        member_specs(parser.parse_args(["--members-file", str(listed)]))


def test_serve_refuses_a_negative_row_cache_before_loading(capsys):
    assert main(["serve", "--row-cache-size", "-1"]) == 2
    assert "--row-cache-size must be >= 0 rows, got -1." in capsys.readouterr().err
