"""Tool calls in the engine (decoding/tools.py): the tools reach each member through its
template or the instruction, forced calls always parse and match their tool's schema,
`auto` gives text or a call, conversations carry calls and results, assistant prefixes.
"""

from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from deepen_engine import ConfigError, Ensemble, MemberSpec  # noqa: E402
from deepen_engine.decoding.chat import check_messages, render  # noqa: E402
from deepen_engine.decoding.tools import TOOL_INSTRUCTION, CallForm, ToolSet, closed  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "name": "add",
    "parameters": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 99},
            "b": {"type": "integer", "minimum": 0, "maximum": 99},
            "opts": {
                "type": "object",
                "properties": {"round": {"type": "boolean"}},
                "required": ["round"],
            },
        },
        "required": ["a", "b", "opts"],
    },
}
PING = {"name": "ping", "description": "No arguments"}
TOOLS = [WEATHER, ADD, PING]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ANSWERED = [  # ASK, the assistant's call of get_weather, and the tool's result
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
]


def _schema(name: str) -> dict:
    for tool in TOOLS:
        spec = tool.get("function", tool)
        if spec["name"] == name:
            return closed(spec.get("parameters") or {"type": "object", "properties": {}})
    raise AssertionError(name)


@pytest.mark.parametrize("choice", ["required", "get_weather", "add", "ping"])
def test_forced_calls_parse_and_match_their_schema(tiny_ensemble, choice):
    for seed in range(4):
        result = tiny_ensemble.generate(
            ASK, tools=TOOLS, tool_choice=choice, max_new_tokens=80, temperature=1.0, seed=seed
        )
        assert result.finish_reason == "tool_calls", result
        assert result.text == ""
        (call,) = result.tool_calls
        assert call.name in ([choice] if choice != "required" else ["get_weather", "add", "ping"])
        jsonschema.validate(call.arguments, _schema(call.name))
        assert json.loads(call.arguments_json) == call.arguments
        assert call.id.startswith("call_") and len(call.id) == 29


def test_auto_gives_text_or_a_call_and_streams_text(tiny_ensemble):
    kinds = set()
    # seeds 0 to 6 give 40 tokens of text (finish "length") on these random weights and
    # seed 7 text that ends at EOS (none of 0 to 7 calls a tool): three seeds cover both
    for seed in (0, 1, 7):
        kwargs = dict(tools=TOOLS, max_new_tokens=40, temperature=1.0, seed=seed)
        result = tiny_ensemble.generate(ASK, **kwargs)
        events = list(tiny_ensemble.stream(ASK, **kwargs))
        assert "".join(e.delta for e in events) == result.text
        assert events[-1].finish_reason == result.finish_reason
        if result.tool_calls:
            kinds.add("call")
            assert result.finish_reason == "tool_calls" and result.text == ""
            assert all(e.delta == "" for e in events)  # a call's text is not streamed
        else:
            kinds.add("text")
            assert not result.text.lstrip().startswith("{")
    assert "text" in kinds


def test_auto_call_once_it_starts(tiny_ensemble):
    """`auto`: the first character decides; a reply that opens with `{` is a call from
    there on, constrained like a forced one."""
    import torch

    from deepen_engine.decoding.constraints import RowConstraint, apply_masks, constraint_vocab

    main = tiny_ensemble.main
    toolset = ToolSet.build(TOOLS, "auto")
    assert toolset is not None
    row = RowConstraint(toolset.constraint(CallForm()), constraint_vocab(main))
    texts = main.vocab.texts

    def allowed() -> set[bytes]:
        masked = apply_masks(torch.zeros(1, len(texts)), [row])
        return {texts[i] for i in (~torch.isinf(masked[0])).nonzero().flatten().tolist()}

    first = allowed()
    assert b"The" in first and b"{" in first  # text or a call
    row.advance(main.tokenizer("{", add_special_tokens=False).input_ids[0])
    openings = [f'{{"name": "{n}", "arguments": {{'.encode() for n in toolset.names]
    after = allowed()
    assert after and all(any(o.startswith(b"{" + t) for o in openings) for t in after)


def test_batch_rows_with_tools_equal_each_alone(tiny_ensemble):
    asks = [ASK, [{"role": "user", "content": "Add 2 and 3"}]]
    both = tiny_ensemble.generate(asks, tools=TOOLS, tool_choice="required", max_new_tokens=80)
    for ask, result in zip(asks, both):
        alone = tiny_ensemble.generate(ask, tools=TOOLS, tool_choice="required", max_new_tokens=80)
        assert (alone.token_ids, alone.tool_calls[0].name, alone.tool_calls[0].arguments) == (
            result.token_ids,
            result.tool_calls[0].name,
            result.tool_calls[0].arguments,
        )


def test_unconstrained_tools_only_parse(tiny_ensemble):
    result = tiny_ensemble.generate(
        ASK, tools=TOOLS, tool_choice="required", tool_constraint=False, max_new_tokens=12
    )
    assert result.tool_calls == []  # random weights: no JSON without the grammar
    assert result.finish_reason == "length"
    assert result.text


def test_length_inside_a_call_is_text(tiny_ensemble):
    result = tiny_ensemble.generate(ASK, tools=TOOLS, tool_choice="add", max_new_tokens=5)
    assert result.finish_reason == "length"
    assert result.tool_calls == []
    assert result.text.startswith('{"name": "add"'[: len(result.text)])


def test_instruction_for_templates_without_tools(tiny_ensemble, tiny_pair):
    toolset = ToolSet.build(TOOLS, "required")
    assert toolset is not None
    chatml, plain = tiny_ensemble.render(ASK, tools=TOOLS, tool_choice="required")
    instruction = toolset.instruction()
    assert instruction.startswith(TOOL_INSTRUCTION.split("{tools}")[0])
    assert "You must call one of the tools." in instruction
    assert chatml.startswith("<|im_start|>system\n" + instruction + "<|im_end|>\n")
    assert plain.startswith("System: " + instruction + "\n\nUser: What is the weather")
    named = ToolSet.build(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert named is not None and named.choice == "add"
    assert named.instruction().endswith("You must call the tool add.")
    # "none": plain chat, no tools described
    assert tiny_ensemble.render(ASK, tools=TOOLS, tool_choice="none") == tiny_ensemble.render(ASK)


TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | map(attribute='function.name') | join(',') }}</tools>\n"
    "{% endif %}{% for m in messages %}<{{ m['role'] }}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n"
    "</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_template_with_tools_gets_them_and_hermes_calls(tiny_pair, bpe_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = TOOLS_TEMPLATE
    ens = Ensemble(
        [MemberSpec(source=(tiny_pair[0][0], tok), name="h"), MemberSpec(source=tiny_pair[1])],
        min_anchors=50,
    )
    history = ANSWERED
    own, other = ens.render(history, tools=TOOLS)
    assert own == (  # (transformers renders templates with trim_blocks)
        "<tools>get_weather,add,ping</tools>\n<user>What is the weather in Paris?<assistant>"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><tool>18 C<assistant>"
    )
    # the other member has no template: the instruction, and the answered call stated with
    # its result in a user turn (no assistant turn repeating the call)
    assert other.startswith("System: " + ToolSet.build(TOOLS).instruction())
    assert other.endswith(
        "\n\nUser: What is the weather in Paris?\n\nUser: (The tool get_weather was called "
        'with {"city": "Paris"} and returned: 18 C)\n\nAssistant:'
    )
    result = ens.generate(ASK, tools=TOOLS, tool_choice="get_weather", max_new_tokens=120)
    assert result.finish_reason == "tool_calls"
    # the bytes joined first: a random model may split a character across tokens
    text = b"".join(ens.members[0].vocab.texts[i] for i in result.token_ids).decode()
    assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
    jsonschema.validate(result.tool_calls[0].arguments, _schema("get_weather"))


def test_assistant_prefix_is_continued(bpe_tokenizer, sp_tokenizer, tiny_ensemble):
    convo = [*ASK, {"role": "assistant", "content": "The weather in"}]
    assert render(bpe_tokenizer, check_messages(convo)).endswith(
        "<|im_start|>assistant\nThe weather in"
    )
    assert render(sp_tokenizer, check_messages(convo)).endswith("\n\nAssistant: The weather in")
    gemma_like = copy.deepcopy(sp_tokenizer)
    gemma_like.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    )
    assert render(gemma_like, check_messages(convo)).endswith(
        "<start_of_turn>model\nThe weather in"
    )
    # the members are fed the open turn: the prompt is the rendered prefix, nothing after
    reply = tiny_ensemble.generate(convo, max_new_tokens=6)
    for member, text in zip(tiny_ensemble.members, tiny_ensemble.render(convo)):
        assert text.endswith("The weather in")
        ids = member.tokenizer(text, add_special_tokens=False).input_ids
        assert reply.usage.prompt_tokens[member.name] == len(ids)


@pytest.mark.parametrize(
    ("tools", "choice", "match"),
    [
        ([{"name": "a b"}], None, r"tools\[0\] has name 'a b'"),
        ([{"description": "x"}], None, r"tools\[0\] must be"),
        ([PING, PING], None, "two tools named 'ping'"),
        ([PING], "nope", r"tool_choice='nope' is not 'auto', 'none', 'required'"),
        (None, "required", "tool_choice='required' needs tools"),
        ([{"name": "t", "parameters": {"type": "array"}}], None, "must be a JSON schema of an"),
        (
            [{"name": "t", "parameters": {"type": "object", "properties": {"x": {"type": "q"}}}}],
            None,
            r"tools\[0\] \('t'\) parameters: json_schema cannot be compiled",
        ),
    ],
)
def test_bad_tools_raise(tiny_ensemble, tools, choice, match):
    with pytest.raises(ConfigError, match=match):
        tiny_ensemble.generate(ASK, tools=tools, tool_choice=choice, max_new_tokens=2)


def test_tools_need_chat_and_no_other_constraint(tiny_ensemble):
    with pytest.raises(ConfigError, match="tools need chat prompts"):
        tiny_ensemble.generate("Weather?", tools=TOOLS, max_new_tokens=2)
    with pytest.raises(ConfigError, match="give tools or GenerationConfig.regex, not both"):
        tiny_ensemble.generate(ASK, tools=TOOLS, regex="a", max_new_tokens=2)


def test_plain_history_of_calls():
    from deepen_engine.decoding.chat import plain_messages

    call = {"id": "a", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    other = {**call, "id": "b"}
    messages = check_messages(
        [
            *ASK,
            {"role": "assistant", "content": "Let me add.", "tool_calls": [call, other]},
            {"role": "tool", "tool_call_id": "a", "content": "1"},
        ]
    )
    assert plain_messages(messages)[1:] == [
        # the unanswered call "b" stays in the assistant's turn, the answered one moves
        {"role": "assistant", "content": 'Let me add.\n{"name": "add", "arguments": {"a": 1}}'},
        {"role": "user", "content": '(The tool add was called with {"a": 1} and returned: 1)'},
    ]


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, "tool_calls"),
        (
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
            },
            r"arguments is not JSON",
        ),
    ],
)
def test_bad_tool_messages(message, match):
    with pytest.raises(ConfigError, match=match):
        check_messages([*ASK, message])


def test_closed_adds_no_properties_rule_only_where_silent():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {}}, "b": {"type": "object"}},
        "additionalProperties": True,
    }
    out = closed(schema)
    assert out["additionalProperties"] is True
    assert out["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["b"]
