"""`deepen eval --task tools` (commands/eval/tools.py): seeded requests, the judging of
replies, and the command on the tiny members."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from deepen_engine import GenerationResult, ToolCall, Usage  # noqa: E402
from deepen_engine.commands.cli import main  # noqa: E402
from deepen_engine.commands.eval.tools import (  # noqa: E402
    TOOLS,
    ToolScore,
    lenient_call,
    make_requests,
)
from tests.conftest import member_args, tiny_gemma3, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def long_folders(bpe_tokenizer, sp_tokenizer, tmp_path_factory) -> list[str]:
    """The tiny members with a 4096-token context (the four tools' instruction alone is
    over 1000 tiny-vocabulary tokens)."""
    paths = []
    models = [
        tiny_llama(len(bpe_tokenizer), max_positions=4096),
        tiny_gemma3(len(sp_tokenizer), max_positions=4096),
    ]
    for i, (model, tokenizer) in enumerate(zip(models, [bpe_tokenizer, sp_tokenizer])):
        path = tmp_path_factory.mktemp(f"long{i}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def test_requests_are_seeded_typed_and_varied():
    requests = make_requests(60, seed=0)
    assert requests == make_requests(60, seed=0)
    assert requests != make_requests(60, seed=1)
    assert len(requests) == 60
    tools = {r.tool for r in requests}
    assert tools == {None, "get_weather", "convert_currency", "set_alarm", "add_numbers"}
    assert sum(r.tool is None for r in requests) == 12
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for r in requests:
        if r.tool is not None:  # every expected call is valid for its tool
            jsonschema.validate(r.arguments, schemas[r.tool])
    alarm = next(r for r in requests if r.tool == "set_alarm")
    time = alarm.arguments["time"]
    assert f"{time['hour']}:{time['minute']:02d}" in alarm.message  # from the same values
    money = next(r for r in requests if r.tool == "convert_currency")
    assert str(money.arguments["amount"]) in money.message


def test_lenient_call():
    assert lenient_call('```json\n{"name": "f", "arguments": {"a": 1}}\n```') == ("f", {"a": 1})
    assert lenient_call('Sure: {"name": "f", "parameters": {}} ok') == ("f", {})
    assert lenient_call('{"name": "f", "arguments": {"a": ') is None
    assert lenient_call("no call") is None


def _result(text="", calls=()):
    reason = "tool_calls" if calls else "eos"
    return GenerationResult(text, reason, [], Usage(), list(calls))


def test_judging():
    requests = make_requests(60, 0)
    weather = next(r for r in requests if r.tool == "get_weather")
    add = next(r for r in requests if r.tool == "add_numbers")
    free = next(r for r in requests if r.tool is None)
    score = ToolScore("s")
    upper = {**weather.arguments, "city": weather.arguments["city"].upper()}
    score.add(weather, _result(calls=[ToolCall("c", "get_weather", upper)]), True)  # exact
    wrong = {"a": add.arguments["a"] + 1, "b": add.arguments["b"]}
    score.add(add, _result(calls=[ToolCall("c", "add_numbers", wrong)]), True)  # valid, not exact
    bad = json.dumps({"name": "add_numbers", "arguments": {"a": "x"}})
    score.add(add, _result(text=bad), False)  # parsed leniently, invalid
    score.add(free, _result(text="Hello!"), True)  # right: no call
    score.add(free, _result(calls=[ToolCall("c", "add_numbers", {"a": 1, "b": 2})]), True)
    summary = score.summary()
    assert summary["valid_call"]["count"] == [2, 3]
    assert summary["right_tool"]["count"] == [4, 5]
    assert summary["exact_arguments"]["count"] == [1, 3]
    low, high = summary["valid_call"]["ci95"]
    assert low < 2 / 3 < high


def test_eval_tools_command_on_tiny_members(long_folders, tmp_path, capsys):
    out = tmp_path / "tools.jsonl"
    args = ["--task", "tools", "--n", "5", "--seed", "3", "--json", "--output", str(out)]
    assert main(["eval", *member_args(long_folders), *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    systems = [r["system"] for r in summary["results"]]
    # main="auto": tool requests are led by the first member with a chat template
    assert summary["main"] == summary["members"][0]
    assert len(systems) == 6 and systems[-2] == f"ensemble (main {summary['main']}), constrained"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 30
    for record in records:
        if record["system"].endswith(", constrained") and record["call"] is not None:
            schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
            if record["call"][0] in schema and record["finish_reason"] == "tool_calls":
                assert record["valid"]  # a constrained call always validates


def test_eval_tools_required_calls_always_validate(long_folders, tmp_path, capsys):
    out = tmp_path / "tools.jsonl"
    args = ["--task", "tools", "--tool-choice", "required", "--n", "5", "--json"]
    assert main(["eval", *member_args(long_folders), *args, "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"].endswith("tool_choice required)")
    for row in summary["results"]:
        if row["system"].endswith(", constrained"):
            valid, needing = row["valid_call"]["count"]
            records = [json.loads(line) for line in out.read_text().splitlines()]
            cut = sum(
                r["system"] == row["system"]
                and r["expected_tool"] is not None
                and r["finish_reason"] == "length"
                for r in records
            )
            assert valid == needing - cut  # every call that ended is valid
