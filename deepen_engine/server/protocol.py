"""Reading OpenAI request bodies into engine calls, with OpenAI's parameter names in every
error.

`parse_chat` reads a `/v1/chat/completions` body and `parse_completion` a `/v1/completions`
body into a `Call`: the prompts, the `GenerationConfig` keywords, the fusion settings
(deepen's extra body fields) and how to answer (stream, usage chunk, logprobs). A bad
value raises `BadRequest` naming the parameter, which the app turns into a 400 with an
OpenAI error body.

Accepted and mapped: `max_completion_tokens` / `max_tokens`, `stop`, `temperature`,
`top_p`, `seed`, `n` (1 only), `stream`, `stream_options.include_usage`, `logprobs` and
`top_logprobs` (chat) or `logprobs` (completions, an integer); on chat, `tools` and
`tool_choice` (the engine's tool calls: a call always parses), assistant messages with
`tool_calls` and `tool` messages, and `response_format` (`json_object`: any JSON object;
`json_schema`: its `schema`, both through the engine's grammar constraint). Ignored:
`model` (any name is served by the one ensemble), `user`, `metadata`, `store`,
`service_tier`, `parallel_tool_calls` (a reply holds at most one call). Any other field is
refused with a 400 naming it (`schema.py` lists the fields). Extra fields: the
fusion settings `method`, `main`, `weights`, `weighting`, `weight_temperature`, `prompt_score`,
`eta`, `steps`, `tau`,
`fusion_top_k`, `top_mass`, `candidates`, `unite_top_k`, `gate`, `gate_threshold`, and
`top_k`, `min_tokens`, `truncation`, `timeout`, `regex`, `grammar` (output constraints,
as `GenerationConfig`). Refused with a 400 saying so: features deepen does not have (`n` >
1, penalties, `logit_bias`, `echo`, `suffix`, `best_of` > 1, token-id prompts, non-text
message parts, the legacy `functions` / `function_call`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import REQUEST_FUSION_NAMES
from .schema import unknown_field

ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
FUSION_FIELDS = REQUEST_FUSION_NAMES  # body field -> FusionConfig field
_GENERATION_EXTRAS = {
    "top_k": "top_k",
    "min_tokens": "min_new_tokens",
    "truncation": "truncation",
    "timeout": "timeout",
    "regex": "regex",
    "grammar": "grammar",
    "speculate": "speculate",
    "drafter": "drafter",
}
_NOT_SUPPORTED = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "suffix": None,
    "echo": False,
}


class BadRequest(Exception):
    """A request the server refuses: 400 with `param` named in the OpenAI error body."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass
class Call:
    """One request, read: what to generate and how to answer."""

    prompts: list[Any]  # texts, or chat conversations ([{"role", "content"}])
    generation: dict[str, Any] = field(default_factory=dict)  # GenerationConfig keywords
    fusion: dict[str, Any] = field(default_factory=dict)  # FusionConfig keywords
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # alternatives per token; None: no logprobs
    chat: bool = True
    tools: list[Any] | None = None  # OpenAI function specs (chat); checked by the engine
    tool_choice: Any = None  # "auto", "none", "required" or {"type": "function", ...}


def parse_chat(body: Any) -> Call:
    """A `/v1/chat/completions` body as a `Call`."""
    body = _object(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "messages must be a non-empty list of message objects.")
    conversation = [_message(i, m) for i, m in enumerate(messages)]
    for name in ("functions", "function_call"):
        if body.get(name):
            raise BadRequest(
                name, f"{name} is OpenAI's legacy form; send tools and tool_choice instead."
            )
    call = _common(body, chat=True)
    call.prompts = [conversation]
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("tools", "tools must be a list of {'type': 'function', ...} objects.")
    call.tools = tools or None
    call.tool_choice = body.get("tool_choice")
    if call.tools is None and call.tool_choice not in (None, "none", "auto"):
        raise BadRequest("tool_choice", "tool_choice asks for a tool call; give tools too.")
    schema = _response_format(body.get("response_format"))
    if schema is not None:
        if call.tools is not None and call.tool_choice != "none":
            raise BadRequest(
                "response_format",
                "give tools or a JSON response_format, not both: the tools already "
                "constrain the reply.",
            )
        if any(k in call.generation for k in ("regex", "grammar")):
            raise BadRequest("response_format", "give response_format or regex/grammar, not both.")
        call.generation["json_schema"] = schema
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, 20)
    if top is not None and not logprobs:
        raise BadRequest("top_logprobs", "top_logprobs needs logprobs=true.")
    call.logprobs = (top or 0) if logprobs else None
    return call


def parse_completion(body: Any) -> Call:
    """A `/v1/completions` body as a `Call` (one choice per prompt)."""
    body = _object(body, chat=False)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest("prompt", "prompt must be a string or a non-empty list of strings.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise BadRequest(
                "prompt",
                f"prompt[{i}] is {type(p).__name__}; this server takes text prompts only "
                "(token-id prompts are not supported).",
            )
        if not p:
            raise BadRequest("prompt", f"prompt[{i}] is empty; give some text to continue.")
    best_of = _int(body, "best_of", None, 1, None)
    if best_of not in (None, 1):
        raise BadRequest("best_of", "best_of > 1 is not supported; leave it out.")
    call = _common(body, chat=False)
    call.prompts = list(prompts)
    call.logprobs = _int(body, "logprobs", None, 0, 5)
    return call


def _common(body: Mapping[str, Any], chat: bool) -> Call:
    """The parameters both endpoints share."""
    for name, neutral in _NOT_SUPPORTED.items():
        value = body.get(name)
        if value is not None and value != neutral and value != {}:
            raise BadRequest(name, f"{name} is not supported by this server; leave it out.")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model", "model must be a string.")
    n = _int(body, "n", 1, 1, None)
    if n != 1:
        raise BadRequest("n", f"n={n} is not supported: this server returns one choice (n=1).")
    generation: dict[str, Any] = {}
    max_tokens = _int(body, "max_completion_tokens", None, 1, None)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1, None)
    if max_tokens is not None:
        generation["max_new_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise BadRequest("stop", "stop must be a non-empty string or a list of them.")
        generation["stop"] = stops
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        generation["temperature"] = temperature
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None:
        if top_p == 0:
            raise BadRequest("top_p", "top_p must be in (0, 1], got 0.")
        generation["top_p"] = top_p
    seed = _int(body, "seed", None, None, None)
    if seed is not None:
        generation["seed"] = seed
    for name, key in _GENERATION_EXTRAS.items():
        if body.get(name) is not None:
            generation[key] = body[name]
    fusion = {FUSION_FIELDS[k]: body[k] for k in FUSION_FIELDS if body.get(k) is not None}
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options", "stream_options must be an object.")
    include_usage = bool(options and options.get("include_usage"))
    if include_usage and not stream:
        raise BadRequest("stream_options", "stream_options is only allowed with stream=true.")
    return Call(
        prompts=[],
        generation=generation,
        fusion=fusion,
        stream=stream,
        include_usage=include_usage,
        chat=chat,
    )


def _message(i: int, message: Any) -> dict[str, Any]:
    """One message for the engine: text content; an assistant's `tool_calls` and a tool
    result's `tool_call_id` / `name` kept (the engine checks them, errors name the field).
    """
    if not isinstance(message, dict):
        raise BadRequest(f"messages[{i}]", f"messages[{i}] must be an object.")
    role = message.get("role")
    if role not in ROLES:
        hint = " (legacy function messages: send tool messages)" if role == "function" else ""
        raise BadRequest(
            f"messages[{i}].role",
            f"messages[{i}].role is {role!r}; use system, developer, user, assistant or "
            f"tool{hint}.",
        )
    out: dict[str, Any] = {"role": ROLES[role]}
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls:
        out["tool_calls"] = calls
    if role == "tool":
        out["tool_call_id"] = message.get("tool_call_id")
        if message.get("name") is not None:
            out["name"] = message["name"]
    content = message.get("content")
    if content is None and calls:
        content = ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(
                    f"messages[{i}].content[{j}]",
                    f"messages[{i}].content[{j}] is a {kind!r} part; this server reads text "
                    "parts only.",
                )
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    if not isinstance(content, str):
        raise BadRequest(
            f"messages[{i}].content", f"messages[{i}].content must be a string or text parts."
        )
    out["content"] = content
    return out


def _response_format(value: Any) -> dict[str, Any] | None:
    """The JSON schema a `response_format` asks for (None for text): `json_object` is any
    JSON object; `json_schema` is `{"json_schema": {"name", "schema", "strict"}}`.
    """
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest(
                "response_format",
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': "
                "{...}}}.",
            )
        return schema
    raise BadRequest(
        "response_format",
        "response_format must be an object with a 'type': text, json_object or json_schema.",
    )


def _object(body: Any, chat: bool) -> dict[str, Any]:
    """The body as a dict with only fields the endpoint knows (schema.py), as OpenAI's API
    refuses a typo (`max_tokenz`) rather than ignoring it.
    """
    if not isinstance(body, dict):
        raise BadRequest(None, "The request body must be a JSON object.")
    unknown = unknown_field(body, chat)
    if unknown is not None:
        raise BadRequest(*unknown)
    return body


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(name, f"{name} must be true or false, got {value!r}.")
    return value


def _int(
    body: Mapping[str, Any], name: str, default: int | None, low: int | None, high: int | None
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(name, f"{name} must be an integer, got {value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise BadRequest(name, f"{name} must be {bounds}, got {value}.")
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(name, f"{name} must be a number, got {value!r}.")
    if not low <= value <= high:
        raise BadRequest(name, f"{name} must be from {low:g} to {high:g}, got {value}.")
    return float(value)
