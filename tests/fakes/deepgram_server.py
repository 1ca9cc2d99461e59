"""A fake of Deepgram's live transcription WebSocket (``/v1/listen``) on 127.0.0.1.

It speaks the wire protocol the real service speaks, so the real ``deepgram-sdk`` client can be
pointed at it:

* the upgrade must carry ``Authorization: Token KEY`` (or ``Bearer``); otherwise it is refused
  with HTTP 401 and a JSON body, like Deepgram does;
* query parameters (``model``, ``encoding``, ``sample_rate``, ``endpointing``...) are recorded;
  ``encoding`` without ``sample_rate`` is refused with HTTP 400;
* binary frames are audio; text frames are control messages: ``KeepAlive`` (resets the idle
  timer, no answer), ``Finalize`` (flushes: a final ``Results`` with ``from_finalize: true``),
  ``CloseStream`` (flushes, sends ``Metadata`` and closes with 1000);
* with no audio and no text message for ``idle_timeout_s`` the socket is closed with 1011
  ``NET-0001``, as Deepgram does after 10 s.

It cannot recognise words, so transcripts come from a script: the list of texts given to the
constructor, one per *speech segment*. The fake decodes the audio and measures its energy per
20 ms: a segment opens at the first loud frame and closes on a ``Finalize`` or after
``endpointing`` ms of quiet (the query parameter). When it has lasted ``interim_after_ms`` of
speech an interim ``Results`` (``is_final: false``) carries the first half of the text; at the
close the final ``Results`` carries all of it, with per-word timings spread over the speech.

Usage::

    async with FakeDeepgram("key", ["what is my balance"]) as fake:
        ... connect to fake.url ...
        assert fake.connections[0].params["encoding"] == "mulaw"
    await fake.kill()  # drops every connection abruptly and stops listening
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from voice.audio import ulaw_to_pcm16

FRAME_MS = 20
MODEL_INFO = {"name": "general-nova-3", "version": "2025-04-17.21547", "arch": "nova-3"}
MODEL_UUID = "40bd3654-e622-47c4-a111-63a61b23bfe8"


@dataclass
class FakeConnection:
    """What one client did on one socket.

    Attributes:
        params: query parameters of the upgrade (last value of each).
        query: every query parameter of the upgrade in order (a repeated one, e.g. ``redact``, each time).
        headers: upgrade request headers.
        audio_bytes: binary bytes received.
        controls: ``type`` of every text message received, in order.
        sent: every JSON message the fake sent, in order.
        closed_by: ``"client"``, ``"close_stream"``, ``"idle"``, ``"killed"`` or ``""`` while open.
    """

    params: dict[str, str]
    headers: dict[str, str]
    request_id: str
    audio_bytes: int = 0
    controls: list[str] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    closed_by: str = ""
    query: list[tuple[str, str]] = field(default_factory=list)

    @property
    def results(self) -> list[dict[str, Any]]:
        return [m for m in self.sent if m.get("type") == "Results"]

    @property
    def final_transcripts(self) -> list[str]:
        return [m["channel"]["alternatives"][0]["transcript"] for m in self.results if m["is_final"]]


@dataclass
class _Segment:
    start: float  # stream seconds of the first loud frame
    text: str
    speech_ms: float = 0.0
    last_loud_end: float = 0.0
    interim_sent: bool = False


class _Stream:
    """Transcription state of one socket: audio clock, speech segments, results."""

    def __init__(self, fake: FakeDeepgram, record: FakeConnection, ws: ServerConnection) -> None:
        self._fake = fake
        self.record = record
        self._ws = ws
        params = record.params
        self._encoding = params.get("encoding", "linear16")
        self._rate = int(params.get("sample_rate", "16000"))
        self._bytes_per_frame = self._rate * FRAME_MS // 1000 * (1 if self._encoding == "mulaw" else 2)
        endpointing = params.get("endpointing", "10")
        self._endpointing_ms = None if endpointing == "false" else float(endpointing)
        self._interim = params.get("interim_results", "false") == "true"
        self._pending = b""
        self._frames = 0
        self._cursor = 0.0  # end of the last final result, stream seconds
        self._segment: _Segment | None = None
        self._quiet_ms = 0.0

    @property
    def now(self) -> float:
        return self._frames * FRAME_MS / 1000

    async def audio(self, data: bytes) -> None:
        self.record.audio_bytes += len(data)
        data = self._pending + data
        size = self._bytes_per_frame
        whole = len(data) - len(data) % size
        self._pending = data[whole:]
        for offset in range(0, whole, size):
            await self._frame(data[offset : offset + size])

    async def _frame(self, frame: bytes) -> None:
        if self._encoding == "mulaw":
            pcm = ulaw_to_pcm16(frame)
        else:
            pcm = np.frombuffer(frame, dtype="<i2")
        loud = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) >= self._fake.speech_rms
        start = self.now
        self._frames += 1
        segment = self._segment
        if loud:
            self._quiet_ms = 0.0
            if segment is None:
                segment = self._segment = _Segment(start=start, text=self._fake.next_text())
            segment.speech_ms += FRAME_MS
            segment.last_loud_end = self.now
            if (
                self._interim
                and not segment.interim_sent
                and segment.speech_ms >= self._fake.interim_after_ms
            ):
                segment.interim_sent = True
                words = segment.text.split()
                await self._results(
                    " ".join(words[: math.ceil(len(words) / 2)]), segment, is_final=False, speech_final=False
                )
        elif segment is not None:
            self._quiet_ms += FRAME_MS
            if self._endpointing_ms is not None and self._quiet_ms >= max(self._endpointing_ms, FRAME_MS):
                await self._close_segment(speech_final=True, from_finalize=False)

    async def finalize(self) -> None:
        if self._segment is not None:
            await self._close_segment(speech_final=False, from_finalize=True)
        else:
            # Everything heard was already final: an empty final marks the flush as done.
            await self._results("", None, is_final=True, speech_final=False, from_finalize=True)
            self._cursor = self.now

    async def close_stream(self) -> None:
        if self._segment is not None:
            await self._close_segment(speech_final=True, from_finalize=False)
        await self._send(
            {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": self.record.request_id,
                "sha256": hashlib.sha256(str(self.record.audio_bytes).encode()).hexdigest(),
                "created": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "duration": round(self.now, 3),
                "channels": 1,
            }
        )

    async def _close_segment(self, *, speech_final: bool, from_finalize: bool) -> None:
        segment, self._segment = self._segment, None
        assert segment is not None
        await self._results(
            segment.text, segment, is_final=True, speech_final=speech_final, from_finalize=from_finalize
        )
        self._cursor = self.now
        self._quiet_ms = 0.0

    async def _results(
        self,
        text: str,
        segment: _Segment | None,
        *,
        is_final: bool,
        speech_final: bool,
        from_finalize: bool = False,
    ) -> None:
        now = self.now
        words: list[dict[str, Any]] = []
        tokens = text.split()
        if tokens and segment is not None:
            begin, end = segment.start, max(segment.last_loud_end, segment.start + 0.02 * len(tokens))
            step = (end - begin) / len(tokens)
            for i, token in enumerate(tokens):
                words.append(
                    {
                        "word": token.strip(".,!?;:").lower(),
                        "start": round(begin + i * step, 3),
                        "end": round(begin + (i + 1) * step, 3),
                        "confidence": 0.98,
                        "punctuated_word": token,
                    }
                )
        message: dict[str, Any] = {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(now - self._cursor, 3),
            "start": round(self._cursor, 3),
            "is_final": is_final,
            "speech_final": speech_final,
            "channel": {
                "alternatives": [{"transcript": text, "confidence": 0.98 if text else 0.0, "words": words}]
            },
            "metadata": {
                "request_id": self.record.request_id,
                "model_info": MODEL_INFO,
                "model_uuid": MODEL_UUID,
            },
            "from_finalize": from_finalize,
        }
        await self._send(message)

    async def _send(self, message: dict[str, Any]) -> None:
        self.record.sent.append(message)
        await self._ws.send(json.dumps(message))


class FakeDeepgram:
    """A fake Deepgram live server; see the module docstring.

    Args:
        api_key: the only key accepted.
        script: transcript texts, one per speech segment, in order; ``""`` once used up.
        speech_rms: int16 RMS of a 20 ms frame from which it counts as speech.
        interim_after_ms: speech in a segment before its interim result.
        idle_timeout_s: close a socket that received nothing for this long (Deepgram: 10 s).
        answer_finalize: False ignores ``Finalize`` messages (to test a client's timeout).
        finalize_delay_s: think this long before answering a ``Finalize`` (later messages wait).
        port: port to listen on (0: any free one); a killed fake's port can be served again.
    """

    def __init__(
        self,
        api_key: str,
        script: Sequence[str] = (),
        *,
        speech_rms: float = 500.0,
        interim_after_ms: float = 300.0,
        idle_timeout_s: float = 10.0,
        answer_finalize: bool = True,
        finalize_delay_s: float = 0.0,
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.script: deque[str] = deque(script)
        self.speech_rms = speech_rms
        self.interim_after_ms = interim_after_ms
        self.idle_timeout_s = idle_timeout_s
        self.answer_finalize = answer_finalize
        self.finalize_delay_s = finalize_delay_s
        self.connections: list[FakeConnection] = []
        self.rejected: list[tuple[int, dict[str, str]]] = []  # (status, headers) of refused upgrades
        self._server: Server | None = None
        self._live: set[ServerConnection] = set()
        self._records: dict[uuid.UUID, FakeConnection] = {}
        self.port = port

    @property
    def url(self) -> str:
        """Base URL to give the SDK (it appends ``/v1/listen``)."""
        return f"ws://127.0.0.1:{self.port}"

    def next_text(self) -> str:
        return self.script.popleft() if self.script else ""

    async def start(self) -> None:
        self._server = await serve(self._handle, "127.0.0.1", self.port, process_request=self._check_upgrade)
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def kill(self) -> None:
        """Drop every open connection without a close frame and stop listening (an outage)."""
        if self._server is not None:
            self._server.close(close_connections=False)
        for ws in list(self._live):
            self._records[ws.id].closed_by = "killed"
            ws.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeDeepgram:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _check_upgrade(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path)
        request_id = str(uuid.uuid4())
        if path.path != "/v1/listen":
            return self._refuse(HTTPStatus.NOT_FOUND, "NOT_FOUND", "Not found.", request_id, request)
        authorization = request.headers.get("Authorization", "")
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() not in ("token", "bearer") or credential != self.api_key:
            return self._refuse(
                HTTPStatus.UNAUTHORIZED, "INVALID_AUTH", "Invalid credentials.", request_id, request
            )
        params = dict(parse_qsl(path.query))
        if "encoding" in params and "sample_rate" not in params:
            return self._refuse(
                HTTPStatus.BAD_REQUEST,
                "Bad Request",
                "sample_rate is required with encoding.",
                request_id,
                request,
            )
        if params.get("encoding", "linear16") not in ("mulaw", "linear16"):
            return self._refuse(
                HTTPStatus.BAD_REQUEST,
                "Bad Request",
                "This fake decodes mulaw and linear16 only.",
                request_id,
                request,
            )
        record = FakeConnection(
            params=params,
            headers=dict(request.headers.raw_items()),
            request_id=request_id,
            query=parse_qsl(path.query),
        )
        self.connections.append(record)
        self._records[connection.id] = record
        return None

    def _refuse(
        self, status: HTTPStatus, code: str, message: str, request_id: str, request: Request
    ) -> Response:
        self.rejected.append((int(status), dict(request.headers.raw_items())))
        body = json.dumps({"err_code": code, "err_msg": message, "request_id": request_id}).encode()
        headers = Headers(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("dg-error", message),
                ("dg-request-id", request_id),
            ]
        )
        return Response(int(status), status.phrase, headers, body)

    async def _handle(self, ws: ServerConnection) -> None:
        record = self._records[ws.id]
        stream = _Stream(self, record, ws)
        self._live.add(ws)
        try:
            while True:
                try:
                    message = await asyncio.wait_for(ws.recv(), timeout=self.idle_timeout_s)
                except TimeoutError:
                    record.closed_by = "idle"
                    await ws.close(1011, "NET-0001")
                    return
                if isinstance(message, bytes):
                    await stream.audio(message)
                    continue
                try:
                    kind = json.loads(message).get("type", "")
                except (ValueError, AttributeError):
                    kind = ""
                record.controls.append(kind)
                if kind == "KeepAlive":
                    continue
                if kind == "Finalize":
                    if self.answer_finalize:
                        await asyncio.sleep(self.finalize_delay_s)
                        await stream.finalize()
                elif kind == "CloseStream":
                    await stream.close_stream()
                    record.closed_by = "close_stream"
                    await ws.close(1000)
                    return
                else:
                    await ws.send(
                        json.dumps(
                            {
                                "type": "Error",
                                "variant": "SchemaError",
                                "description": "could not parse the text message",
                                "message": message,
                            }
                        )
                    )
        except ConnectionClosed:
            if not record.closed_by:
                record.closed_by = "client"
        finally:
            self._live.discard(ws)
