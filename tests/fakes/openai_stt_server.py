"""A fake of OpenAI's speech-to-text endpoint (``POST /v1/audio/transcriptions``) on 127.0.0.1.

It speaks the wire format the real service speaks, so the ``openai`` SDK (and pipecat's
``OpenAISTTService``, a segmented service that uploads each utterance as a WAV file) can be
pointed at it: ``Authorization: Bearer KEY``, a multipart form with ``file``, ``model`` and
optional ``language``/``prompt``/``response_format``, answered with ``{"text": ...}`` (``json``,
the default) or OpenAI's error JSON. It cannot recognise words: transcripts come from a script,
one per request (``""`` once used up), and every uploaded WAV is kept for the test to inspect.

Usage::

    async with FakeOpenAITranscriptions("sk-test", ["I want a refund."]) as fake:
        service = OpenAISTTService(api_key="sk-test", base_url=fake.base_url)
        ...
        assert fake.uploads[0].rate == 16000
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from voice.audio import wav_to_pcm16


@dataclass(frozen=True)
class Upload:
    """One transcription request: its form fields and the audio it carried."""

    fields: dict[str, str]
    rate: int
    seconds: float


class FakeOpenAITranscriptions:
    """See the module docstring.

    Attributes:
        uploads: accepted requests, in order.
        fail_with: answer every request with this HTTP status and OpenAI's error JSON.
    """

    def __init__(self, api_key: str, script: Sequence[str] = ()) -> None:
        self.api_key = api_key
        self.script: deque[str] = deque(script)
        self.uploads: list[Upload] = []
        self.fail_with: int | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """What to give the OpenAI client (it appends ``/audio/transcriptions``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/audio/transcriptions", self._transcribe)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
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

    async def _transcribe(self, request: web.Request) -> web.Response:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or key != self.api_key:
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        if self.fail_with is not None:
            return _error(self.fail_with, "The server had an error while processing your request.", None)
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField) or "model" not in form:
            return _error(400, "'file' and 'model' are required.", None)
        try:
            pcm, rate = wav_to_pcm16(upload.file.read())
        except ValueError:
            return _error(400, "The audio file could not be decoded.", None)
        fields = {k: str(v) for k, v in form.items() if k != "file"}
        self.uploads.append(Upload(fields, rate, pcm.size / rate))
        text = self.script.popleft() if self.script else ""
        body: dict[str, Any] = {"text": text}
        if fields.get("response_format") == "verbose_json":
            body |= {"task": "transcribe", "language": "english", "duration": pcm.size / rate, "segments": []}
        response = web.json_response(body)
        response.force_close()  # pipecat never closes its OpenAI client: no kept-alive socket left
        return response


def _error(status: int, message: str, code: str | None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    response = web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status
    )
    response.force_close()
    return response
