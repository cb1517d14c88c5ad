"""Writing engine results in OpenAI's wire format: chat completions and their stream
chunks, text completions and theirs, usage, logprobs, and error bodies.

Finish reasons in OpenAI's terms: the engine's `eos` and `stop` are `stop`, `length` is
`length`, `tool_calls` is `tool_calls`. A reply that calls a tool has `content` null and
`tool_calls` (`{"id", "type": "function", "function": {"name", "arguments": JSON text}}`);
streamed, the call comes whole in one delta (`index` 0), then the finish chunk. Usage
counts the prompt in the main member's tokens (the vocabulary the answer is written in).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from ..outputs import GenerationResult, TokenLogprob, ToolCall, Usage

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def finish_reason(reason: str | None) -> str | None:
    """The OpenAI finish reason of an engine finish reason."""
    return None if reason is None else FINISH_REASONS.get(reason, reason)


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Answer:
    """The identity of one response (id, creation time, model name), shared by its chunks."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        prefix = "chatcmpl" if chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, results: list[GenerationResult], main: str, logprobs: bool) -> dict[str, Any]:
        """The non-streamed response for these results (one choice each)."""
        body = self._head("chat.completion" if self.chat else "text_completion")
        body["choices"] = [self._choice(i, r, logprobs) for i, r in enumerate(results)]
        body["usage"] = usage_of([r.usage for r in results], main)
        return body

    def _choice(self, i: int, result: GenerationResult, logprobs: bool) -> dict[str, Any]:
        entries = result.logprobs if logprobs else None
        choice: dict[str, Any] = {"index": i, "finish_reason": finish_reason(result.finish_reason)}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": result.text}
            if result.tool_calls:
                message["content"] = result.text or None
                message["tool_calls"] = [wire_call(c) for c in result.tool_calls]
            choice["message"] = message
            choice["logprobs"] = chat_logprobs(entries) if entries is not None else None
        else:
            choice["text"] = result.text
            choice["logprobs"] = completion_logprobs(entries) if entries is not None else None
        return choice

    def chunk(
        self,
        index: int,
        text: str | None = None,
        reason: str | None = None,
        logprobs: list[TokenLogprob] | None = None,
        role: bool = False,
    ) -> dict[str, Any]:
        """One stream chunk of choice `index`: a text delta and/or its finish reason."""
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason(reason)}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
            choice["logprobs"] = chat_logprobs(logprobs) if logprobs is not None else None
        else:
            choice["text"] = text or ""
            choice["logprobs"] = completion_logprobs(logprobs) if logprobs is not None else None
        body["choices"] = [choice]
        return body

    def tool_calls_chunk(self, index: int, calls: list[ToolCall]) -> dict[str, Any]:
        """A chat stream chunk holding a reply's tool calls, whole."""
        body = self._head("chat.completion.chunk")
        delta = {"tool_calls": [{"index": k, **wire_call(c)} for k, c in enumerate(calls)]}
        body["choices"] = [
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        ]
        return body

    def usage_chunk(self, usages: list[Usage], main: str) -> dict[str, Any]:
        """The last chunk asked for by `stream_options.include_usage`: no choices."""
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage_of(usages, main)
        return body


def wire_call(call: ToolCall) -> dict[str, Any]:
    """A tool call as OpenAI writes it: arguments as a JSON string."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }


def usage_of(usages: list[Usage], main: str) -> dict[str, Any]:
    """Summed OpenAI usage of several rows; with `weighting="prompt"` also the extra field
    `prompt_bits_per_byte`: each member's prompt score (member name -> bits per byte) for
    one row, a list of them in row order for several.
    """
    total: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for usage in usages:
        for key, value in usage.token_counts(main).items():
            total[key] += value
    scores = [dict(u.prompt_bits_per_byte) for u in usages]
    if any(scores):
        total["prompt_bits_per_byte"] = scores[0] if len(scores) == 1 else scores
    return total


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat logprobs: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top
                ],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """Legacy completions logprobs: parallel lists of tokens, logprobs, top maps, offsets."""
    offsets, offset = [], 0
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }
