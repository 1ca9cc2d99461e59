"""The pure parts of the simulated Twilio caller: TwiML, the wss->ws rule, playout, speech, CLI."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from telephony.simulator import (
    PlayoutBuffer,
    TwimlError,
    Utterance,
    add_arguments,
    load_script,
    load_wav,
    media_socket_url,
    parse_stream_twiml,
    render_tts,
    script_from_args,
    trim_silence,
)
from telephony.voice_twiml import connect_stream
from voice.audio import pcm16_to_wav, ulaw_to_pcm16

FRAME = bytes([0x7F]) * 160  # 20 ms of mu-law


# --- TwiML ---------------------------------------------------------------------------------


def test_stream_url_and_parameters_are_read_from_connect_stream_twiml() -> None:
    xml = connect_stream(
        "wss://cc.example.com/twilio/media", {"caller": "+15550100001", "callSid": "CA" + "1" * 32}
    )

    target = parse_stream_twiml(xml)

    assert target.url == "wss://cc.example.com/twilio/media"
    assert target.parameters == {"caller": "+15550100001", "callSid": "CA" + "1" * 32}


def test_parameters_keep_document_order_and_escaped_values() -> None:
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="ws://127.0.0.1:9/twilio/media">'
        '<Parameter name="b" value="x &amp; y"/><Parameter name="a" value=""/></Stream></Connect></Response>'
    )

    target = parse_stream_twiml(xml)

    assert list(target.parameters.items()) == [("b", "x & y"), ("a", "")]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("not xml at all", "did not answer XML"),
        ("<Response><Say>Hello</Say></Response>", "no <Response><Connect><Stream>"),
        ('<Response><Start><Stream url="wss://h/x"/></Start></Response>', "no <Response><Connect><Stream>"),
        ('<Response><Connect><Stream url="https://h/x"/></Connect></Response>', "absolute wss://"),
        ('<Response><Connect><Stream url="/twilio/media"/></Connect></Response>', "absolute wss://"),
        ('<Response><Connect><Stream url="wss://h/x?call=1"/></Connect></Response>', "no query string"),
        (
            '<Response><Connect><Stream url="wss://h/x"><Parameter value="1"/></Stream></Connect></Response>',
            "no name",
        ),
    ],
)
def test_twiml_that_would_not_reach_the_bot_is_refused_with_a_reason(xml: str, message: str) -> None:
    with pytest.raises(TwimlError, match=message.replace("?", r"\?")):
        parse_stream_twiml(xml)


@pytest.mark.parametrize(
    ("stream_url", "base_url", "expected"),
    [
        ("wss://127.0.0.1:8080/twilio/media", "http://127.0.0.1:8080", "ws://127.0.0.1:8080/twilio/media"),
        (
            "wss://localhost:9000/p/twilio/media",
            "HTTP://localhost:9000/p",
            "ws://localhost:9000/p/twilio/media",
        ),
        ("ws://127.0.0.1:8080/twilio/media", "http://127.0.0.1:8080", "ws://127.0.0.1:8080/twilio/media"),
        ("wss://cc.example.com/twilio/media", "https://cc.example.com", "wss://cc.example.com/twilio/media"),
        ("ws://127.0.0.1:8080/twilio/media", "https://cc.example.com", "ws://127.0.0.1:8080/twilio/media"),
    ],
)
def test_wss_stream_url_is_opened_as_ws_only_for_a_plain_http_base(
    stream_url: str, base_url: str, expected: str
) -> None:
    assert media_socket_url(stream_url, base_url) == expected


# --- playout accounting on a fake clock ----------------------------------------------------


def test_audio_plays_back_to_back_from_arrival() -> None:
    playout = PlayoutBuffer()

    assert playout.add_audio(10.0, FRAME * 5) == 10.0  # 100 ms
    assert playout.add_audio(10.02, FRAME) == pytest.approx(10.1)  # queued behind the first

    assert playout.is_playing(10.119)
    assert not playout.is_playing(10.12)
    assert playout.add_audio(11.0, FRAME) == 11.0  # the line was idle: plays at once


def test_mark_is_echoed_only_after_the_audio_before_it_has_played() -> None:
    playout = PlayoutBuffer()
    playout.add_audio(0.0, FRAME * 25)  # 0.5 s
    playout.add_mark(0.0, "first")
    playout.add_audio(0.01, FRAME * 25)
    playout.add_mark(0.01, "second")

    assert playout.due_marks(0.3) == []
    assert playout.due_marks(0.49) == []
    assert playout.due_marks(0.5) == ["first"]
    assert playout.due_marks(0.99) == []
    assert playout.due_marks(1.0) == ["second"]
    assert playout.due_marks(5.0) == []


def test_mark_with_nothing_queued_before_it_is_due_at_once() -> None:
    playout = PlayoutBuffer()
    playout.add_mark(3.0, "idle")

    assert playout.due_marks(3.0) == ["idle"]


def test_marks_come_back_in_the_order_they_were_sent() -> None:
    playout = PlayoutBuffer()
    playout.add_audio(0.0, FRAME)
    for name in ("a", "b", "c"):
        playout.add_mark(0.0, name)

    assert playout.due_marks(1.0) == ["a", "b", "c"]


def test_clear_echoes_pending_marks_at_once_and_drops_unplayed_audio() -> None:
    playout = PlayoutBuffer()
    playout.add_audio(0.0, FRAME * 25, tag=1)
    playout.add_mark(0.0, "half")
    playout.add_audio(0.0, FRAME * 25, tag=1)
    playout.add_mark(0.0, "end")
    assert playout.due_marks(0.5) == ["half"]

    assert playout.clear(0.7) == ["end"]

    assert not playout.is_playing(0.7)
    assert playout.due_marks(10.0) == []
    assert playout.heard_seconds(1) == pytest.approx(0.7)
    [(start, audio, tag)] = playout.segments()
    assert (start, len(audio), tag) == (0.0, 5600, 1)


def test_audio_after_a_clear_plays_at_once() -> None:
    playout = PlayoutBuffer()
    playout.add_audio(0.0, FRAME * 50)
    playout.clear(0.2)

    assert playout.add_audio(0.3, FRAME, tag=2) == 0.3
    playout.add_mark(0.3, "after")
    assert playout.due_marks(0.32) == ["after"]


def test_clear_with_nothing_pending_changes_nothing() -> None:
    playout = PlayoutBuffer()
    playout.add_audio(0.0, FRAME * 5)

    assert playout.clear(1.0) == []
    assert playout.heard_seconds() == pytest.approx(0.1)


def test_heard_time_counts_only_what_played_by_then_per_tag() -> None:
    playout = PlayoutBuffer()
    playout.add_audio(0.0, FRAME * 10, tag=0)  # 0.0 - 0.2
    playout.add_audio(0.0, FRAME * 10, tag=1)  # 0.2 - 0.4

    assert playout.heard_seconds(0, until=0.1) == pytest.approx(0.1)
    assert playout.heard_seconds(1, until=0.3) == pytest.approx(0.1)
    playout.retag(1, 0)
    assert playout.heard_seconds(0) == pytest.approx(0.4)


def test_instant_playout_echoes_marks_on_arrival_but_keeps_audio_back_to_back() -> None:
    playout = PlayoutBuffer(instant=True)
    playout.add_audio(0.0, FRAME * 50)
    playout.add_mark(0.0, "m")

    assert playout.due_marks(0.0) == ["m"]
    assert not playout.is_playing(0.0)
    assert playout.add_audio(0.1, FRAME) == pytest.approx(1.0)
    assert playout.clear(0.2) == []
    assert playout.heard_seconds(until=0.2) == pytest.approx(1.02)  # all of it counts as heard


# --- speech --------------------------------------------------------------------------------


def test_trim_silence_cuts_silence_around_speech() -> None:
    tone = (8000 * np.sin(np.arange(800) * 2 * np.pi * 440 / 8000)).astype(np.int16)  # 100 ms
    pcm = np.concatenate([np.zeros(4000, np.int16), tone, np.zeros(4000, np.int16)])

    trimmed = trim_silence(pcm)

    assert 800 <= trimmed.size <= 800 + 4 * 80  # the tone plus up to 20 ms each side


def test_trim_silence_keeps_pure_silence_as_is() -> None:
    silence = np.zeros(800, np.int16)
    assert trim_silence(silence).size == 800


def test_render_tts_gives_8khz_mulaw_of_plausible_length(tmp_path: Path) -> None:
    text = "I would like a refund for order one thousand and two."

    ulaw = render_tts(text, cache_dir=tmp_path)

    seconds = len(ulaw) / 8000  # one mu-law byte per 8 kHz sample
    assert 1.5 < seconds < 6.0
    pcm = ulaw_to_pcm16(ulaw)
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 300  # speech, with silence trimmed
    assert render_tts(text) is ulaw  # cached in memory
    assert [p.suffix for p in tmp_path.iterdir()] == [".ulaw"]  # and on disk


def test_longer_text_renders_longer_audio() -> None:
    short = render_tts("Yes.")
    long = render_tts("Yes, please cancel the order and refund the full amount to my card.")
    assert len(short) < len(long) / 3


# --- script and command line ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"text": "a", "dtmf": "1"},
        {"text": "  "},
        {"dtmf": "12a"},
        {"dtmf": ""},
        {"text": "a", "pause_ms": -1},
    ],
)
def test_utterance_needs_exactly_one_valid_thing_to_do(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Utterance(**kwargs)


def test_steps_from_the_command_line_keep_their_order(tmp_path: Path) -> None:
    script = tmp_path / "call.yaml"
    script.write_text(
        "- say: from the script\n  barge_in_after_ms: 300\n- dtmf: '#'\n- hello\n- wav: hi.wav\n"
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    ns = parser.parse_args(
        [
            "--say",
            "one",
            "--dtmf",
            "12",
            "--script",
            str(script),
            "--wav",
            "x.wav",
            "--say",
            "two",
            "--record",
            "o.wav",
        ]
    )

    assert [(u.label, u.barge_in_after_ms) for u in script_from_args(ns)] == [
        ("one", None),
        ("[dtmf 12]", None),
        ("from the script", 300),
        ("[dtmf #]", None),
        ("hello", None),
        ("[wav hi.wav]", None),
        ("[wav x.wav]", None),
        ("two", None),
    ]
    assert load_script(script)[3].wav == tmp_path / "hi.wav"  # relative to the script
    assert ns.url == "http://127.0.0.1:8080" and ns.auth_token is None and ns.record == Path("o.wav")


def test_no_steps_is_an_empty_script() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert script_from_args(parser.parse_args([])) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("say: not a list\n", "expected a YAML list"),
        ("- {say: hi, shout: yes}\n", "unknown keys"),
        ("- {say: hi, dtmf: '1'}\n", "exactly one of"),
        ("- [1, 2]\n", "expected a mapping"),
        ("- say: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_script_files_name_the_step_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_script(path)


def test_wav_file_is_loaded_as_trimmed_8khz_mulaw(tmp_path: Path) -> None:
    rate = 16000
    tone = (6000 * np.sin(np.arange(rate // 2) * 2 * np.pi * 300 / rate)).astype(np.int16)  # 0.5 s
    path = tmp_path / "tone.wav"
    path.write_bytes(pcm16_to_wav(np.concatenate([np.zeros(rate, np.int16), tone]), rate))

    ulaw = load_wav(path)

    assert 4000 <= len(ulaw) <= 4000 + 2 * 160
