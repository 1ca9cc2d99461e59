"""Anthropic Messages behind the core's provider interface (shared parts: :mod:`adapters.llm_sdk`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import anthropic
from anthropic import types as anthropic_types

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

# Anthropic wants the conversation to open with the user; a voice call opens with our greeting.
CALL_STARTED = "(The call has started.)"


def anthropic_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Neutral history to Anthropic messages: strictly alternating roles, user first.

    Assistant tool calls become ``tool_use`` blocks; tool results become ``tool_result`` blocks of
    a user message (placed before any text, as the API requires); consecutive messages of one
    role are merged; empty text is dropped (the API refuses empty text blocks).
    """
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = role_of(message)
        blocks: list[dict[str, Any]] = []
        if role == "tool":
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message["tool_call_id"],
                "content": message["content"],
            }
            if message.get("is_error"):
                result["is_error"] = True
            blocks.append(result)
            role = "user"
        else:
            if message.get("content"):
                blocks.append({"type": "text", "text": message["content"]})
            if role == "assistant":
                blocks.extend(
                    {"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                    for c in tool_calls_of(message)
                )
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        if turn["role"] == "user":
            turn["content"].sort(key=lambda block: block["type"] != "tool_result")  # stable
    if turns and turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": [{"type": "text", "text": CALL_STARTED}]})
    return turns


def anthropic_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """``ToolSpec``s as Anthropic tools."""
    return [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools]


_ANTHROPIC_STOP = {
    "end_turn": "end",
    "stop_sequence": "end",
    "tool_use": "tool_calls",
    "max_tokens": "length",
}


class AnthropicProvider:
    """Anthropic Messages streaming.

    Args:
        base_url: e.g. ``https://api.anthropic.com`` (no ``/v1``).
        api_key: the API key (SDK 2.x sends it as ``Authorization: Bearer``).
        model: e.g. ``claude-haiku-4-5``.
        timeout_s: bound on connecting and on the wait for each streamed event.
        temperature: leave ``None`` for api.anthropic.com: API version 2026-10-21, which the 2.x
            SDK sends, removed the sampling parameters and answers 400 to any ``temperature``.
            Set it only for an Anthropic-compatible server that still takes one.
        max_tokens: bound on the reply length (the API requires one).
        label: the ``name`` shown in logs; ``anthropic:{model}`` by default.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        timeout_s: float = 20.0,
        temperature: float | None = None,
        max_tokens: int = 400,
        label: str | None = None,
    ) -> None:
        self.name = label or f"anthropic:{model}"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._client = anthropic.AsyncAnthropic(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=sdk_timeout(timeout_s)
        )

    def request_body(
        self, *, system: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec]
    ) -> dict[str, Any]:
        """The Messages arguments for one turn, but ``stream=True`` (no I/O)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": anthropic_messages(messages),
            "max_tokens": self.max_tokens,
        }
        if system:
            body["system"] = system
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if tools:
            body["tools"] = anthropic_tools(tools)
        return body

    async def stream(
        self, *, system: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LLMEvent]:
        """Stream one turn; see ``LLMProvider.stream``."""
        body = self.request_body(system=system, messages=messages, tools=tools)
        calls: dict[int, PendingCall] = {}
        stop_reason: str | None = None
        input_tokens: int | None = None
        output_tokens: int | None = None
        # The 2.x SDK no longer takes sampling parameters as arguments: any goes in the raw body.
        extra = {key: body.pop(key) for key in ("temperature",) if key in body}
        opened = vendor_stream(
            lambda: self._client.messages.create(**body, stream=True, extra_body=extra or None), self.name
        )
        async with aclosing(opened) as events:
            async for event in events:
                if isinstance(event, anthropic_types.RawContentBlockDeltaEvent):
                    delta = event.delta
                    if isinstance(delta, anthropic_types.TextDelta) and delta.text:
                        yield TextDelta(delta.text)
                    elif isinstance(delta, anthropic_types.InputJSONDelta) and event.index in calls:
                        calls[event.index].arguments.append(delta.partial_json)
                elif isinstance(event, anthropic_types.RawContentBlockStartEvent):
                    block = event.content_block
                    if isinstance(block, anthropic_types.ToolUseBlock):
                        calls[event.index] = PendingCall(block.id, block.name)
                elif isinstance(event, anthropic_types.RawContentBlockStopEvent):
                    if event.index in calls:
                        yield calls.pop(event.index).finish(event.index)
                elif isinstance(event, anthropic_types.RawMessageStartEvent):
                    input_tokens = event.message.usage.input_tokens
                    output_tokens = event.message.usage.output_tokens
                elif isinstance(event, anthropic_types.RawMessageDeltaEvent):
                    stop_reason = event.delta.stop_reason or stop_reason
                    output_tokens = event.usage.output_tokens
                    if event.usage.input_tokens is not None:
                        input_tokens = event.usage.input_tokens
        if stop_reason is None:
            # The stream ended without message_delta: the connection was cut, not a finished turn.
            raise ProviderUnavailable("stream ended before the message finished", provider=self.name)
        yield Finished(_ANTHROPIC_STOP.get(stop_reason, stop_reason), input_tokens, output_tokens)

    async def aclose(self) -> None:
        await self._client.close()
