"""voice.recording: both sides of a call placed by the wall clock, a clear erasing what was never
played, redacted spans silenced, raw channels removed."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from voice.audio import pcm16_to_ulaw
from voice.recording import RATE, CallRecording, RecordedLine


def tone(seconds: float, rate: int, amplitude: int = 8000) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.int16)


def read_stereo(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        assert wav.getnchannels() == 2 and wav.getsampwidth() == 2
        rate = wav.getframerate()
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    return frames[:, 0], frames[:, 1], rate


def energy(samples: np.ndarray, start: float, end: float) -> float:
    part = samples[int(start * RATE) : int(end * RATE)].astype(np.float64)
    return float(np.sqrt(np.mean(part * part))) if part.size else 0.0


class FakeLine:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.custom = "kept"

    async def send_audio(self, ulaw: bytes) -> None:
        self.sent.append(("audio", len(ulaw)))

    async def send_mark(self, name: str) -> None:
        self.sent.append(("mark", name))

    async def send_clear(self) -> None:
        self.sent.append(("clear",))

    async def hangup(self, reason: str) -> None:
        self.sent.append(("hangup", reason))


def test_caller_audio_lands_where_it_arrived_and_a_gap_stays_silent(tmp_path: Path) -> None:
    rec = CallRecording(tmp_path / "partial")
    rec.begin(100.0)
    speech = tone(0.02, 16000)
    for i in range(50):  # 1 s of 20 ms frames from 1.0 s, then nothing until 3.0 s
        rec.caller_audio(speech, 101.02 + i * 0.02)
    for i in range(25):
        rec.caller_audio(speech, 103.02 + i * 0.02)
    rec.caller_audio(np.zeros(320, dtype=np.int16), 103.6)
    left, right, rate = read_stereo_after(rec, tmp_path)
    assert rate == RATE
    assert energy(left, 1.05, 1.95) > 2000
    assert energy(left, 2.1, 2.9) == 0
    assert energy(left, 3.05, 3.45) > 2000
    assert energy(right, 0, 3.5) == 0


def read_stereo_after(
    rec: CallRecording, tmp_path: Path, silence: Any = ()
) -> tuple[np.ndarray, np.ndarray, int]:
    out = tmp_path / "call.wav"
    try:
        rec.write_wav(out, silence)
    finally:
        rec.discard()
    return read_stereo(out)


async def test_bot_audio_plays_in_order_from_when_it_was_sent_and_a_clear_erases_the_unplayed_rest(
    tmp_path: Path,
) -> None:
    now = [10.0]
    rec = CallRecording(tmp_path / "partial")
    line = FakeLine()
    recorded = RecordedLine(line, rec, lambda: now[0])
    rec.begin(10.0)
    now[0] = 10.5
    await recorded.send_audio(pcm16_to_ulaw(tone(2.0, RATE)))  # plays 0.5 .. 2.5 s
    now[0] = 11.5
    await recorded.send_clear()  # at 1.5 s: the last second was never played
    await recorded.send_mark("0:1:2")
    now[0] = 12.0
    await recorded.send_audio(pcm16_to_ulaw(tone(0.5, RATE)))  # plays 2.0 .. 2.5 s
    rec.caller_audio(np.zeros(320, dtype=np.int16), 13.0)
    assert [s[0] for s in line.sent] == ["audio", "clear", "mark", "audio"]
    assert recorded.custom == "kept"  # the wrapped line's own attributes stay reachable
    left, right, _ = read_stereo_after(rec, tmp_path)
    assert energy(right, 0.0, 0.45) == 0
    assert energy(right, 0.55, 1.45) > 2000
    assert energy(right, 1.55, 1.95) == 0  # cleared: never heard
    assert energy(right, 2.05, 2.45) > 2000
    assert energy(right, 2.55, 3.0) == 0
    assert energy(left, 0, 3.0) == 0


def test_silenced_spans_are_zero_on_both_channels_and_the_rest_is_kept(tmp_path: Path) -> None:
    rec = CallRecording(tmp_path / "partial")
    rec.begin(0.0)
    for i in range(150):
        rec.caller_audio(tone(0.02, 16000), 0.02 * (i + 1))
    rec.bot_audio(pcm16_to_ulaw(tone(3.0, RATE)), 0.0)
    rec.caller_turn(1, "speech", 1.0, 2.0)
    assert rec.turns[1].start == pytest.approx(1.0) and rec.turns[1].end == pytest.approx(2.0)
    left, right, _ = read_stereo_after(rec, tmp_path, [(1.0, 2.0)])
    for channel in (left, right):
        assert not channel[RATE : 2 * RATE].any()
        assert energy(channel, 0.1, 0.9) > 2000 and energy(channel, 2.1, 2.9) > 2000


async def test_finish_hands_the_recording_over_once_and_removes_the_raw_channels(tmp_path: Path) -> None:
    kept: list[tuple[str, int | None, float]] = []

    async def keep(rec: CallRecording, call_sid: str, conversation_id: int | None) -> None:
        kept.append((call_sid, conversation_id, rec.write_wav(tmp_path / "kept.wav")))

    rec = CallRecording(tmp_path / "partial", keep)
    rec.begin(0.0)
    rec.bot_audio(pcm16_to_ulaw(tone(1.0, RATE)), 0.0)
    await rec.finish("CA1", 7)
    await rec.finish("CA1", 7)
    assert kept == [("CA1", 7, pytest.approx(1.0))]
    assert list((tmp_path / "partial").iterdir()) == []
    rec.bot_audio(b"\xff" * 160, 2.0)  # after the end: ignored


async def test_a_failing_keeper_is_logged_and_the_raw_channels_still_go(tmp_path: Path) -> None:
    async def keep(rec: CallRecording, call_sid: str, conversation_id: int | None) -> None:
        raise OSError("disk full")

    rec = CallRecording(tmp_path / "partial", keep)
    rec.bot_audio(pcm16_to_ulaw(tone(0.1, RATE)), 0.0)
    await rec.finish("CA2", 1)
    assert list((tmp_path / "partial").iterdir()) == []
