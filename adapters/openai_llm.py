"""OpenAI-compatible chat (OpenAI, vLLM, llama.cpp server, Ollama) behind the core's provider interface
(shared parts: :mod:`adapters.llm_sdk`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import openai

from adapters.llm_sdk import PendingCall, sdk_timeout, vendor_stream
from pipeline.llm_providers import (
    Finished,
    LLMEvent,
    ProviderUnavailable,
    TextDelta,
    ToolSpec,
    role_of,
    tool_calls_of,
)


def openai_messages(system: str, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Neutral history to OpenAI chat messages (a system message first when ``system`` is set)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in messages:
        role = role_of(message)
        if role == "user":
            out.append({"role": "user", "content": message["content"]})
        elif role == "tool":
            out.append(
                {"role": "tool", "tool_call_id": message["tool_call_id"], "content": message["content"]}
            )
        else:
            calls = tool_calls_of(message)
            text = message.get("content") or ""
            converted: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                # Arguments go back as valid JSON even when the model sent garbage: vLLM's chat
                # templates parse them and would fail the whole request.
                converted["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                    }
                    for c in calls
                ]
            out.append(converted)
    return out


def openai_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """``ToolSpec``s as OpenAI function tools."""
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def _openai_stop(raw: str | None, has_calls: bool) -> str:
    # Ollama and llama.cpp may say "stop" although they made tool calls: trust the calls.
    if raw == "length":
        return "length"
    if has_calls:
        return "tool_calls"
    if raw in (None, "stop", "tool_calls", "function_call"):
        return "end"
    return raw


class OpenAICompatibleProvider:
    """Chat Completions streaming for OpenAI, vLLM, llama.cpp server and Ollama (``/v1``).

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:11434/v1`` (Ollama).
        api_key: the bearer token; local servers accept any non-empty value.
        model: model name as the server knows it.
        timeout_s: bound on connecting and on the wait for each streamed chunk.
        temperature: sampling temperature; ``None`` leaves it to the server.
        max_tokens: bound on the reply length.
        extra_headers: sent with every request (e.g. a gateway's routing header).
        label: the ``name`` shown in logs; ``openai:{model}`` by default.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        timeout_s: float = 20.0,
        temperature: float | None = 0.2,
        max_tokens: int = 400,
        extra_headers: Mapping[str, str] | None = None,
        label: str | None = None,
    ) -> None:
        self.name = label or f"openai:{model}"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "unused",
            max_retries=0,
            timeout=sdk_timeout(timeout_s),
            default_headers=dict(extra_headers or {}),
        )

    def request_body(
        self, *, system: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec]
    ) -> dict[str, Any]:
        """The Chat Completions arguments for one turn, but ``stream=True`` (no I/O)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": openai_messages(system, messages),
            # Usage arrives in a last chunk without choices; servers that don't know it ignore it.
            "stream_options": {"include_usage": True},
            # max_tokens, not max_completion_tokens: every OpenAI-compatible server knows it.
            "max_tokens": self.max_tokens,
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if tools:  # OpenAI refuses an empty tools list
            body["tools"] = openai_tools(tools)
        return body

    async def stream(
        self, *, system: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LLMEvent]:
        """Stream one turn; see ``LLMProvider.stream``."""
        body = self.request_body(system=system, messages=messages, tools=tools)
        pending: dict[int, PendingCall] = {}
        finish_reason: str | None = None
        input_tokens: int | None = None
        output_tokens: int | None = None
        opened = vendor_stream(lambda: self._client.chat.completions.create(**body, stream=True), self.name)
        async with aclosing(opened) as chunks:
            async for chunk in chunks:
                if chunk.usage is not None:
                    input_tokens = chunk.usage.prompt_tokens
                    output_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    finish_reason = choice.finish_reason or finish_reason
                    delta = choice.delta
                    if delta.content:
                        yield TextDelta(delta.content)
                    for part in delta.tool_calls or ():
                        _accumulate(pending, part)
        if finish_reason is None:
            # Every OpenAI-compatible server ends with a finish_reason: without one the stream was cut.
            raise ProviderUnavailable("stream ended without a finish_reason", provider=self.name)
        for position, key in enumerate(sorted(pending)):
            yield pending[key].finish(position)
        yield Finished(_openai_stop(finish_reason, bool(pending)), input_tokens, output_tokens)

    async def aclose(self) -> None:
        await self._client.close()


def _accumulate(pending: dict[int, PendingCall], part: Any) -> None:
    """Add one streamed tool-call piece: id and name come first, arguments in pieces, by ``index``."""
    index = getattr(part, "index", None)
    if index is None:
        # Some servers omit the index: a new id starts a new call, anything else continues the last.
        last = max(pending, default=-1)
        index = last + 1 if last < 0 or (part.id and part.id != pending[last].id) else last
    call = pending.setdefault(index, PendingCall())
    if part.id:
        call.id = part.id
    function = part.function
    if function is not None:
        if function.name:
            call.name = function.name
        if function.arguments:
            call.arguments.append(function.arguments)
