"""LLM providers behind one neutral streaming interface: OpenAI-compatible servers and Anthropic.

The turn manager speaks only this module's neutral types: a system prompt, a chat history of
plain dicts, and ``ToolSpec`` tools in; ``TextDelta``, ``ToolCall`` and one ``Finished`` out.
Each provider (the SDK adapters live in the top-level ``adapters`` package:
``adapters.openai_llm``, ``adapters.anthropic_llm``, built by ``adapters.llm_providers``)
converts to its vendor's wire format with pure functions (tested bytes in, bytes out) and
translates vendor errors at the edge into this module's small taxonomy: ``ProviderTimeout`` and
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


# --- the neutral chat history -----------------------------------------------------------------


def parse_arguments(raw: str) -> dict[str, Any]:
    """Parse tool-call arguments; ``{}`` for empty, invalid or non-object JSON (keep ``raw`` too)."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def tool_calls_of(message: Mapping[str, Any]) -> list[ToolCall]:
    """The tool calls of an assistant message (``ToolCall``s, or dicts read back from a log)."""
    calls = []
    for call in message.get("tool_calls") or ():
        if isinstance(call, ToolCall):
            calls.append(call)
        else:  # a dict read back from a log is accepted too
            arguments = dict(call.get("arguments") or {})
            calls.append(ToolCall(call["id"], call["name"], arguments, call.get("raw_arguments", "")))
    return calls


def role_of(message: Mapping[str, Any]) -> str:
    """The role of a neutral message; ``ValueError`` for anything but user, assistant or tool."""
    role = message.get("role")
    if role not in ("user", "assistant", "tool"):
        raise ValueError(f"unsupported message role {role!r}: expected user, assistant or tool")
    return str(role)
