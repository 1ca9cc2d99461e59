"""What the LLM SDK adapters share: vendor error translation, HTTP timeouts, tool-call assembly.

Each adapter (:mod:`adapters.openai_llm`, :mod:`adapters.anthropic_llm`) keeps its wire format
conversions as pure functions (tested bytes in, bytes out) and never retries by itself
(``max_retries=0``): the engine owns the provider chain. Vendor errors are translated here, at
the edge, into the core's taxonomy (:mod:`pipeline.llm_providers`): ``ProviderTimeout`` and
``ProviderUnavailable`` are worth trying again, ``ProviderRejected`` is not.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import anthropic
import httpx2
import openai

from pipeline.llm_providers import (
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    ToolCall,
    parse_arguments,
)


def translate_error(error: Exception, provider: str) -> ProviderError:
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
VENDOR_ERRORS = (openai.APIError, anthropic.APIError, httpx2.RequestError, json.JSONDecodeError)


_Event = TypeVar("_Event")
_Event_co = TypeVar("_Event_co", covariant=True)


class SdkStream(Protocol[_Event_co]):
    """A streamed SDK response (``openai.AsyncStream``, ``anthropic.AsyncStream``)."""

    def __aiter__(self) -> AsyncIterator[_Event_co]: ...

    async def close(self) -> None: ...


async def vendor_stream(
    open_stream: Callable[[], Awaitable[SdkStream[_Event]]], provider: str
) -> AsyncGenerator[_Event, None]:
    """The events of the SDK stream ``open_stream`` opens, with vendor errors (opening or reading)
    raised as ``ProviderError``s; the stream is closed however reading ends. Iterate it under
    ``contextlib.aclosing`` so that a consumer who stops early closes the stream at once."""
    try:
        events = await open_stream()
        try:
            async for event in events:
                yield event
        finally:
            await events.close()
    except VENDOR_ERRORS as e:
        raise translate_error(e, provider) from e


def sdk_timeout(timeout_s: float) -> httpx2.Timeout:
    # The read timeout bounds the wait for each chunk, so a stalled stream fails after timeout_s.
    # Connecting takes milliseconds when the server is up; don't let a black hole eat a turn.
    return httpx2.Timeout(timeout_s, connect=min(timeout_s, 5.0))


@dataclass
class PendingCall:
    """A tool call being streamed: id and name first, then the arguments in pieces."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def finish(self, position: int) -> ToolCall:
        """The complete call (``position`` names it when the server sent no id)."""
        raw = "".join(self.arguments)
        return ToolCall(self.id or f"call_{position}", self.name, parse_arguments(raw), raw)
