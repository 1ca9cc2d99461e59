"""The aiortc test peer's parts (telephony/webrtc_peer.py), shared by the browser-call tests, the
agent-console tests and the WebRTC latency benchmark."""

from __future__ import annotations

import time

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from telephony.webrtc_peer import FRAME, RATE, AudioSink, Microphone, rms


def samples(frame: AudioFrame) -> np.ndarray:
    return frame.to_ndarray().reshape(-1)


async def test_the_microphone_sends_real_time_frames_of_silence_then_what_it_is_told_to_say() -> None:
    mic = Microphone()
    started = time.monotonic()
    first = await mic.recv()
    assert first.pts == 0 and first.samples == FRAME and first.sample_rate == RATE
    assert not samples(first).any()  # silence is sent too (no DTX)
    words = np.arange(1, 2 * FRAME + 101, dtype=np.int16)  # two frames and a bit
    mic.say(words[:FRAME])
    mic.say(words[FRAME:])  # queued after the rest
    heard = [await mic.recv() for _ in range(3)]
    assert [f.pts for f in heard] == [FRAME, 2 * FRAME, 3 * FRAME]
    assert time.monotonic() - started >= 3 * FRAME / RATE - 0.005  # paced as a microphone
    assert mic.said.is_set() and mic.ended_at >= started
    sent = np.concatenate([samples(f) for f in heard])
    assert np.array_equal(sent[: words.size], words) and not sent[words.size :].any()
    assert not samples(await mic.recv()).any()  # silence again once it is said
    mic.say(words)
    assert not mic.said.is_set()  # a new utterance is not said yet
    mic.stop()


async def test_the_microphone_ends_when_stopped() -> None:
    mic = Microphone()
    mic.stop()
    try:
        await mic.recv()
    except MediaStreamError:
        return
    raise AssertionError("a stopped microphone still sent a frame")


class Track(MediaStreamTrack):
    kind = "audio"

    def __init__(self, frames: list[AudioFrame]) -> None:
        super().__init__()
        self._frames = frames

    async def recv(self) -> AudioFrame:
        if not self._frames:
            raise MediaStreamError
        return self._frames.pop(0)


class Recorder(AudioSink):
    def __init__(self) -> None:
        super().__init__()
        self.loudness: list[float] = []

    def hear(self, frame: AudioFrame) -> None:
        self.loudness.append(rms(frame.to_ndarray()))


def audio_frame(value: int) -> AudioFrame:
    frame = AudioFrame(format="s16", layout="mono", samples=FRAME)
    frame.planes[0].update(np.full(FRAME, value, dtype=np.int16).tobytes())
    frame.sample_rate = RATE
    return frame


async def test_the_sink_hears_every_frame_until_the_track_ends() -> None:
    recorder = Recorder()
    await recorder.play(Track([audio_frame(0), audio_frame(300), audio_frame(-40)]))
    assert recorder.loudness == [0.0, 300.0, 40.0]
    await recorder.stop()  # nothing was playing on a peer connection


def test_rms_of_nothing_is_zero() -> None:
    assert rms(np.zeros(0, dtype=np.int16)) == 0.0
    assert rms(np.array([3, -4, 3, -4], dtype=np.int16)) == pytest.approx(12.5**0.5)
