"""Call recording end to end (CLOSELOOP_RECORD_CALLS): a simulated Twilio caller speaking real audio to
the real server, the stored stereo WAV read back and checked against what the caller did and heard.

The caller's times come from the simulator's report (ms since its ``start``); the recording's start
is the session's start, a few ms later. The offset is measured once from the bot's first audio and
then every caller utterance is looked up in the file with a small margin.
"""

from __future__ import annotations

import wave
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.clock import FakeClock
from telephony.simulator import Utterance, run_call
from tests.fakes.twilio_server import FakeTwilio
from tests.integration.test_voice_calls import wait_for
from tests.support import ACCOUNT_SID, AUTH_TOKEN, LiveServer, live_server, make_customer, twilio_settings
from voice.audio import resample, ulaw_to_pcm16
from voice.recording import NOTICE

RATE = 8000
FRAME = RATE // 50  # 20 ms
VOICED = 300.0  # RMS over a 20 ms frame that counts as someone talking
SPOKEN_CARD = "4532015112830366"  # Luhn-valid: redacted wherever it is said
GREETING = "Thanks for calling. How can I help you today?"


@pytest.fixture(scope="module")
async def recorded(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[LiveServer, FakeClock, Path]]:
    clock = FakeClock()
    data_dir = tmp_path_factory.mktemp("recorded-data")
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        live_server(
            database_url,
            clock=clock,
            **twilio_settings(twilio),
            data_dir=data_dir,
            record_calls=True,
            recording_retention_days=30,
        ) as server,
    ):
        await server.services.speech.start()
        yield server, clock, data_dir


def read_stereo(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, RATE)
        frames = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)
    return frames[:, 0].copy(), frames[:, 1].copy()


def window(samples: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
    return samples[max(0, int(start_s * RATE)) : max(0, int(end_s * RATE))]


def rms(samples: np.ndarray) -> float:
    x = samples.astype(np.float64)
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def voiced_frames(samples: np.ndarray) -> np.ndarray:
    """Start times (s) of the 20 ms frames someone is talking in."""
    n = samples.size // FRAME
    frames = samples[: n * FRAME].astype(np.float64).reshape(n, FRAME)
    return np.flatnonzero(np.sqrt((frames * frames).mean(axis=1)) > VOICED) * FRAME / RATE


async def transcribe(server: LiveServer, pcm8k: np.ndarray) -> str:
    return (await server.services.speech.transcriber().transcribe(resample(pcm8k, RATE, 16000))).lower()


async def planned_seconds(server: LiveServer, text: str) -> float:
    synth = server.services.speech.synthesizer()
    return sum([len(audio) async for audio in synth.stream(synth.sentences(text))]) / RATE


async def recording_row(server: LiveServer, call_sid: str) -> Any:
    return await server.services.pool.fetchrow("SELECT * FROM recordings WHERE call_sid = $1", call_sid)


async def test_a_recorded_call_keeps_both_sides_aligned_without_the_cleared_reply_or_the_card(
    recorded: tuple[LiveServer, FakeClock, Path],
) -> None:
    server, clock, data_dir = recorded
    c = await make_customer(server.services.pool, clock.now(), {"lamp": ("placed", "Desk lamp", 4200, 1)})
    spoken_card = ", ".join(" ".join(SPOKEN_CARD[i : i + 4]) for i in range(0, 16, 4))
    report = await run_call(
        server.base_url,
        [
            # over the greeting, once the recording notice has been said
            Utterance(text="what are your opening hours", barge_in_after_ms=1800),
            Utterance(text=f"my card number is {spoken_card}"),
            Utterance(text="thanks, goodbye"),
        ],
        caller=c.phone,
        auth_token=AUTH_TOKEN,
        account_sid=ACCOUNT_SID,
        max_call_seconds=120,
    )
    print(report.format())
    assert not report.violations, report.violations
    assert report.clears_received >= 1
    await wait_for(lambda: recording_row(server, report.call_sid), timeout=30)
    row = await recording_row(server, report.call_sid)
    path = data_dir / "recordings" / row["path"]
    left, right = read_stereo(path)
    assert list((data_dir / "recordings" / "partial").iterdir()) == []  # raw channels removed

    # The row: the call, its length, what the caller was told, when it goes.
    conv_id = await server.services.pool.fetchval(
        "SELECT id FROM conversations WHERE channel = 'voice' AND address = $1", report.call_sid
    )
    assert row["conversation_id"] == conv_id and row["notice"] == NOTICE
    assert row["duration_s"] == pytest.approx(left.size / RATE)
    assert abs(row["duration_s"] - report.duration_ms / 1000) < 1.5
    assert row["expires_at"] - row["created_at"] == timedelta(days=30)
    assert row["redacted_spans"] == 1

    # Aligned: the bot's first audio is where the caller got it.
    bot_voiced, caller_voiced = voiced_frames(right), voiced_frames(left)
    assert report.greeting.first_bot_audio_ms is not None
    offset = bot_voiced[0] - report.greeting.first_bot_audio_ms / 1000
    assert -0.1 < offset < 0.6, offset
    assert caller_voiced[0] > bot_voiced[0]  # the bot spoke first

    # The caller was told first: the recording notice, then the greeting.
    notice = await transcribe(server, window(right, bot_voiced[0] - 0.1, bot_voiced[0] + 1.8))
    assert "record" in notice, notice  # recorded / recording: a keyword, not one exact transcript
    conv = (await server.http.get(f"/api/supervisor/conversations/{conv_id}")).json()
    bots = [m["body"] for m in conv["messages"] if m["sender"] == "bot"]
    assert all(NOTICE not in b for b in bots)  # said by the call, not a stored turn of the core
    assert conv["recording"] == {
        "url": f"/api/supervisor/conversations/{conv_id}/recording",
        "duration_s": round(row["duration_s"], 1),
        "expires_at": row["expires_at"].isoformat(),
    }

    def at(ms: float | None) -> float:
        assert ms is not None
        return ms / 1000 + offset

    barge, card, bye = report.turns[:3]
    # Caller energy on the left while the caller spoke.
    for turn in (barge, bye):
        assert rms(window(left, at(turn.caller_start_ms) + 0.15, at(turn.caller_end_ms) - 0.15)) > VOICED, (
            turn
        )
    # Bot energy on the right while the bot spoke: the greeting, and the answer to the question.
    assert rms(window(right, bot_voiced[0], bot_voiced[0] + 1.5)) > VOICED
    assert barge.first_bot_audio_ms is not None
    answer = at(barge.first_bot_audio_ms)
    assert rms(window(right, answer, answer + 1.5)) > VOICED

    # Barged in: what the bot had queued when the line was cleared never played, and is not there.
    planned = await planned_seconds(server, f"{NOTICE} {GREETING}")
    # From just after the caller began (the bot pauses at their first sound) to where the whole
    # greeting would have ended, or the caller stopped: the bot's queued audio would be playing.
    cut_window = (
        at(barge.caller_start_ms) + 0.7,
        min(at(barge.caller_end_ms), bot_voiced[0] + planned - 0.1),
    )
    assert cut_window[1] - cut_window[0] > 0.5, cut_window
    assert np.abs(window(right, *cut_window)).max() < 100, "the cleared greeting is in the recording"

    # The card: silenced on both channels while it was read out; the caller's other words are kept.
    span = (at(card.caller_start_ms) + 0.1, at(card.caller_end_ms) - 0.1)
    assert span[1] - span[0] > 3
    assert not window(left, *span).any() and not window(right, *span).any()
    said_card = [m for m in conv["messages"] if m["sender"] == "customer" and "[redacted card]" in m["body"]]
    assert said_card, [m["body"] for m in conv["messages"]]

    # Supervisors (the server's admin client here) play the file itself.
    audio = await server.http.get(f"/api/supervisor/conversations/{conv_id}/recording")
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    assert audio.content == path.read_bytes()


async def test_expired_recordings_are_deleted_by_the_job_runner_with_their_files(
    recorded: tuple[LiveServer, FakeClock, Path],
) -> None:
    server, clock, data_dir = recorded
    recordings = server.services.recordings
    assert recordings is not None
    pool = server.services.pool
    conv_id = await pool.fetchval(
        """INSERT INTO conversations (channel, address, created_at, updated_at)
           VALUES ('voice', $1, $2, $2) RETURNING id""",
        "CA" + "e" * 32,
        clock.now(),
    )
    folder = data_dir / "recordings"
    folder.mkdir(parents=True, exist_ok=True)
    for name, expires in (
        ("old.wav", clock.now() - timedelta(seconds=1)),
        ("new.wav", clock.now() + timedelta(days=1)),
    ):
        (folder / name).write_bytes(b"RIFF")
        await pool.execute(
            """INSERT INTO recordings (conversation_id, call_sid, path, duration_s, sample_rate, notice,
                                       created_at, expires_at)
               VALUES ($1, $2, $3, 1.0, 8000, $4, $5, $6)""",
            conv_id,
            f"CA-{name}-{conv_id}",
            name,
            NOTICE,
            clock.now() - timedelta(days=30),
            expires,
        )

    await server.services.jobs.run_once()  # the periodic pass that deletes expired recordings

    kept = await pool.fetch("SELECT path FROM recordings WHERE conversation_id = $1", conv_id)
    assert [r["path"] for r in kept] == ["new.wav"]
    assert not (folder / "old.wav").exists() and (folder / "new.wav").exists()
    clock.advance(timedelta(days=2))
    assert await recordings.cleanup() >= 1
    assert not (folder / "new.wav").exists()
    assert await pool.fetchval("SELECT count(*) FROM recordings WHERE conversation_id = $1", conv_id) == 0


async def test_with_recording_off_nothing_is_stored_and_the_caller_hears_no_notice(
    database_url: str, tmp_path: Path
) -> None:
    clock = FakeClock()
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        live_server(
            database_url,
            clock=clock,
            **twilio_settings(twilio, sms_from=None),
            data_dir=tmp_path,
        ) as server,
    ):
        assert server.services.settings.record_calls is False  # the default
        await server.services.speech.start()
        c = await make_customer(server.services.pool, clock.now(), {"lamp": ("placed", "Desk lamp", 4200, 1)})
        report = await run_call(
            server.base_url,
            [Utterance(text="thanks, goodbye")],
            caller=c.phone,
            auth_token=AUTH_TOKEN,
            account_sid=ACCOUNT_SID,
            max_call_seconds=60,
        )
        print(report.format())
        assert not report.violations, report.violations
        heard = await transcribe(server, ulaw_to_pcm16(report.bot_audio[: RATE * 3]))
        assert any(w in heard for w in ("calling", "help you")) and "record" not in heard, heard
        conv_id = await server.services.pool.fetchval(
            "SELECT id FROM conversations WHERE channel = 'voice' AND address = $1", report.call_sid
        )
        # The call's session is closed once its stream row says so: nothing was kept by then.
        await wait_for(
            lambda: server.services.pool.fetchval(
                "SELECT ended_at IS NOT NULL FROM calls WHERE call_sid = $1", report.call_sid
            )
        )
        assert await recording_row(server, report.call_sid) is None
        assert not (tmp_path / "recordings").exists() or not any((tmp_path / "recordings").rglob("*.wav"))
        conv = (await server.http.get(f"/api/supervisor/conversations/{conv_id}")).json()
        assert conv["recording"] is None
        missing = await server.http.get(f"/api/supervisor/conversations/{conv_id}/recording")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "recording_not_found"


async def test_a_browser_call_is_recorded_by_the_same_session_taps(
    recorded: tuple[LiveServer, FakeClock, Path],
) -> None:
    from tests.integration.test_webrtc_calls import call, speech, until  # noqa: PLC0415 - the aiortc browser

    server, _, data_dir = recorded
    pc, mic, speaker, _, call_id = await call(server)
    try:
        await until("the greeting was heard", lambda: speaker.voiced_ms > 1000 and speaker.quiet_for(0.8))
        greeted_ms = speaker.voiced_ms
        mic.say(speech("what are your opening hours"))
        await until("the caller finished speaking", lambda: mic.said.is_set(), 15)
        await until("the answer was heard", lambda: speaker.voiced_ms > greeted_ms + 800, 30)
        hangup = await server.http.post("/webrtc/hangup", json={"call_id": call_id})
        assert hangup.status_code == 200
    finally:
        await pc.close()
    await wait_for(lambda: recording_row(server, call_id), timeout=30)
    row = await recording_row(server, call_id)
    left, right = read_stereo(data_dir / "recordings" / row["path"])
    bot_voiced, caller_voiced = voiced_frames(right), voiced_frames(left)
    assert bot_voiced.size and caller_voiced.size
    assert caller_voiced[0] > bot_voiced[0] + 1.0  # the caller spoke after the greeting
    assert caller_voiced.size * 0.02 > 0.6  # the question, on the left
    assert bot_voiced[-1] > caller_voiced[0]  # and the answer after it, on the right
    notice = await transcribe(server, window(right, bot_voiced[0] - 0.1, bot_voiced[0] + 1.8))
    assert "record" in notice, notice  # recorded / recording: a keyword, not one exact transcript
