"""LLM providers behind one neutral streaming interface: OpenAI-compatible servers and Anthropic.

The turn manager speaks only this module's neutral types: a system prompt, a chat history of
plain dicts, and ``ToolSpec`` tools in; ``TextDelta``, ``ToolCall`` and one ``Finished`` out.
Each provider converts to its vendor's wire format with pure functions (tested bytes in, bytes
out) and translates vendor errors at the edge into a small taxonomy: ``ProviderTimeout`` and
``ProviderUnavailable`` are worth trying again (or on the next provider), ``ProviderRejected`` is
not. Providers never retry by themselves (``max_retries=0``): the engine owns the provider chain.

Neutral chat history::

    {"role": "user", "content": str}
    {"role": "assistant", "content": str, "tool_calls": [ToolCall, ...]}   # tool_calls optional
    {"role": "tool", "tool_call_id": str, "name": str, "content": str}      # content: JSON text
                                                                            # optional "is_error": bool
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import anthropic
import httpx2
import openai
from anthropic import types as anthropic_types


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call.

    Attributes:
        name: function name, e.g. ``"issue_refund"``.
        description: what the tool does and when to use it, for the model.
        parameters: a JSON Schema object describing the arguments.
    """

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call the model made.

    Attributes:
        id: the vendor's call id; the tool result message must quote it.
        name: the tool's name.
        arguments: parsed JSON object; ``{}`` when the model sent invalid JSON or not an object.
        raw_arguments: the argument text exactly as the model sent it.
    """

    id: str
    name: str
    arguments: dict[str, Any] = field(hash=False)
    raw_arguments: str = ""


@dataclass(frozen=True)
class TextDelta:
    """A piece of the reply text, as soon as it arrives."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The last event of a stream.

    Attributes:
        stop_reason: ``"end"``, ``"tool_calls"``, ``"length"``, or the vendor's raw value.
        input_tokens: prompt tokens, when the server reported them.
        output_tokens: completion tokens, when the server reported them.
    """

    stop_reason: str
    input_tokens: int | None = None
    output_tokens: int | None = None


LLMEvent = TextDelta | ToolCall | Finished


class ProviderError(Exception):
    """Base of the errors a provider raises; ``retryable`` says whether trying again may help."""

    retryable = False

    def __init__(self, message: str, *, provider: str = "") -> None:
        super().__init__(f"{provider}: {message}" if provider else message)
        self.provider = provider


class ProviderTimeout(ProviderError):
    """The provider did not answer, or stopped streaming, within the timeout."""

    retryable = True


class ProviderUnavailable(ProviderError):
    """The provider could not be reached, broke the stream, was overloaded or answered 5xx/429."""

    retryable = True


class ProviderRejected(ProviderError):
    """The provider refused the request (bad key, bad request, unknown model): retrying won't help."""


@runtime_checkable
class LLMProvider(Protocol):
    name: str

    def stream(
        self, *, system: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LLMEvent]:
        """Stream one model turn: ``TextDelta``s and ``ToolCall``s, then exactly one ``Finished``.

        Raises:
            ProviderError: a subclass saying whether trying again may help.
        """
        ...

    async def aclose(self) -> None:
        """Release the HTTP connections."""
        ...


# --- pure conversion helpers ------------------------------------------------------------------


def parse_arguments(raw: str) -> dict[str, Any]:
    """Parse tool-call arguments; ``{}`` for empty, invalid or non-object JSON (keep ``raw`` too)."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _tool_calls_of(message: Mapping[str, Any]) -> list[ToolCall]:
    calls = []
    for call in message.get("tool_calls") or ():
        if isinstance(call, ToolCall):
            calls.append(call)
        else:  # a dict read back from a log is accepted too
            arguments = dict(call.get("arguments") or {})
            calls.append(ToolCall(call["id"], call["name"], arguments, call.get("raw_arguments", "")))
    return calls


def _role_of(message: Mapping[str, Any]) -> str:
    role = message.get("role")
    if role not in ("user", "assistant", "tool"):
        raise ValueError(f"unsupported message role {role!r}: expected user, assistant or tool")
    return str(role)


def openai_messages(system: str, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Neutral history to OpenAI chat messages (a system message first when ``system`` is set)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in messages:
        role = _role_of(message)
        if role == "user":
            out.append({"role": "user", "content": message["content"]})
        elif role == "tool":
            out.append(
                {"role": "tool", "tool_call_id": message["tool_call_id"], "content": message["content"]}
            )
        else:
            calls = _tool_calls_of(message)
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
        role = _role_of(message)
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
                    for c in _tool_calls_of(message)
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


def _openai_stop(raw: str | None, has_calls: bool) -> str:
    # Ollama and llama.cpp may say "stop" although they made tool calls: trust the calls.
    if raw == "length":
        return "length"
    if has_calls:
        return "tool_calls"
    if raw in (None, "stop", "tool_calls", "function_call"):
        return "end"
    return raw


# --- errors -----------------------------------------------------------------------------------


def _translate(error: Exception, provider: str) -> ProviderError:
    """One vendor (or transport) error as a ``ProviderError``; the caller raises it ``from`` the original."""
    message = str(error) or type(error).__name__
    if isinstance(error, openai.APITimeoutError | anthropic.APITimeoutError | httpx2.TimeoutException):
        return ProviderTimeout(message, provider=provider)
    if isinstance(error, openai.APIStatusError | anthropic.APIStatusError):
        status = error.status_code
        if status == 408:
            return ProviderTimeout(message, provider=provider)
        # Below 400: an error event inside a 200 stream (Anthropic's "overloaded_error").
        if status < 400 or status in (409, 429) or status >= 500:
            return ProviderUnavailable(message, provider=provider)
        return ProviderRejected(message, provider=provider)
    # Connection refused/reset, a stream cut short, an error chunk inside an OpenAI stream, a
    # garbled event: the server is not fit to answer now; another attempt or provider may be.
    return ProviderUnavailable(message, provider=provider)


# The SDK errors, plus the transport errors the Anthropic SDK lets through while a stream is read.
_VENDOR_ERRORS = (openai.APIError, anthropic.APIError, httpx2.RequestError, json.JSONDecodeError)


def _timeout(timeout_s: float) -> httpx2.Timeout:
    # The read timeout bounds the wait for each chunk, so a stalled stream fails after timeout_s.
    # Connecting takes milliseconds when the server is up; don't let a black hole eat a turn.
    return httpx2.Timeout(timeout_s, connect=min(timeout_s, 5.0))


# --- OpenAI-compatible ------------------------------------------------------------------------


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def finish(self, position: int) -> ToolCall:
        raw = "".join(self.arguments)
        return ToolCall(self.id or f"call_{position}", self.name, parse_arguments(raw), raw)


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
            timeout=_timeout(timeout_s),
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
        pending: dict[int, _PendingCall] = {}
        finish_reason: str | None = None
        input_tokens: int | None = None
        output_tokens: int | None = None
        try:
            chunks = await self._client.chat.completions.create(**body, stream=True)
            try:
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
            finally:
                await chunks.close()
        except _VENDOR_ERRORS as e:
            raise _translate(e, self.name) from e
        if finish_reason is None:
            # Every OpenAI-compatible server ends with a finish_reason: without one the stream was cut.
            raise ProviderUnavailable("stream ended without a finish_reason", provider=self.name)
        for position, key in enumerate(sorted(pending)):
            yield pending[key].finish(position)
        yield Finished(_openai_stop(finish_reason, bool(pending)), input_tokens, output_tokens)

    async def aclose(self) -> None:
        await self._client.close()


def _accumulate(pending: dict[int, _PendingCall], part: Any) -> None:
    """Add one streamed tool-call piece: id and name come first, arguments in pieces, by ``index``."""
    index = getattr(part, "index", None)
    if index is None:
        # Some servers omit the index: a new id starts a new call, anything else continues the last.
        last = max(pending, default=-1)
        index = last + 1 if last < 0 or (part.id and part.id != pending[last].id) else last
    call = pending.setdefault(index, _PendingCall())
    if part.id:
        call.id = part.id
    function = part.function
    if function is not None:
        if function.name:
            call.name = function.name
        if function.arguments:
            call.arguments.append(function.arguments)


# --- Anthropic --------------------------------------------------------------------------------


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
            base_url=base_url, api_key=api_key, max_retries=0, timeout=_timeout(timeout_s)
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
        calls: dict[int, _PendingCall] = {}
        stop_reason: str | None = None
        input_tokens: int | None = None
        output_tokens: int | None = None
        try:
            # The 2.x SDK no longer takes sampling parameters as arguments: any goes in the raw body.
            extra = {key: body.pop(key) for key in ("temperature",) if key in body}
            events = await self._client.messages.create(**body, stream=True, extra_body=extra or None)
            try:
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
                            calls[event.index] = _PendingCall(block.id, block.name)
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
            finally:
                await events.close()
        except _VENDOR_ERRORS as e:
            raise _translate(e, self.name) from e
        if stop_reason is None:
            # The stream ended without message_delta: the connection was cut, not a finished turn.
            raise ProviderUnavailable("stream ended before the message finished", provider=self.name)
        yield Finished(_ANTHROPIC_STOP.get(stop_reason, stop_reason), input_tokens, output_tokens)

    async def aclose(self) -> None:
        await self._client.close()


def build_provider(
    kind: str, *, base_url: str, api_key: str, model: str, timeout_s: float = 20.0
) -> LLMProvider:
    """A provider by kind: ``"openai"`` (OpenAI, vLLM, llama.cpp server, Ollama) or ``"anthropic"``.

    Raises:
        ValueError: for any other kind.
    """
    if kind == "openai":
        return OpenAICompatibleProvider(base_url, api_key, model, timeout_s=timeout_s)
    if kind == "anthropic":
        return AnthropicProvider(base_url, api_key, model, timeout_s=timeout_s)
    raise ValueError(
        f"unknown LLM provider kind {kind!r}: use 'openai' (also vLLM, llama.cpp, Ollama) or 'anthropic'"
    )
