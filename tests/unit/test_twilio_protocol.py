"""Twilio Media Streams codec: every malformed frame is a typed violation, never a crash."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest

from telephony.twilio_protocol import (
    DEFAULT_MAX_BAD_FRAMES,
    MAX_FRAME_BYTES,
    Connected,
    Dtmf,
    Event,
    Mark,
    Media,
    ProtocolViolation,
    Start,
    Stop,
    StreamDecoder,
    encode_clear,
    encode_mark,
    encode_media,
    parse_outbound,
    twilio_connected,
    twilio_dtmf,
    twilio_mark,
    twilio_media,
    twilio_start,
    twilio_stop,
)

SID = "MZ" + "1" * 32
OTHER_SID = "MZ" + "2" * 32
CALL = "CA" + "3" * 32
ACCOUNT = "AC" + "4" * 32
AUDIO = bytes(range(256))[:160]


def started(**kwargs: Any) -> StreamDecoder:
    decoder = StreamDecoder(**kwargs)
    decoder.decode(twilio_connected())
    decoder.decode(twilio_start(SID, CALL, ACCOUNT, {"conversation": "c-1"}))
    return decoder


def frame(event: str, **fields: Any) -> str:
    return json.dumps({"event": event, **fields})


def violation(decoder: StreamDecoder, data: str | bytes) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        decoder.decode(data)
    return info.value


def assert_violation(decoder: StreamDecoder, data: str | bytes, reason: str, fatal: bool) -> None:
    error = violation(decoder, data)
    assert (error.reason, error.fatal) == (reason, fatal), str(error)


# --- a good call round-trips through the Twilio-side builders --------------------------------


def test_a_whole_stream_round_trips_through_the_builders_and_the_decoder() -> None:
    decoder = StreamDecoder()
    assert not decoder.started and decoder.stream_sid is None
    events = [
        decoder.decode(twilio_connected()),
        decoder.decode(twilio_start(SID, CALL, ACCOUNT, {"conversation": "c-1", "lang": "en"})),
        decoder.decode(twilio_media(SID, 2, 1, 0, AUDIO)),
        decoder.decode(twilio_dtmf(SID, 3, "#")),
        decoder.decode(twilio_media(SID, 4, 2, 20, b"\x7f")),
        decoder.decode(twilio_mark(SID, 5, "reply-1")),
        decoder.decode(twilio_stop(SID, 6, ACCOUNT, CALL)),
    ]
    assert events == [
        Connected(protocol="Call", version="1.0.0"),
        Start(
            stream_sid=SID,
            call_sid=CALL,
            account_sid=ACCOUNT,
            tracks=("inbound",),
            custom_parameters={"conversation": "c-1", "lang": "en"},
            encoding="audio/x-mulaw",
            sample_rate=8000,
            channels=1,
            sequence_number=1,
        ),
        Media(SID, AUDIO, timestamp_ms=0, chunk=1, track="inbound", sequence_number=2),
        Dtmf(SID, "#", 3),
        Media(SID, b"\x7f", timestamp_ms=20, chunk=2, track="inbound", sequence_number=4),
        Mark(SID, "reply-1", 5),
        Stop(SID, CALL, 6),
    ]
    assert decoder.started and decoder.closed
    assert decoder.stream_sid == SID and decoder.call_sid == CALL
    assert decoder.bad_frames == 0


def test_builders_produce_twilios_shapes_with_numbers_as_strings() -> None:
    assert json.loads(twilio_connected()) == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    media = json.loads(twilio_media(SID, 7, 6, 100, b"\x00\xff"))
    assert media == {
        "event": "media",
        "sequenceNumber": "7",
        "media": {"track": "inbound", "chunk": "6", "timestamp": "100", "payload": "AP8="},
        "streamSid": SID,
    }
    start = json.loads(twilio_start(SID, CALL, ACCOUNT, {"k": "v"}))
    assert start["streamSid"] == start["start"]["streamSid"] == SID
    assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert json.loads(twilio_dtmf(SID, 3, "5"))["dtmf"] == {"track": "inbound_track", "digit": "5"}
    assert json.loads(twilio_stop(SID, 9, ACCOUNT, CALL))["stop"] == {"accountSid": ACCOUNT, "callSid": CALL}


@pytest.mark.parametrize("size", [1, 3, 159, 161, 4001, 40000])
def test_payloads_of_any_size_and_odd_length_are_accepted(size: int) -> None:
    audio = bytes(i % 256 for i in range(size))
    event = started().decode(twilio_media(SID, 2, 1, 0, audio))
    assert isinstance(event, Media) and event.payload == audio


def test_a_frame_of_exactly_64_kib_is_accepted() -> None:
    text = twilio_media(SID, 2, 1, 0, AUDIO)
    text = text + " " * (MAX_FRAME_BYTES - len(text))
    assert len(text.encode()) == MAX_FRAME_BYTES
    assert isinstance(started().decode(text), Media)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("123", 123), (123, 123), (" 42 ", 42), (7.0, 7), ("abc", None), ("", None), (-1, None), ("-1", None),
     (1.5, None), (True, None), (None, None), ([1], None), ("1e3", None), ("9" * 40, None)],
)  # fmt: skip
def test_numbers_are_parsed_leniently(value: Any, expected: int | None) -> None:
    message = json.loads(twilio_media(SID, 2, 1, 0, AUDIO))
    message["sequenceNumber"] = value
    message["media"]["timestamp"] = value
    message["media"]["chunk"] = value
    event = started().decode(json.dumps(message))
    assert isinstance(event, Media)
    assert event.sequence_number == event.timestamp_ms == event.chunk == expected


def test_missing_informational_fields_become_none() -> None:
    decoder = StreamDecoder()
    start = decoder.decode(frame("start", streamSid=SID, start={"callSid": CALL}))
    assert start == Start(SID, CALL, None, (), {}, None, None, None, None)
    media = decoder.decode(frame("media", streamSid=SID, media={"payload": "AA=="}))
    assert media == Media(SID, b"\x00", None, None, None, None)
    assert decoder.decode(frame("connected")) == Connected(None, None)


def test_stream_sid_may_come_from_the_start_body_alone() -> None:
    decoder = StreamDecoder()
    decoder.decode(frame("start", start={"streamSid": SID, "callSid": CALL}))
    assert decoder.stream_sid == SID


def test_stop_before_start_is_accepted_and_closes_the_decoder() -> None:
    decoder = StreamDecoder()
    assert decoder.decode(frame("stop", streamSid=SID)) == Stop(SID, None, None)
    assert decoder.closed


def test_stop_without_a_body_uses_the_call_sid_from_start() -> None:
    decoder = started()
    assert decoder.decode(frame("stop", streamSid=SID, sequenceNumber="9")) == Stop(SID, CALL, 9)


def test_custom_parameters_are_copied_and_start_stays_hashable() -> None:
    params = {"a": "1"}
    event = StreamDecoder().decode(twilio_start(SID, CALL, ACCOUNT, params))
    assert isinstance(event, Start)
    params["a"] = "changed"
    assert event.custom_parameters == {"a": "1"}
    hash(event)


# --- malformed frames: exact reason and fatality ----------------------------------------------


@pytest.mark.parametrize("data", [b"{}", bytearray(b"\x00\x01"), b""])
def test_binary_frames_are_fatal(data: bytes) -> None:
    assert_violation(started(), data, "binary_frame", True)


def test_memoryview_and_other_non_text_frames_are_fatal_binary_frames() -> None:
    assert_violation(started(), memoryview(b"{}"), "binary_frame", True)  # type: ignore[arg-type]
    assert_violation(started(), None, "binary_frame", True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data", ["x" * (MAX_FRAME_BYTES + 1), "é" * (MAX_FRAME_BYTES // 2 + 1), "\ud800" * 22000]
)
def test_frames_over_64_kib_are_fatal(data: str) -> None:
    assert_violation(started(), data, "frame_too_large", True)


@pytest.mark.parametrize("data", ["", "   ", "not json", "{", '{"event": "media",}', "[" * 60000, "NaN]"])
def test_invalid_json_is_not_fatal(data: str) -> None:
    assert_violation(started(), data, "invalid_json", False)


@pytest.mark.parametrize("data", ["[]", "1", '"media"', "null", "true", '[{"event": "media"}]'])
def test_json_that_is_not_an_object_is_not_fatal(data: str) -> None:
    assert_violation(started(), data, "not_object", False)


@pytest.mark.parametrize(
    "data", ["{}", '{"event": null}', '{"event": 5}', '{"event": ["media"]}', '{"Event": "media"}']
)
def test_missing_or_non_string_event_is_not_fatal(data: str) -> None:
    assert_violation(started(), data, "missing_event", False)


@pytest.mark.parametrize("name", ["hello", "MEDIA", "", "clear", "transcription"])
def test_unknown_events_are_not_fatal(name: str) -> None:
    assert_violation(started(), frame(name, streamSid=SID), "unknown_event", False)


@pytest.mark.parametrize(
    "data",
    [twilio_media(SID, 1, 1, 0, AUDIO), twilio_dtmf(SID, 1, "1"), twilio_mark(SID, 1, "m")],
)
def test_media_dtmf_and_mark_before_start_are_not_fatal(data: str) -> None:
    decoder = StreamDecoder()
    decoder.decode(twilio_connected())
    assert_violation(decoder, data, "media_before_start", False)
    assert not decoder.started


@pytest.mark.parametrize(
    "data",
    [
        twilio_media(OTHER_SID, 2, 1, 0, AUDIO),
        twilio_dtmf(OTHER_SID, 2, "1"),
        twilio_mark(OTHER_SID, 2, "m"),
        twilio_stop(OTHER_SID, 2, ACCOUNT, CALL),
    ],
)
def test_a_stream_sid_other_than_the_started_one_is_not_fatal(data: str) -> None:
    decoder = started()
    assert_violation(decoder, data, "wrong_stream_sid", False)
    assert not decoder.closed


def test_a_second_start_is_not_fatal_and_keeps_the_first_stream() -> None:
    decoder = started()
    assert_violation(decoder, twilio_start(OTHER_SID, CALL, ACCOUNT, {}), "duplicate_start", False)
    assert decoder.stream_sid == SID


def test_frames_after_stop_are_not_fatal() -> None:
    decoder = started()
    decoder.decode(twilio_stop(SID, 3, ACCOUNT, CALL))
    for data in (twilio_media(SID, 4, 3, 40, AUDIO), twilio_stop(SID, 5, ACCOUNT, CALL), twilio_connected()):
        assert_violation(decoder, data, "after_stop", False)


def media_with(**body: Any) -> str:
    return frame("media", streamSid=SID, media=body)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (media_with(payload="!!!!"), "bad_base64"),
        (media_with(payload="AAA"), "bad_base64"),  # missing padding
        (media_with(payload="AA==\n"), "bad_base64"),
        (media_with(payload="ÿÿÿÿ"), "bad_base64"),  # not ASCII
        (media_with(payload="A==="), "bad_base64"),
        (media_with(payload=""), "empty_payload"),
        (media_with(payload="===="), "bad_base64"),
        (media_with(payload=None), "bad_field"),
        (media_with(payload=123), "bad_field"),
        (media_with(), "bad_field"),
        (frame("media", streamSid=SID), "bad_field"),
        (frame("media", streamSid=SID, media="AAAA"), "bad_field"),
        (frame("media", media={"payload": "AAAA"}), "bad_field"),  # no streamSid
        (frame("media", streamSid=5, media={"payload": "AAAA"}), "bad_field"),
        (frame("dtmf", streamSid=SID, dtmf={"digit": "x"}), "bad_field"),
        (frame("dtmf", streamSid=SID, dtmf={"digit": "12"}), "bad_field"),
        (frame("dtmf", streamSid=SID, dtmf={"digit": 1}), "bad_field"),
        (frame("dtmf", streamSid=SID, dtmf={}), "bad_field"),
        (frame("dtmf", streamSid=SID), "bad_field"),
        (frame("mark", streamSid=SID, mark={}), "bad_field"),
        (frame("mark", streamSid=SID, mark={"name": ""}), "bad_field"),
        (frame("mark", streamSid=SID, mark={"name": 3}), "bad_field"),
        (frame("mark", streamSid=SID, mark=None), "bad_field"),
        (frame("stop"), "bad_field"),
        (frame("stop", streamSid=""), "bad_field"),
    ],
)
def test_bad_fields_after_start_are_not_fatal(data: str, reason: str) -> None:
    decoder = started()
    assert_violation(decoder, data, reason, False)
    assert not decoder.closed


@pytest.mark.parametrize(
    "data",
    [
        frame("start", streamSid=SID),
        frame("start", streamSid=SID, start=[]),
        frame("start", streamSid=SID, start={}),
        frame("start", streamSid=SID, start={"callSid": 5}),
        frame("start", streamSid=SID, start={"callSid": ""}),
        frame("start", start={"callSid": CALL}),  # no streamSid anywhere
        frame("start", streamSid=SID, start={"callSid": CALL, "streamSid": OTHER_SID}),
        frame("start", streamSid=SID, start={"callSid": CALL, "customParameters": ["a"]}),
        frame("start", streamSid=SID, start={"callSid": CALL, "customParameters": {"a": 1}}),
    ],
)
def test_bad_start_frames_are_not_fatal_and_leave_the_stream_unstarted(data: str) -> None:
    decoder = StreamDecoder()
    assert_violation(decoder, data, "bad_field", False)
    assert not decoder.started and decoder.stream_sid is None
    decoder.decode(twilio_start(SID, CALL, ACCOUNT, {}))
    assert decoder.started


def test_violation_details_never_echo_payloads_or_parameters() -> None:
    secret = "4111111111111111"
    decoder = started()
    errors = [
        violation(decoder, frame(secret)),
        violation(decoder, media_with(payload=secret + "!")),
        violation(
            decoder, frame("start", streamSid=SID, start={"callSid": CALL, "customParameters": {secret: 1}})
        ),
        violation(decoder, secret),
    ]
    assert all(secret not in str(error) for error in errors)


# --- the bad-frame budget ----------------------------------------------------------------------


def test_the_default_budget_tolerates_fifty_bad_frames_then_the_next_is_fatal() -> None:
    decoder = started()
    for _ in range(DEFAULT_MAX_BAD_FRAMES):
        assert_violation(decoder, "garbage", "invalid_json", False)
    assert decoder.bad_frames == DEFAULT_MAX_BAD_FRAMES
    assert_violation(decoder, "garbage", "too_many_bad_frames", True)
    assert decoder.bad_frames == DEFAULT_MAX_BAD_FRAMES + 1


def test_the_budget_counts_bad_frames_in_total_not_consecutively() -> None:
    decoder = started(max_bad_frames=3)
    for seq in range(3):
        assert_violation(decoder, "{}", "missing_event", False)
        assert isinstance(decoder.decode(twilio_media(SID, seq + 2, seq + 1, 20 * seq, AUDIO)), Media)
    error = violation(decoder, "{}")
    assert (error.reason, error.fatal) == ("too_many_bad_frames", True)
    assert "missing_event" in error.detail


def test_a_zero_budget_makes_every_violation_fatal() -> None:
    assert_violation(started(max_bad_frames=0), twilio_dtmf(OTHER_SID, 2, "1"), "too_many_bad_frames", True)
    with pytest.raises(ValueError):
        StreamDecoder(max_bad_frames=-1)


def test_after_a_fatal_violation_even_good_frames_fail_with_the_same_reason() -> None:
    decoder = started()
    assert_violation(decoder, b"\x00", "binary_frame", True)
    assert_violation(decoder, twilio_media(SID, 2, 1, 0, AUDIO), "binary_frame", True)


# --- app -> Twilio encoders --------------------------------------------------------------------


def test_encoders_produce_exactly_twilios_json() -> None:
    media = '{"event":"media","streamSid":"MZ1","media":{"payload":"AP9/"}}'
    assert encode_media("MZ1", b"\x00\xff\x7f") == media
    assert encode_mark("MZ1", "reply-1") == '{"event":"mark","streamSid":"MZ1","mark":{"name":"reply-1"}}'
    assert encode_clear("MZ1") == '{"event":"clear","streamSid":"MZ1"}'


def test_encoded_media_payload_is_the_raw_mulaw_in_base64() -> None:
    message = json.loads(encode_media(SID, AUDIO))
    assert base64.b64decode(message["media"]["payload"]) == AUDIO


def test_encoders_refuse_what_twilio_could_not_use() -> None:
    with pytest.raises(ValueError):
        encode_media("", AUDIO)
    with pytest.raises(ValueError):
        encode_media(SID, b"")
    with pytest.raises(ValueError):
        encode_mark(SID, "")
    with pytest.raises(ValueError):
        encode_clear("")


def test_parse_outbound_accepts_what_the_encoders_produce() -> None:
    assert (
        parse_outbound(encode_media(SID, AUDIO), stream_sid=SID)["media"]["payload"]
        == base64.b64encode(AUDIO).decode()
    )
    assert parse_outbound(encode_mark(SID, "m1"), stream_sid=SID) == {
        "event": "mark",
        "streamSid": SID,
        "mark": {"name": "m1"},
    }
    assert parse_outbound(encode_clear(SID)) == {"event": "clear", "streamSid": SID}


@pytest.mark.parametrize(
    "data",
    [
        b'{"event":"clear","streamSid":"MZ"}',
        "not json",
        "[]",
        '{"streamSid":"MZ1"}',
        '{"event":"start","streamSid":"MZ1"}',
        '{"event":"clear"}',
        '{"event":"clear","streamSid":""}',
        '{"event":"clear","streamSid":5}',
        '{"event":"clear","streamSid":"MZ1","extra":1}',
        '{"event":"media","streamSid":"MZ1"}',
        '{"event":"media","streamSid":"MZ1","media":{}}',
        '{"event":"media","streamSid":"MZ1","media":{"payload":""}}',
        '{"event":"media","streamSid":"MZ1","media":{"payload":"!!"}}',
        '{"event":"media","streamSid":"MZ1","media":{"payload":"AAAA","track":"outbound"}}',
        '{"event":"media","streamSid":"MZ1","media":"AAAA"}',
        '{"event":"mark","streamSid":"MZ1","mark":{}}',
        '{"event":"mark","streamSid":"MZ1","mark":{"name":7}}',
    ],
)
def test_parse_outbound_rejects_what_twilio_would_reject(data: str | bytes) -> None:
    with pytest.raises(ValueError):
        parse_outbound(data)


def test_parse_outbound_rejects_a_wrong_stream_sid() -> None:
    with pytest.raises(ValueError, match="wrong streamSid"):
        parse_outbound(encode_clear(OTHER_SID), stream_sid=SID)


# --- fuzz: nothing but ProtocolViolation escapes ------------------------------------------------

EVENTS = ["connected", "start", "media", "dtmf", "mark", "stop", "clear", "x"]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**70, rng.randrange(-(10**6), 10**6)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, float("inf"), float("nan"), 3.0])
    if kind in (4, 5):
        return rng.choice(
            ["", SID, CALL, "1", "#", "AAAA", "====", "é", "\ud800", "\x00", "12", rng.randbytes(6).hex()]
        )
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["payload", "digit", "name", "callSid", "streamSid", "k"]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}  # fmt: skip


def random_message(rng: random.Random) -> Any:
    message: dict[str, Any] = {"event": rng.choice(EVENTS)}
    for key in ("streamSid", "sequenceNumber", "start", "media", "dtmf", "mark", "stop", "protocol"):
        if rng.random() < 0.5:
            message[key] = random_value(rng)
    if rng.random() < 0.3:
        message["streamSid"] = SID
    if rng.random() < 0.3:
        message["media"] = {"payload": rng.choice(["AAAA", "", "A", "ÿ", random_value(rng)]),
                            "timestamp": random_value(rng), "chunk": random_value(rng)}  # fmt: skip
    if rng.random() < 0.2:
        message["start"] = {"callSid": random_value(rng), "customParameters": random_value(rng),
                            "mediaFormat": random_value(rng), "tracks": random_value(rng)}  # fmt: skip
    return message


def mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(3)
        position = rng.randrange(len(chars) + 1)
        if op == 0 and chars:
            del chars[min(position, len(chars) - 1)]
        elif op == 1:
            chars.insert(position, rng.choice('{}[]",:\\0aé\ud800 '))
        else:
            chars = chars[:position]
    return "".join(chars)


def random_frame(rng: random.Random) -> Any:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(64))
    if kind == 1:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(64)))
    if kind == 2:
        return rng.randbytes(rng.randrange(64)).decode("latin-1")
    if kind == 3:
        good = rng.choice([twilio_media(SID, 2, 1, 0, AUDIO), twilio_start(SID, CALL, ACCOUNT, {"a": "b"}),
                           twilio_dtmf(SID, 3, "1"), twilio_mark(SID, 4, "m"), twilio_stop(SID, 5, ACCOUNT, CALL)])  # fmt: skip
        return mutate(rng, good)
    try:
        return json.dumps(random_message(rng))
    except ValueError:  # nan/inf are fine for json.dumps; a surrogate is fine too: never here
        return "{}"


def test_fuzzed_frames_raise_nothing_but_protocol_violations() -> None:
    rng = random.Random(20240601)
    outcomes: dict[str, int] = {}
    for case in range(2000):
        decoder = started(max_bad_frames=10**6) if case % 2 else StreamDecoder(max_bad_frames=10**6)
        data = random_frame(rng)
        try:
            event: Event = decoder.decode(data)
        except ProtocolViolation as error:
            assert isinstance(error.reason, str) and isinstance(error.fatal, bool)
            outcomes[error.reason] = outcomes.get(error.reason, 0) + 1
        else:
            assert isinstance(event, Connected | Start | Media | Dtmf | Mark | Stop)
            outcomes[type(event).__name__] = outcomes.get(type(event).__name__, 0) + 1
    # The fuzzer reached deep paths, not only the JSON parser.
    assert {"invalid_json", "bad_field", "binary_frame", "Media"} <= set(outcomes), outcomes
