"""The pipecat speech adapters against fake providers on 127.0.0.1: pipecat's own OpenAI and
Cartesia TTS services and its Deepgram STT service, run through :mod:`voice.pipecat_speech`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from telephony.caller_audio import render_tts
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.speech_servers import FakeCartesiaTTS, FakeOpenAITranscriptions, FakeOpenAITTS
from voice.audio import resample, ulaw_to_pcm16
from voice.pipecat_speech import (
    PipecatServiceError,
    ServiceSettingsError,
    ServiceSpec,
    STTService,
    TTSService,
    service_from_settings,
)
from voice.pipecat_stt import PipecatSTTOptions, PipecatTranscriber, audio_extends
from voice.pipecat_tts import PipecatVoice

OPENAI_TTS = "pipecat.services.openai.tts.OpenAITTSService"
CARTESIA_TTS = "pipecat.services.cartesia.tts.CartesiaTTSService"
DEEPGRAM_STT = "pipecat.services.deepgram.stt.DeepgramSTTService"
OPENAI_STT = "pipecat.services.openai.stt.OpenAISTTService"
KEY = "sk-unit-0123456789abcdef"


def openai_spec(fake: FakeOpenAITTS, key: str = KEY) -> ServiceSpec:
    return ServiceSpec.from_settings(
        OPENAI_TTS,
        f'{{"api_key": "$TTS_KEY", "base_url": "{fake.base_url}"}}',
        base=TTSService,
        environ={"TTS_KEY": key},
    )


def cartesia_spec(fake: FakeCartesiaTTS) -> ServiceSpec:
    params = f'{{"api_key": "$TTS_KEY", "url": "{fake.url}", "settings": {{"voice": "voice-1"}}}}'
    return ServiceSpec.from_settings(CARTESIA_TTS, params, base=TTSService, environ={"TTS_KEY": KEY})


def deepgram_spec(fake: FakeDeepgram, key: str = KEY) -> ServiceSpec:
    params = f'{{"api_key": "$STT_KEY", "base_url": "{fake.url}", "settings": {{"endpointing": false}}}}'
    return ServiceSpec.from_settings(DEEPGRAM_STT, params, base=STTService, environ={"STT_KEY": key})


class FixedSynthesizer:
    """A fallback voice: one short tone per sentence."""

    def __init__(self) -> None:
        self.spoken: list[str] = []

    def sentences(self, text: str) -> list[str]:
        return [p.strip() + "." for p in text.split(".") if p.strip()]

    async def stream(self, sentences: Sequence[str]) -> AsyncIterator[bytes]:
        for sentence in sentences:
            self.spoken.append(sentence)
            yield b"\x10" * 800


class FixedTranscriber:
    def __init__(self, text: str) -> None:
        self.text = text
        self.calls = 0

    async def transcribe(self, pcm16_16k: np.ndarray) -> str:
        self.calls += 1
        return self.text


# ---- TTS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "cartesia"])
async def test_first_audio_reaches_the_call_before_the_provider_finished_the_sentence(provider: str) -> None:
    fake: FakeOpenAITTS | FakeCartesiaTTS = (
        FakeOpenAITTS(KEY) if provider == "openai" else FakeCartesiaTTS(KEY)
    )
    async with fake:
        voice = PipecatVoice(openai_spec(fake) if isinstance(fake, FakeOpenAITTS) else cartesia_spec(fake))
        try:
            await voice.start()
            fake.hold_after_first = asyncio.Event()
            # pipecat's OpenAI service reads the response 0.5 s of audio at a time
            fake.hold_after_ms = 600 if provider == "openai" else 0
            chunks = voice.synthesizer().stream_chunks(["Your refund of eighty nine dollars is on its way."])
            index, first, end = await anext(chunks)
            # The provider is holding the rest of the sentence: this audio came while it "synthesized".
            assert (index, end) == (0, False) and first
            assert fake.sentences_finished == 0
            fake.hold_after_first.set()
            rest = [chunk async for _, chunk, _ in chunks]
            assert fake.sentences_finished == 1
        finally:
            await voice.aclose()
    audio = first + b"".join(rest)
    seconds = len(audio) / 8000  # mu-law at 8 kHz: one byte per sample
    assert 1.5 < seconds < 6.0
    pcm = ulaw_to_pcm16(audio)
    assert float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) > 300  # speech, not silence


async def test_stream_gives_one_item_of_8khz_mulaw_per_sentence_and_the_pipeline_is_reused() -> None:
    async with FakeCartesiaTTS(KEY) as fake:
        voice = PipecatVoice(cartesia_spec(fake))
        try:
            synthesizer = voice.synthesizer()
            first = [a async for a in synthesizer.stream(["Hello there.", "How can I help you today?"])]
            second = [a async for a in synthesizer.stream(["Goodbye."])]
        finally:
            await voice.aclose()
    assert len(first) == 2 and len(second) == 1
    assert len(first[1]) > len(first[0]) > 4000  # the longer sentence is longer audio (> 0.5 s)
    assert len(fake.connections) == 1  # one warm connection served both replies
    messages = fake.connections[0].messages
    assert messages[0]["transcript"] == "Hello there." and messages[0]["voice"] == {
        "mode": "id",
        "id": "voice-1",
    }
    assert messages[0]["output_format"] == {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000}
    assert len(fake.connections[0].contexts_done) == 3


async def test_openai_tts_requests_streamed_pcm_with_the_key_from_the_environment() -> None:
    async with FakeOpenAITTS(KEY) as fake:
        voice = PipecatVoice(openai_spec(fake))
        try:
            audio = [a async for a in voice.synthesizer().stream(["Thanks for calling."])]
        finally:
            await voice.aclose()
    assert len(audio) == 1 and len(audio[0]) > 4000
    assert fake.requests == [
        {
            "model": "gpt-4o-mini-tts",
            "input": "Thanks for calling.",
            "voice": "alloy",
            "response_format": "pcm",
        }
    ]
    assert fake.headers[0]["Authorization"] == f"Bearer {KEY}"


async def test_a_failing_tts_provider_raises_a_clear_error_without_the_key() -> None:
    async with FakeOpenAITTS(KEY) as fake:
        voice = PipecatVoice(openai_spec(fake, key=KEY[:-4] + "zzzz"))  # a key OpenAI rejects
        try:
            with pytest.raises(PipecatServiceError) as caught:
                async for _ in voice.synthesizer(call_id="CA1").stream(["Hello."]):
                    pass
        finally:
            await voice.aclose()
    assert caught.value.reason == "error"
    assert str(caught.value).startswith("OpenAITTSService failed: ")
    assert KEY[:-4] not in str(caught.value)


async def test_a_rejected_key_moves_the_reply_to_the_fallback_voice() -> None:
    async with FakeCartesiaTTS(KEY) as fake:
        fake.fail_with = "Invalid voice id"
        voice = PipecatVoice(cartesia_spec(fake))
        fallback = FixedSynthesizer()
        reasons: list[str] = []
        try:
            synthesizer = voice.synthesizer(fallback, call_id="CA2", on_fallback=reasons.append)
            audio = [a async for a in synthesizer.stream(synthesizer.sentences("One. Two."))]
        finally:
            await voice.aclose()
    assert audio == [b"\x10" * 800, b"\x10" * 800]
    assert fallback.spoken == ["One.", "Two."]
    assert reasons == ["error"] and synthesizer.fallbacks == 1


async def test_an_unreachable_provider_moves_the_reply_to_the_fallback_and_blank_pieces_cost_nothing() -> (
    None
):
    async with FakeCartesiaTTS(KEY) as fake:
        url = fake.url
    # the fake is gone: nothing listens on its port any more
    params = f'{{"api_key": "$K", "url": "{url}", "settings": {{"voice": "v"}}}}'
    voice = PipecatVoice(ServiceSpec.from_settings(CARTESIA_TTS, params, base=TTSService, environ={"K": KEY}))
    fallback = FixedSynthesizer()
    try:
        audio = [a async for a in voice.synthesizer(fallback).stream(["Hello.", "Bye."])]
    finally:
        await voice.aclose()
    assert fallback.spoken == ["Hello.", "Bye."] and len(audio) == 2

    async with FakeCartesiaTTS(KEY) as fake:
        voice = PipecatVoice(cartesia_spec(fake))
        try:
            audio = [a async for a in voice.synthesizer().stream(["Hi.", " ", "Bye."])]
        finally:
            await voice.aclose()
    assert len(audio) == 3 and audio[1] == b"\xff" * 160  # a blank piece is a beat of silence
    assert fake.transcripts == ["Hi.", "Bye."]


async def test_an_abandoned_reply_closes_its_pipeline_and_a_fresh_one_serves_the_next() -> None:
    async with FakeCartesiaTTS(KEY) as fake:
        voice = PipecatVoice(cartesia_spec(fake))
        try:
            synthesizer = voice.synthesizer()
            chunks = synthesizer.stream_chunks(["A long first sentence that the caller interrupts.", "More."])
            await anext(chunks)
            await chunks.aclose()  # a barge-in
            after = [a async for a in synthesizer.stream(["Sure."])]
        finally:
            await voice.aclose()
    assert len(after) == 1 and len(after[0]) > 1000
    assert len(fake.connections) >= 2  # the interrupted pipeline was not handed on


# ---- STT ---------------------------------------------------------------------------------------


def _caller(text: str) -> tuple[bytes, np.ndarray]:
    """``text`` as the caller's 8 kHz mu-law (with a pause after it) and as 16 kHz PCM."""
    ulaw = render_tts(text) + b"\xff" * 2400
    return ulaw, resample(ulaw_to_pcm16(ulaw), 8000, 16000)


async def _say(stt: PipecatTranscriber, ulaw: bytes) -> None:
    for offset in range(0, len(ulaw), 160):
        stt.feed(ulaw[offset : offset + 160])
        if offset % 1600 == 0:
            await asyncio.sleep(0)


async def test_deepgram_through_pipecat_transcribes_each_utterance_from_the_stream() -> None:
    async with FakeDeepgram(KEY, ["I want a refund.", "Thanks, goodbye."]) as fake:
        stt = PipecatTranscriber(deepgram_spec(fake), FixedTranscriber("WHISPER"), call_id="CA3")
        told: list[str] = []
        stt.on_partial = told.append  # the call session listens to the running text
        await stt.start()
        try:
            answers = []
            for words in ("I would like my money back", "bye now"):
                ulaw, audio = _caller(words)
                await _say(stt, ulaw)
                answers.append(await stt.transcribe(audio))
        finally:
            await stt.aclose()
    assert answers == ["I want a refund.", "Thanks, goodbye."]
    assert "I want a refund." in told and told[-1] == "Thanks, goodbye."
    assert stt.failure is None and stt.fallbacks == 0
    conn = fake.connections[0]
    assert conn.headers["Authorization"] == f"Token {KEY}"
    assert conn.params["encoding"] == "linear16" and conn.params["sample_rate"] == "8000"
    assert conn.controls.count("Finalize") == 2
    assert conn.audio_bytes >= 2 * len(ulaw)


async def test_a_grown_utterance_keeps_the_words_of_its_speculative_transcript_once() -> None:
    async with FakeDeepgram(KEY, ["My order", "is late."]) as fake:
        stt = PipecatTranscriber(deepgram_spec(fake), call_id="CA4")
        await stt.start()
        try:
            ulaw1, audio1 = _caller("my order")
            await _say(stt, ulaw1)
            early = await stt.transcribe(audio1)  # at the pause; the caller goes on
            ulaw2, audio2 = _caller("is late")
            await _say(stt, ulaw2)
            whole = await stt.transcribe(np.concatenate([audio1, audio2]))  # the same turn, grown
        finally:
            await stt.aclose()
    assert early == "My order"
    assert whole == "My order is late."


async def test_a_rejected_stt_key_moves_the_call_to_the_fallback() -> None:
    async with FakeDeepgram(KEY, ["never heard"]) as fake:
        reasons: list[str] = []
        whisper = FixedTranscriber("from whisper")
        stt = PipecatTranscriber(
            deepgram_spec(fake, key="wrong-key-0000"), whisper, call_id="CA5", on_fallback=reasons.append
        )
        await stt.start()
        try:
            ulaw, audio = _caller("hello")
            await _say(stt, ulaw)
            answer = await stt.transcribe(audio)
        finally:
            await stt.aclose()
    assert answer == "from whisper"
    assert stt.failure is not None and reasons == [stt.failure]
    assert fake.rejected and fake.rejected[0][0] == 401


async def test_a_failed_stt_without_fallback_raises_a_clear_error() -> None:
    async with FakeDeepgram(KEY) as fake:
        stt = PipecatTranscriber(
            deepgram_spec(fake, key="wrong-key-0000"), None, call_id="CA6", options=PipecatSTTOptions()
        )
        await stt.start()
        try:
            with pytest.raises(PipecatServiceError, match="DeepgramSTTService failed"):
                await stt.transcribe(np.zeros(1600, dtype=np.int16))
        finally:
            await stt.aclose()


async def test_a_segmented_service_gets_each_whole_utterance_at_16khz() -> None:
    async with FakeOpenAITranscriptions(KEY, ["I want a refund.", ""]) as fake:
        params = f'{{"api_key": "$K", "base_url": "{fake.base_url}", "push_empty_transcripts": true}}'
        spec = ServiceSpec.from_settings(OPENAI_STT, params, base=STTService, environ={"K": KEY})
        stt = PipecatTranscriber(spec, FixedTranscriber("WHISPER"), call_id="CA7")
        await stt.start()
        try:
            ulaw, audio = _caller("I would like my money back")
            stt.feed(ulaw)  # a segmented service ignores the live stream
            first = await stt.transcribe(audio)
            second = await stt.transcribe(np.zeros(8000, dtype=np.int16))  # a cough: empty transcript
        finally:
            await stt.aclose()
    assert not stt.streaming
    assert (first, second) == ("I want a refund.", "")
    assert stt.failure is None and stt.fallbacks == 0
    upload = fake.uploads[0]
    assert upload.rate == 16000 and upload.fields["model"] == "gpt-transcribe"
    assert len(audio) / 16000 <= upload.seconds <= len(audio) / 16000 + 1.0  # plus pipecat's trailing silence


def test_audio_extends_only_when_the_earlier_audio_is_a_prefix() -> None:
    early = np.arange(10, dtype=np.int16)
    assert audio_extends(early, np.arange(20, dtype=np.int16))
    assert not audio_extends(early, np.arange(5, dtype=np.int16))
    assert not audio_extends(early, np.arange(1, 21, dtype=np.int16))
    assert not audio_extends(None, early)


# ---- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("os.system", "must start with 'pipecat.services.'"),
        ("builtins.eval", "must start with 'pipecat.services.'"),
        ("pipecat.pipeline.worker.PipelineWorker", "must start with 'pipecat.services.'"),
        ("pipecat.services.deepgram._errors.Anything", "none starting with an underscore"),
        ("pipecat.services.nosuchvendor.tts.NoTTS", "cannot import pipecat.services.nosuchvendor.tts"),
        ("pipecat.services.openai.tts.OpenAITTS", "pipecat.services.openai.tts has no OpenAITTS"),
        (DEEPGRAM_STT, "is not a subclass of TTSService"),
    ],
)
def test_a_bad_class_path_is_refused_with_a_helpful_message(path: str, message: str) -> None:
    with pytest.raises(ServiceSettingsError, match=message.replace(".", r"\.").replace("(", r"\(")):
        ServiceSpec.from_settings(path, "{}", base=TTSService)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{not json", "are not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"api_key": "$UNSET_VARIABLE"}', "UNSET_VARIABLE .* is not set"),
    ],
)
def test_bad_parameters_are_refused_with_a_helpful_message(params: str, message: str) -> None:
    with pytest.raises(ServiceSettingsError, match=message):
        ServiceSpec.from_settings(OPENAI_TTS, params, base=TTSService, environ={})


def test_service_from_settings_builds_the_named_service_with_nested_settings() -> None:
    service = service_from_settings(
        CARTESIA_TTS, '{"api_key": "$K", "settings": {"voice": "v9"}}', base=TTSService, environ={"K": KEY}
    )
    assert type(service).__name__ == "CartesiaTTSService"
    spec = ServiceSpec.from_settings(CARTESIA_TTS, '{"api_key": "$K"}', environ={"K": KEY})
    assert spec.checked() is spec and KEY not in repr(spec)
    typo = ServiceSpec.from_settings(
        CARTESIA_TTS, '{"api_key": "$K", "settings": {"voise": "v"}}', environ={"K": KEY}
    )
    with pytest.raises(ServiceSettingsError, match="CartesiaTTSService refused its parameters"):
        typo.checked()  # at start-up, not at the first call
    assert spec.mask(f"bad key {KEY}") == "bad key ***"
