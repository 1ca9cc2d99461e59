"""Fake speech providers on 127.0.0.1 in the wire format of the real services, so pipecat's own
service classes (and the vendors' SDKs) can be pointed at them. Text to speech, with real audio
(espeak-ng):

* :class:`FakeOpenAITTS`: OpenAI's ``POST /v1/audio/speech`` (``Authorization: Bearer KEY``, a
  JSON body with ``model``, ``voice``, ``input``, ``response_format``), answered with raw 24 kHz
  16-bit PCM streamed in chunks (``response_format: pcm``) or OpenAI's error JSON;
* :class:`FakeCartesiaTTS`: Cartesia's TTS WebSocket (``/tts/websocket``, ``X-API-Key`` and
  ``Cartesia-Version`` on the upgrade). A text message with a ``transcript`` and a
  ``context_id`` is answered with ``chunk`` messages (base64 PCM at the requested rate) and a
  ``timestamps`` message; a message with ``continue: false`` ends the context with ``done``
  once its audio is sent; ``{"context_id": ..., "cancel": true}`` stops a context.

Speech to text:

* :class:`FakeOpenAITranscriptions`: OpenAI's ``POST /v1/audio/transcriptions`` (a multipart form
  with ``file``, ``model``, optional ``language``/``prompt``/``response_format``), answered with
  ``{"text": ...}``. It cannot recognise words: transcripts come from a script, one per request
  (``""`` once used up), and every uploaded WAV is described in ``uploads``.

The TTS fakes pace their audio like a provider that synthesizes while it streams: ``chunk_ms`` of
audio per chunk, ``chunk_delay_s`` between chunks. ``hold_after_first`` (an
:class:`asyncio.Event`) makes them send a sentence's first chunk (or its first ``hold_after_ms``
of audio) and wait for the event before the rest, so a test can check that the first audio
reached the caller before the sentence was finished. ``fail_with`` makes the
next requests fail as the provider would (OpenAI: an HTTP status; Cartesia: an ``error`` message).

Usage::

    async with FakeOpenAITTS("sk-test") as fake:
        service = OpenAITTSService(api_key="sk-test", base_url=fake.base_url)
        ...
        assert fake.requests[0]["input"] == "Hello."
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.fakes.loopback import LoopbackFake, LoopbackHTTP
from voice.audio import resample, wav_to_pcm16

OPENAI_RATE = 24000
CARTESIA_VERSION = "2026-03-01"


async def spoken_pcm(text: str, rate: int) -> bytes:
    """``text`` spoken by espeak-ng, as 16-bit little-endian mono PCM at ``rate``."""
    process = await asyncio.create_subprocess_exec(
        "espeak-ng",
        "-v",
        "en-us",
        "-s",
        "175",
        "--stdout",
        text,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    wav, _ = await process.communicate()
    pcm, source_rate = wav_to_pcm16(wav)
    return resample(pcm, source_rate, rate).astype("<i2").tobytes()


class _Pacing:
    """How a fake streams a sentence: chunk size, delay between chunks, an optional hold."""

    def __init__(self) -> None:
        self.chunk_ms = 40
        self.chunk_delay_s = 0.005
        self.hold_after_first: asyncio.Event | None = None
        self.hold_after_ms = 0  # how much audio counts as "first" for the hold (at least one chunk)
        self.sentences_finished = 0

    async def chunks(self, pcm: bytes, rate: int) -> Any:
        size = rate * 2 * self.chunk_ms // 1000
        held = False
        for offset in range(0, len(pcm), size):
            if offset:
                first_done = offset >= rate * 2 * self.hold_after_ms // 1000
                if self.hold_after_first is not None and not held and first_done:
                    held = True
                    await self.hold_after_first.wait()
                else:
                    await asyncio.sleep(self.chunk_delay_s)
            yield pcm[offset : offset + size]
        self.sentences_finished += 1


class _OpenAIEndpoint(LoopbackHTTP):
    """What OpenAI's audio endpoints share: ``/v1`` under the base URL, the key, forced failures."""

    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key
        self.fail_with: int | None = None

    @property
    def base_url(self) -> str:
        """What to give the OpenAI client (it appends ``/audio/...``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def refusal(self, request: web.Request) -> web.Response | None:
        """OpenAI's 401 (quoting the key as OpenAI does: masked but for its ends) for a wrong key,
        the forced failure if one is set, else None."""
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or key != self.api_key:
            shown = f"{key[:3]}{'*' * max(0, len(key) - 7)}{key[-4:]}" if len(key) > 7 else key
            return _openai_error(401, f"Incorrect API key provided: {shown}.", "invalid_api_key")
        if self.fail_with is not None:
            return _openai_error(
                self.fail_with, "The server had an error while processing your request.", None
            )
        return None


class FakeOpenAITTS(_Pacing, _OpenAIEndpoint):
    """A fake of OpenAI's speech endpoint; see the module docstring.

    Attributes:
        requests: JSON bodies of accepted requests, in order.
        headers: headers of every request, in order.
        fail_with: answer every request with this HTTP status and OpenAI's error JSON.
    """

    def __init__(self, api_key: str) -> None:
        _Pacing.__init__(self)
        _OpenAIEndpoint.__init__(self, api_key)
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/audio/speech", self._speech)

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        if refused := self.refusal(request):
            return refused
        try:
            body = await request.json()
        except ValueError:
            return _openai_error(400, "We could not parse the JSON body of your request.", None)
        if not isinstance(body, dict) or not body.get("input") or not body.get("model"):
            return _openai_error(400, "'input' and 'model' are required properties.", None)
        if body.get("response_format", "mp3") != "pcm":
            return _openai_error(400, "This fake streams response_format 'pcm' only.", None)
        self.requests.append(body)
        pcm = await spoken_pcm(str(body["input"]), OPENAI_RATE)
        response = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        response.enable_chunked_encoding()
        # One request per connection: pipecat's OpenAI service never closes its HTTP client, so
        # a kept-alive socket would outlive the service (and warn when it is collected).
        response.force_close()
        await response.prepare(request)
        async for chunk in self.chunks(pcm, OPENAI_RATE):
            await response.write(chunk)
        await response.write_eof()
        return response


def _openai_error(status: int, message: str, code: str | None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    response = web.json_response(body, status=status)
    response.force_close()
    return response


@dataclass(frozen=True)
class Upload:
    """One transcription request: its form fields and the audio it carried."""

    fields: dict[str, str]
    rate: int
    seconds: float


class FakeOpenAITranscriptions(_OpenAIEndpoint):
    """A fake of OpenAI's transcriptions endpoint; see the module docstring.

    Attributes:
        uploads: accepted requests, in order.
        fail_with: answer every request with this HTTP status and OpenAI's error JSON.
    """

    def __init__(self, api_key: str, script: Sequence[str] = ()) -> None:
        super().__init__(api_key)
        self.script: deque[str] = deque(script)
        self.uploads: list[Upload] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/audio/transcriptions", self._transcribe)

    async def _transcribe(self, request: web.Request) -> web.Response:
        if refused := self.refusal(request):
            return refused
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField) or "model" not in form:
            return _openai_error(400, "'file' and 'model' are required.", None)
        try:
            pcm, rate = wav_to_pcm16(upload.file.read())
        except ValueError:
            return _openai_error(400, "The audio file could not be decoded.", None)
        fields = {k: str(v) for k, v in form.items() if k != "file"}
        self.uploads.append(Upload(fields, rate, pcm.size / rate))
        text = self.script.popleft() if self.script else ""
        body: dict[str, Any] = {"text": text}
        if fields.get("response_format") == "verbose_json":
            body |= {"task": "transcribe", "language": "english", "duration": pcm.size / rate, "segments": []}
        response = web.json_response(body)
        response.force_close()  # as for speech: no kept-alive socket outlives the client
        return response


@dataclass
class CartesiaConnection:
    """What one client did on one Cartesia socket.

    Attributes:
        headers: upgrade request headers.
        messages: every JSON message received, in order.
        contexts_done: context ids answered with ``done``, in order.
        cancelled: context ids the client cancelled.
    """

    headers: dict[str, str]
    messages: list[dict[str, Any]] = field(default_factory=list)
    contexts_done: list[str] = field(default_factory=list)
    cancelled: set[str] = field(default_factory=set)


class FakeCartesiaTTS(_Pacing, LoopbackFake):
    """A fake of Cartesia's TTS WebSocket; see the module docstring.

    Attributes:
        connections: one record per accepted socket.
        rejected: statuses of refused upgrades.
        fail_with: answer every transcript with an ``error`` message carrying this text.
    """

    def __init__(self, api_key: str) -> None:
        super().__init__()
        self.api_key = api_key
        self.connections: list[CartesiaConnection] = []
        self.rejected: list[int] = []
        self.fail_with: str | None = None
        self._server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/tts/websocket"

    @property
    def transcripts(self) -> list[str]:
        return [m["transcript"] for c in self.connections for m in c.messages if m.get("transcript")]

    async def start(self) -> None:
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._check_upgrade)
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _check_upgrade(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != "/tts/websocket":
            return self._refuse(HTTPStatus.NOT_FOUND, "Not found")
        if request.headers.get("X-API-Key") != self.api_key:
            return self._refuse(HTTPStatus.UNAUTHORIZED, "Invalid API key")
        if not request.headers.get("Cartesia-Version"):
            return self._refuse(HTTPStatus.BAD_REQUEST, "Cartesia-Version header is required")
        return None

    def _refuse(self, status: HTTPStatus, message: str) -> Response:
        self.rejected.append(int(status))
        body = json.dumps({"error": message}).encode()
        headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return Response(int(status), status.phrase, headers, body)

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        record = CartesiaConnection(headers=dict(ws.request.headers.raw_items()))
        self.connections.append(record)
        work: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        speaker = asyncio.create_task(self._speak(ws, record, work), name="fake-cartesia-speak")
        try:
            async for message in ws:
                try:
                    msg = json.loads(message)
                except ValueError:
                    await ws.send(
                        json.dumps({"type": "error", "status_code": 400, "done": True, "error": "bad JSON"})
                    )
                    continue
                record.messages.append(msg)
                if msg.get("cancel"):
                    record.cancelled.add(str(msg.get("context_id")))
                else:
                    work.put_nowait(msg)
        except ConnectionClosed:
            pass
        finally:
            work.put_nowait(None)
            speaker.cancel()
            await asyncio.gather(speaker, return_exceptions=True)

    async def _speak(
        self, ws: ServerConnection, record: CartesiaConnection, work: asyncio.Queue[dict[str, Any] | None]
    ) -> None:
        while (msg := await work.get()) is not None:
            context = str(msg.get("context_id", ""))
            if context in record.cancelled:
                continue
            text = str(msg.get("transcript", ""))
            if text.strip():
                if self.fail_with is not None:
                    await ws.send(
                        json.dumps(
                            {
                                "type": "error",
                                "context_id": context,
                                "status_code": 500,
                                "done": True,
                                "error": self.fail_with,
                            }
                        )
                    )
                    continue
                rate = int(msg.get("output_format", {}).get("sample_rate") or 24000)
                pcm = await spoken_pcm(text, rate)
                await ws.send(json.dumps(_timestamps(context, text, len(pcm) / 2 / rate)))
                async for chunk in self.chunks(pcm, rate):
                    if context in record.cancelled:
                        break
                    await ws.send(
                        json.dumps(
                            {
                                "type": "chunk",
                                "context_id": context,
                                "status_code": 206,
                                "done": False,
                                "data": base64.b64encode(chunk).decode(),
                                "step_time": 12.5,
                            }
                        )
                    )
            if msg.get("continue") is False and context not in record.cancelled:
                record.contexts_done.append(context)
                await ws.send(
                    json.dumps({"type": "done", "context_id": context, "status_code": 200, "done": True})
                )


def _timestamps(context: str, text: str, seconds: float) -> dict[str, Any]:
    words = text.split()
    step = seconds / max(1, len(words))
    return {
        "type": "timestamps",
        "context_id": context,
        "status_code": 206,
        "done": False,
        "word_timestamps": {
            "words": words,
            "start": [round(i * step, 3) for i in range(len(words))],
            "end": [round((i + 1) * step, 3) for i in range(len(words))],
        },
    }
