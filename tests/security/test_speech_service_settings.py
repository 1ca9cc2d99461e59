"""Attacks and accidents around the speech service settings (``CLOSELOOP_STT_SERVICE``,
``CLOSELOOP_TTS_SERVICE`` and their JSON parameters).

Whoever can set the environment can already do much; what these settings must never become is a
way to import and call an arbitrary class (``os.system``, ``subprocess.Popen``, a pipecat class
outside its services), and an API key given through the environment must never be written to a
log line or an error message, whether the provider accepts it, rejects it or is unreachable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from loguru import logger as loguru_logger

from app.metrics import Metrics
from app.settings import Settings
from app.voice import synthesizer_factory, transcriber_factory
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.speech_servers import FakeCartesiaTTS, FakeOpenAITTS
from voice.pipecat_speech import (
    PipecatServiceError,
    ServiceSettingsError,
    ServiceSpec,
    STTService,
    TTSService,
)
from voice.pipecat_stt import PipecatTranscriber
from voice.pipecat_tts import PipecatVoice

SECRET = "sk-live-SECRET-0123456789abcdefXYZ"


@pytest.mark.parametrize(
    "path",
    [
        "os.system",
        "subprocess.Popen",
        "builtins.__import__",
        "pipecat.pipeline.worker.PipelineWorker",
        "pipecat.servicesX.evil.Thing",
        "pipecat.services..openai.tts.OpenAITTSService",
        "pipecat.services.openai.tts.OpenAITTSService.__init__.__globals__",
        "pipecat.services.deepgram.__builtins__.eval",
        "pipecat.services.openai.tts.os.system",  # a module the service imported, not a service
        " pipecat.services.openai.tts.AsyncOpenAI",  # a class, but not a TTS service
    ],
)
def test_class_paths_outside_pipecat_services_are_refused(path: str) -> None:
    with pytest.raises(ServiceSettingsError):
        ServiceSpec.from_settings(path, "{}", base=TTSService, environ={})


def test_a_stt_class_cannot_be_used_as_tts_or_the_other_way_round() -> None:
    with pytest.raises(ServiceSettingsError, match="is not a subclass of TTSService"):
        ServiceSpec.from_settings(
            "pipecat.services.deepgram.stt.DeepgramSTTService", base=TTSService, environ={}
        )
    with pytest.raises(ServiceSettingsError, match="is not a subclass of STTService"):
        ServiceSpec.from_settings("pipecat.services.openai.tts.OpenAITTSService", base=STTService, environ={})


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Everything logged meanwhile: closeloop's logging records and pipecat's loguru lines."""
    lines: list[str] = []
    sink = loguru_logger.add(lambda message: lines.append(str(message)), level="TRACE")
    caplog.set_level(logging.DEBUG)
    try:
        yield lines
    finally:
        loguru_logger.remove(sink)
        lines.extend(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)


def _spec(path: str, params: str, base: type[STTService] | type[TTSService]) -> ServiceSpec:
    return ServiceSpec.from_settings(path, params, base=base, environ={"PROVIDER_KEY": SECRET})


def test_the_key_stays_out_of_the_spec_and_of_a_refusal_by_the_service_class() -> None:
    spec = _spec("pipecat.services.openai.tts.OpenAITTSService", '{"api_key": "$PROVIDER_KEY"}', TTSService)
    assert SECRET not in repr(spec)
    bad = _spec(
        "pipecat.services.cartesia.tts.CartesiaTTSService",
        '{"api_key": "$PROVIDER_KEY", "settings": {"no_such_setting": 1}}',
        TTSService,
    )
    with pytest.raises(ServiceSettingsError, match="CartesiaTTSService refused its parameters") as caught:
        bad.build()
    assert SECRET not in str(caught.value)


async def _speaking_fails(spec: ServiceSpec) -> PipecatServiceError:
    """The error a reply through ``spec`` ends with."""
    voice = PipecatVoice(spec)
    try:
        with pytest.raises(PipecatServiceError) as caught:
            async for _ in voice.synthesizer(call_id="CA-sec").stream(["Hello."]):
                pass
    finally:
        await voice.aclose()
    return caught.value


async def test_a_rejected_tts_key_never_reaches_logs_or_errors(all_logs: list[str]) -> None:
    async with FakeOpenAITTS("the-right-key") as fake:
        params = f'{{"api_key": "$PROVIDER_KEY", "base_url": "{fake.base_url}"}}'
        error = await _speaking_fails(
            _spec("pipecat.services.openai.tts.OpenAITTSService", params, TTSService)
        )
    assert fake.headers and fake.headers[0]["Authorization"] == f"Bearer {SECRET}"  # it was used
    assert "Incorrect API key" in str(error) and SECRET not in str(error)
    assert not [line for line in all_logs if SECRET in line]


async def test_a_tts_provider_error_never_leaks_the_key(all_logs: list[str]) -> None:
    async with FakeCartesiaTTS(SECRET) as fake:
        fake.fail_with = f"quota exceeded for key {SECRET}"  # a provider that echoes the key
        params = f'{{"api_key": "$PROVIDER_KEY", "url": "{fake.url}", "settings": {{"voice": "v"}}}}'
        error = await _speaking_fails(
            _spec("pipecat.services.cartesia.tts.CartesiaTTSService", params, TTSService)
        )
    assert "quota exceeded for key" in str(error) and SECRET not in str(error)
    assert not [line for line in all_logs if SECRET in line]


async def test_a_rejected_or_unreachable_stt_key_never_reaches_logs_or_errors(all_logs: list[str]) -> None:
    async with FakeDeepgram("the-right-key") as fake:
        spec = _spec(
            "pipecat.services.deepgram.stt.DeepgramSTTService",
            f'{{"api_key": "$PROVIDER_KEY", "base_url": "{fake.url}"}}',
            STTService,
        )
        stt = PipecatTranscriber(spec, None, call_id="CA-sec-3")
        await stt.start()
        try:
            with pytest.raises(PipecatServiceError) as caught:
                await stt.transcribe(np.zeros(3200, dtype=np.int16))
        finally:
            await stt.aclose()
    assert fake.rejected  # the key was tried and refused
    assert SECRET not in str(caught.value)
    assert not [line for line in all_logs if SECRET in line]


class _NoSpeech:
    """A speech source the factories must not touch while refusing settings."""

    @property
    def speech(self) -> Any:
        raise AssertionError("the speech stack was used")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tts_service": "os.system"}, "must start with 'pipecat.services.'"),
        (
            {"tts_service": "pipecat.services.openai.tts.OpenAITTSService", "tts_params": "{oops"},
            "not valid JSON",
        ),
        (
            {
                "tts_service": "pipecat.services.cartesia.tts.CartesiaTTSService",
                "tts_params": '{"api_key": "$NO_SUCH_KEY_VAR"}',
            },
            "NO_SUCH_KEY_VAR",
        ),
    ],
)
def test_bad_tts_settings_stop_the_start_up_with_a_clear_error(
    overrides: dict[str, str], message: str
) -> None:
    closers: list[Any] = []
    with pytest.raises(ServiceSettingsError, match=message):
        synthesizer_factory(Settings(_env_file=None, **overrides), _NoSpeech(), closers)
    assert closers == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"stt_provider": "pipecat"}, "needs CLOSELOOP_STT_SERVICE"),
        (
            {"stt_provider": "pipecat", "stt_service": "subprocess.Popen"},
            "must start with 'pipecat.services.'",
        ),
        (
            {"stt_provider": "pipecat", "stt_service": "pipecat.services.openai.tts.OpenAITTSService"},
            "is not a subclass of STTService",
        ),
    ],
)
def test_bad_stt_settings_stop_the_start_up_with_a_clear_error(
    overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ServiceSettingsError, match=message):
        transcriber_factory(Settings(_env_file=None, **overrides), _NoSpeech(), Metrics())
