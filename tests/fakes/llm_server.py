"""Fake LLM servers on 127.0.0.1: OpenAI Chat Completions and Anthropic Messages, streaming.

Both speak their vendor's real wire format (Server-Sent Events, error JSON, auth headers) so the
official SDKs can be pointed at them, and both are scripted the same way: a ``responder`` gets
the request read back into closeloop's NEUTRAL form (``LLMRequest``: system prompt, neutral
messages, tool names) and returns a script of steps:

    ``Say("text")``             streamed in several small chunks
    ``Call("tool", {...})``     a tool call, its arguments streamed in pieces
    ``End("length")``           finish with this (neutral) stop reason instead of the natural one
    ``Slow(seconds)``           pause here (before the first chunk: after the headers)
    ``Hang()``                  stop answering until the server closes
    ``Fail(status=500)``        an error JSON in the vendor's shape (an error event once streaming)

so one responder can run a story against both wire formats. Each server checks what its real
counterpart checks (auth, the ``anthropic-version`` header, tool results answering tool calls,
Anthropic's alternating roles) and answers 400 in the vendor's error shape otherwise.

Usage::

    def responder(request: LLMRequest) -> Script:
        if not request.tool_results:
            return [Say("Let me check."), Call("lookup_order", {"order_id": "A1"})]
        return [Say(f"It is {request.tool_result('lookup_order')['status']}.")]

    async with FakeAnthropic(responder) as fake:
        provider = AnthropicProvider(fake.base_url, fake.api_key, "claude-test")
        ...
        assert fake.requests[0].json["tools"][0]["name"] == "lookup_order"
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from pipeline.llm_providers import ToolCall, parse_arguments

# --- script steps -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Say:
    """Stream ``text`` as several small chunks (one per word)."""

    text: str


@dataclass(frozen=True)
class Call:
    """Call tool ``name``; its JSON arguments are streamed in small pieces.

    Attributes:
        name: the tool's name.
        arguments: the arguments object.
        raw: send this text as the arguments instead (e.g. invalid JSON).
        id: the call id; a vendor-style random one when omitted.
    """

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    raw: str | None = None
    id: str | None = None

    def argument_text(self) -> str:
        return self.raw if self.raw is not None else json.dumps(dict(self.arguments))


@dataclass(frozen=True)
class End:
    """Finish with this neutral stop reason (``"end"``, ``"tool_calls"``, ``"length"``)."""

    reason: str


@dataclass(frozen=True)
class Slow:
    """Wait ``seconds`` at this point; the response headers are already sent."""

    seconds: float


@dataclass(frozen=True)
class Hang:
    """Stop answering until the server closes; ``headers=False`` hangs before the headers."""

    headers: bool = True


@dataclass(frozen=True)
class Fail:
    """Answer an error in the vendor's shape: an HTTP status, or an error event once streaming."""

    status: int = 500
    message: str = ""


Step = Say | Call | End | Slow | Hang | Fail
Script = Sequence[Step]


# --- the neutral request ----------------------------------------------------------------------


@dataclass
class LLMRequest:
    """A request read back into the neutral form of ``pipeline.llm_providers``.

    Attributes:
        system: the system prompt.
        messages: neutral messages (user / assistant with ``tool_calls`` / tool).
        tools: the names of the tools offered.
        model: the model asked for.
        stream: whether a stream was asked for.
    """

    system: str
    messages: list[dict[str, Any]]
    tools: list[str]
    model: str = ""
    stream: bool = True

    @property
    def last_user_text(self) -> str:
        """The text of the last user message, ``""`` when there is none."""
        for message in reversed(self.messages):
            if message["role"] == "user":
                return str(message["content"])
        return ""

    @property
    def tool_results(self) -> list[dict[str, Any]]:
        """The tool messages that end the conversation (answers to the last tool calls), with
        ``result`` holding their content parsed as JSON (or the text when it is not JSON)."""
        tail: list[dict[str, Any]] = []
        for message in reversed(self.messages):
            if message["role"] != "tool":
                break
            try:
                result = json.loads(message["content"])
            except ValueError:
                result = message["content"]
            tail.append({**message, "result": result})
        return tail[::-1]

    def tool_result(self, name: str) -> Any:
        """The parsed result of the last call of tool ``name`` among ``tool_results``, else None."""
        for message in reversed(self.tool_results):
            if message["name"] == name:
                return message["result"]
        return None


Responder = Callable[[LLMRequest], "Script | Step | str | Awaitable[Script | Step | str]"]


def in_order(*scripts: Script | Step | str) -> Responder:
    """A responder that answers each request with the next script (the last one repeats)."""
    queue = list(scripts)

    def respond(_: LLMRequest) -> Script | Step | str:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return respond


@dataclass
class RecordedRequest:
    """One request the fake received.

    Attributes:
        path: URL path.
        headers: request headers.
        body: the raw request body.
        json: the body parsed as JSON (None when it was not JSON).
        neutral: the body read back into the neutral form (None when refused before).
        status: the HTTP status the fake answered.
        sent: the SSE events streamed back, in order.
    """

    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None
    neutral: LLMRequest | None = None
    status: int = 0
    sent: list[bytes] = field(default_factory=list)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _words(text: str) -> list[str]:
    return re.findall(r"\s*\S+\s*", text) or [text]


def _pieces(text: str, size: int = 7) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _text_of(content: Any) -> str:
    """Text of a ``content`` that is a string or a list of text parts/blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


# --- the shared server ------------------------------------------------------------------------


class _FakeLLMServer:
    """Runs the aiohttp server, records requests, reads scripts; vendors fill in the wire format."""

    path = ""

    def __init__(self, responder: Responder | None = None, *, api_key: str = "test-key") -> None:
        self.responder: Responder = responder or (lambda _: [Say("OK.")])
        self.api_key = api_key
        self.latency_s = 0.0  # before the first byte of every answer
        self.requests: list[RecordedRequest] = []
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = asyncio.Event()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not running; use 'async with'")
        return self._port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._closing.set()  # releases hanging answers
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        recorded = RecordedRequest(request.path, dict(request.headers), body)
        self.requests.append(recorded)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        try:
            self._check_headers(request)
            try:
                recorded.json = json.loads(body)
            except ValueError as e:
                raise _Refused(400, f"Invalid JSON body: {e}") from e
            if not isinstance(recorded.json, dict):
                raise _Refused(400, "The request body must be a JSON object.")
            recorded.neutral = self._read(recorded.json)
        except _Refused as refusal:
            recorded.status = refusal.status
            return self._error_response(refusal.status, refusal.message)
        script = await self._script(recorded.neutral)
        recorded.status = 200
        if recorded.json.get("stream"):
            return await self._play_stream(request, recorded, script)
        return await self._play_whole(recorded, script)

    async def _script(self, neutral: LLMRequest) -> list[Step]:
        answer = self.responder(neutral)
        if inspect.isawaitable(answer):
            answer = await answer
        if isinstance(answer, str):
            return [Say(answer)]
        if isinstance(answer, Say | Call | End | Slow | Hang | Fail):
            return [answer]
        return list(answer)

    async def _play_stream(
        self, request: web.Request, recorded: RecordedRequest, script: list[Step]
    ) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        stream = self._new_stream(recorded)
        try:
            for step in script:
                if isinstance(step, Fail) and response is None:
                    recorded.status = step.status
                    return self._error_response(step.status, step.message)
                if isinstance(step, Hang) and not step.headers and response is None:
                    await self._closing.wait()
                    return web.Response(status=503)
                if response is None:
                    response = web.StreamResponse(
                        headers={
                            "Content-Type": "text/event-stream; charset=utf-8",
                            "Cache-Control": "no-cache",
                        }
                    )
                    await response.prepare(request)
                    await self._send(response, stream.opening(), recorded)
                if isinstance(step, Fail):
                    await self._send(response, stream.error(step), recorded)
                    await response.write_eof()
                    return response
                if isinstance(step, Hang):
                    await self._closing.wait()
                    return response
                if isinstance(step, Slow):
                    await asyncio.sleep(step.seconds)
                else:
                    await self._send(response, stream.step(step), recorded)
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
                await response.prepare(request)
                await self._send(response, stream.opening(), recorded)
            await self._send(response, stream.closing(), recorded)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away (e.g. timed out); nothing to answer
        return response if response is not None else web.Response(status=499)

    async def _play_whole(self, recorded: RecordedRequest, script: list[Step]) -> web.Response:
        stream = self._new_stream(recorded)
        for step in script:
            if isinstance(step, Fail):
                recorded.status = step.status
                return self._error_response(step.status, step.message)
            if isinstance(step, Hang):
                await self._closing.wait()
                return web.Response(status=503)
            if isinstance(step, Slow):
                await asyncio.sleep(step.seconds)
            else:
                for _ in stream.step(step):
                    pass
        return web.json_response(stream.whole())

    @staticmethod
    async def _send(response: web.StreamResponse, events: Iterator[bytes], recorded: RecordedRequest) -> None:
        for event in events:
            recorded.sent.append(event)
            await response.write(event)

    # --- what each vendor provides ---------------------------------------------------------

    def _check_headers(self, request: web.Request) -> None:
        raise NotImplementedError

    def _read(self, body: dict[str, Any]) -> LLMRequest:
        raise NotImplementedError

    def _new_stream(self, recorded: RecordedRequest) -> _Stream:
        raise NotImplementedError

    def _error_response(self, status: int, message: str) -> web.Response:
        raise NotImplementedError


class _Stream:
    """One answer being composed: vendors turn steps into SSE events and keep the whole reply."""

    def __init__(self, recorded: RecordedRequest) -> None:
        self.model = str(recorded.json.get("model", ""))
        self.input_tokens = max(1, len(recorded.body) // 4)
        self.output_tokens = 0
        self.text: list[str] = []
        self.calls: list[tuple[str, Call]] = []  # (id, call)
        self.reason: str | None = None  # neutral, from End

    def neutral_stop(self) -> str:
        return self.reason or ("tool_calls" if self.calls else "end")

    def step(self, step: Step) -> Iterator[bytes]:
        if isinstance(step, Say):
            self.output_tokens += len(_words(step.text))
            self.text.append(step.text)
            return self.say(step.text)
        if isinstance(step, Call):
            self.output_tokens += 1 + len(step.argument_text()) // 4
            call_id = step.id or self.new_call_id()
            self.calls.append((call_id, step))
            return self.call(call_id, step, len(self.calls) - 1)
        if isinstance(step, End):
            self.reason = step.reason
            return iter(())
        raise TypeError(f"not a content step: {step!r}")

    def new_call_id(self) -> str:
        raise NotImplementedError

    def opening(self) -> Iterator[bytes]:
        raise NotImplementedError

    def say(self, text: str) -> Iterator[bytes]:
        raise NotImplementedError

    def call(self, call_id: str, call: Call, position: int) -> Iterator[bytes]:
        raise NotImplementedError

    def error(self, fail: Fail) -> Iterator[bytes]:
        raise NotImplementedError

    def closing(self) -> Iterator[bytes]:
        raise NotImplementedError

    def whole(self) -> dict[str, Any]:
        raise NotImplementedError


# --- OpenAI -----------------------------------------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model does not exist or you do not have access to it.",
    ),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_OPENAI_STOP = {"end": "stop", "tool_calls": "tool_calls", "length": "length"}


def _openai_error(status: int, message: str) -> dict[str, Any]:
    kind, code, default = _OPENAI_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error.")
    )
    return {"error": {"message": message or default, "type": kind, "param": None, "code": code}}


class FakeOpenAI(_FakeLLMServer):
    """``POST /v1/chat/completions`` like OpenAI (or, with ``style="ollama"``, like Ollama's ``/v1``).

    The Ollama style sends each tool call whole in one delta and finishes with ``"stop"`` even
    after tool calls, as Ollama and llama.cpp servers may.

    Attributes:
        base_url: ``http://127.0.0.1:PORT/v1``, the SDK's ``base_url``.
        requests: every request, in order, including refused ones.
    """

    path = "/v1/chat/completions"

    def __init__(
        self, responder: Responder | None = None, *, api_key: str = "test-key", style: str = "openai"
    ) -> None:
        super().__init__(responder, api_key=api_key)
        if style not in ("openai", "ollama"):
            raise ValueError(f"unknown style {style!r}")
        self.style = style

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _check_headers(self, request: web.Request) -> None:
        if not secrets.compare_digest(request.headers.get("Authorization", ""), f"Bearer {self.api_key}"):
            raise _Refused(
                401, "Incorrect API key provided. You can find your API key in your account settings."
            )

    def _error_response(self, status: int, message: str) -> web.Response:
        return web.json_response(_openai_error(status, message), status=status)

    def _new_stream(self, recorded: RecordedRequest) -> _Stream:
        return _OpenAIStream(recorded, self.style)

    def _read(self, body: dict[str, Any]) -> LLMRequest:
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _Refused(400, "you must provide a model parameter")
        raw_messages = body.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise _Refused(400, "Invalid 'messages': empty array. Expected an array with minimum length 1.")
        tools = body.get("tools")
        if tools is not None and (not isinstance(tools, list) or not tools):
            raise _Refused(400, "Invalid 'tools': empty array. Expected an array with minimum length 1.")
        tool_names = []
        for tool in tools or ():
            if tool.get("type") != "function" or not tool.get("function", {}).get("name"):
                raise _Refused(400, "Missing required parameter: 'tools[0].function.name'.")
            tool_names.append(tool["function"]["name"])
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        open_calls: dict[str, str] = {}  # tool call id -> name, awaiting a tool message
        for i, message in enumerate(raw_messages):
            role = message.get("role")
            if open_calls and role != "tool":
                raise _Refused(
                    400,
                    "An assistant message with 'tool_calls' must be followed by tool messages responding to "
                    f"each 'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(open_calls)}",
                )
            if role in ("system", "developer"):
                system.append(_text_of(message.get("content")))
            elif role == "user":
                messages.append({"role": "user", "content": _text_of(message.get("content"))})
            elif role == "assistant":
                converted: dict[str, Any] = {"role": "assistant", "content": _text_of(message.get("content"))}
                calls = []
                for call in message.get("tool_calls") or ():
                    arguments = call.get("function", {}).get("arguments")
                    if not isinstance(arguments, str):
                        raise _Refused(
                            400,
                            f"Invalid type for 'messages[{i}].tool_calls[0].function.arguments': expected a string.",
                        )
                    calls.append(
                        ToolCall(call["id"], call["function"]["name"], parse_arguments(arguments), arguments)
                    )
                    open_calls[call["id"]] = call["function"]["name"]
                if calls:
                    converted["tool_calls"] = calls
                messages.append(converted)
            elif role == "tool":
                call_id = message.get("tool_call_id")
                if call_id not in open_calls:
                    raise _Refused(
                        400,
                        "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'.",
                    )
                name = open_calls.pop(call_id)
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call_id,
                        "name": name,
                        "content": _text_of(message.get("content")),
                    }
                )
            else:
                raise _Refused(
                    400,
                    f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', 'tool'.",
                )
        return LLMRequest("\n".join(system), messages, tool_names, body["model"], bool(body.get("stream")))


class _OpenAIStream(_Stream):
    def __init__(self, recorded: RecordedRequest, style: str) -> None:
        super().__init__(recorded)
        self.style = style
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        options = recorded.json.get("stream_options") or {}
        self.include_usage = bool(options.get("include_usage"))

    def new_call_id(self) -> str:
        return (
            ("call_" + secrets.token_hex(4))
            if self.style == "ollama"
            else ("call_" + secrets.token_urlsafe(18))
        )

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama" if self.style == "ollama" else "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n".encode()

    def opening(self) -> Iterator[bytes]:
        yield self.chunk({"role": "assistant", "content": ""})

    def say(self, text: str) -> Iterator[bytes]:
        for word in _words(text):
            yield self.chunk({"content": word})

    def call(self, call_id: str, call: Call, position: int) -> Iterator[bytes]:
        arguments = call.argument_text()
        head: dict[str, Any] = {
            "index": position,
            "id": call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        if self.style == "ollama":  # whole, in one delta
            head["function"]["arguments"] = arguments
            yield self.chunk({"role": "assistant", "content": "", "tool_calls": [head]})
            return
        yield self.chunk({"tool_calls": [head]})
        for piece in _pieces(arguments):
            yield self.chunk({"tool_calls": [{"index": position, "function": {"arguments": piece}}]})

    def finish_reason(self) -> str:
        stop = self.neutral_stop()
        if self.style == "ollama" and stop == "tool_calls":
            return "stop"
        return _OPENAI_STOP.get(stop, stop)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def error(self, fail: Fail) -> Iterator[bytes]:
        yield f"data: {json.dumps(_openai_error(fail.status, fail.message))}\n\n".encode()

    def closing(self) -> Iterator[bytes]:
        yield self.chunk({}, self.finish_reason())
        if self.include_usage:
            payload = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage(),
            }
            yield f"data: {json.dumps(payload)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def whole(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.text) or None,
            "refusal": None,
        }
        if self.calls:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.argument_text()},
                }
                for call_id, call in self.calls
            ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason()}
            ],
            "usage": self.usage(),
        }


# --- Anthropic --------------------------------------------------------------------------------

_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}
_ANTHROPIC_STOP = {"end": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}


def _anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind, default = _ANTHROPIC_ERRORS.get(
        status, ("api_error" if status >= 500 else "invalid_request_error", "Error.")
    )
    return {
        "type": "error",
        "error": {"type": kind, "message": message or default},
        "request_id": "req_" + secrets.token_hex(12),
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class FakeAnthropic(_FakeLLMServer):
    """``POST /v1/messages`` like Anthropic's Messages API.

    Attributes:
        base_url: ``http://127.0.0.1:PORT``, the SDK's ``base_url``.
        requests: every request, in order, including refused ones.
    """

    path = "/v1/messages"
    _version = ""  # the anthropic-version of the request being read

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _check_headers(self, request: web.Request) -> None:
        # SDK 2.x sends the key as a bearer token; older clients as x-api-key, which wins when both come.
        key = request.headers.get("x-api-key")
        if key is None:
            scheme, _, key = request.headers.get("Authorization", "").partition(" ")
            key = key if scheme.lower() == "bearer" else ""
        if not secrets.compare_digest(key, self.api_key):
            raise _Refused(401, "invalid x-api-key")
        version = request.headers.get("anthropic-version")
        if not version:
            raise _Refused(400, "anthropic-version: header is required")
        self._version = version

    def _error_response(self, status: int, message: str) -> web.Response:
        return web.json_response(_anthropic_error(status, message), status=status)

    def _new_stream(self, recorded: RecordedRequest) -> _Stream:
        return _AnthropicStream(recorded)

    def _read(self, body: dict[str, Any]) -> LLMRequest:
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _Refused(400, "model: Field required")
        if not isinstance(body.get("max_tokens"), int):
            raise _Refused(400, "max_tokens: Field required")
        if self._version >= "2026-10-21":  # this API version removed the sampling parameters
            for key in ("temperature", "top_p", "top_k"):
                if key in body:
                    raise _Refused(400, f"{key}: Extra inputs are not permitted")
        raw_messages = body.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise _Refused(400, "messages: at least one message is required")
        tool_names = []
        for tool in body.get("tools") or ():
            if not tool.get("name") or not isinstance(tool.get("input_schema"), dict):
                raise _Refused(400, "tools.0.input_schema: Field required")
            tool_names.append(tool["name"])
        messages: list[dict[str, Any]] = []
        open_calls: dict[str, str] = {}  # tool_use id -> name, awaiting a tool_result in the next turn
        uses_tools = False
        for i, message in enumerate(raw_messages):
            role = message.get("role")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise _Refused(
                    400,
                    f'messages.{i}: roles must alternate between "user" and "assistant", starting with "user"',
                )
            content = message.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list) or not blocks:
                raise _Refused(400, f"messages.{i}: all messages must have non-empty content")
            if role == "user":
                answered = self._read_user(i, blocks, open_calls, messages)
                uses_tools = uses_tools or answered
                if open_calls:
                    raise _Refused(
                        400,
                        f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {', '.join(open_calls)}",
                    )
            else:
                text, calls = [], []
                for block in blocks:
                    if block.get("type") == "text":
                        if not block.get("text"):
                            raise _Refused(400, f"messages.{i}: text content blocks must be non-empty")
                        text.append(block["text"])
                    elif block.get("type") == "tool_use":
                        uses_tools = True
                        calls.append(
                            ToolCall(
                                block["id"],
                                block["name"],
                                dict(block.get("input") or {}),
                                json.dumps(block.get("input")),
                            )
                        )
                        open_calls[block["id"]] = block["name"]
                converted: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
                if calls:
                    converted["tool_calls"] = calls
                messages.append(converted)
        if uses_tools and not tool_names:
            raise _Refused(
                400, "Requests which include `tool_use` or `tool_result` blocks must define tools."
            )
        system = body.get("system", "")
        return LLMRequest(_text_of(system), messages, tool_names, body["model"], bool(body.get("stream")))

    @staticmethod
    def _read_user(
        i: int, blocks: list[Any], open_calls: dict[str, str], messages: list[dict[str, Any]]
    ) -> bool:
        text: list[str] = []
        answered = False
        for j, block in enumerate(blocks):
            if block.get("type") == "tool_result":
                if text:
                    raise _Refused(
                        400,
                        f"messages.{i}.content.{j}: tool_result blocks must come before any other content",
                    )
                call_id = block.get("tool_use_id")
                if call_id not in open_calls:
                    raise _Refused(
                        400,
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {call_id}. "
                        "Each `tool_result` block must have a corresponding `tool_use` block in the previous message.",
                    )
                result: dict[str, Any] = {
                    "role": "tool",
                    "tool_call_id": call_id,
                    "name": open_calls.pop(call_id),
                    "content": _text_of(block.get("content", "")),
                }
                if block.get("is_error"):
                    result["is_error"] = True
                messages.append(result)
                answered = True
            elif block.get("type") == "text":
                if not block.get("text"):
                    raise _Refused(400, f"messages.{i}: text content blocks must be non-empty")
                text.append(block["text"])
        if text:
            messages.append({"role": "user", "content": "\n".join(text)})
        return answered


class _AnthropicStream(_Stream):
    def __init__(self, recorded: RecordedRequest) -> None:
        super().__init__(recorded)
        self.id = "msg_01" + secrets.token_hex(11)
        self.blocks = 0

    def new_call_id(self) -> str:
        return "toolu_01" + secrets.token_hex(11)

    def opening(self) -> Iterator[bytes]:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 1},
        }
        yield _sse("message_start", {"type": "message_start", "message": message})
        yield _sse("ping", {"type": "ping"})

    def _block(self, start: dict[str, Any], deltas: list[dict[str, Any]]) -> Iterator[bytes]:
        index, self.blocks = self.blocks, self.blocks + 1
        yield _sse(
            "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
        )
        for delta in deltas:
            yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})

    def say(self, text: str) -> Iterator[bytes]:
        return self._block(
            {"type": "text", "text": ""}, [{"type": "text_delta", "text": w} for w in _words(text)]
        )

    def call(self, call_id: str, call: Call, position: int) -> Iterator[bytes]:
        start = {"type": "tool_use", "id": call_id, "name": call.name, "input": {}}
        pieces = _pieces(call.argument_text())
        return self._block(start, [{"type": "input_json_delta", "partial_json": p} for p in pieces])

    def error(self, fail: Fail) -> Iterator[bytes]:
        yield _sse("error", _anthropic_error(fail.status, fail.message))

    def closing(self) -> Iterator[bytes]:
        stop = self.neutral_stop()
        delta = {"stop_reason": _ANTHROPIC_STOP.get(stop, stop), "stop_sequence": None}
        yield _sse(
            "message_delta",
            {"type": "message_delta", "delta": delta, "usage": {"output_tokens": self.output_tokens}},
        )
        yield _sse("message_stop", {"type": "message_stop"})

    def whole(self) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": text} for text in self.text]
        content += [
            {
                "type": "tool_use",
                "id": call_id,
                "name": call.name,
                "input": parse_arguments(call.argument_text()),
            }
            for call_id, call in self.calls
        ]
        stop = self.neutral_stop()
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "content": content,
            "model": self.model,
            "stop_reason": _ANTHROPIC_STOP.get(stop, stop),
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
        }
