"""Twilio bidirectional Media Streams wire format: a hardened, pure codec (no I/O).

Twilio -> app: one :class:`StreamDecoder` per WebSocket turns each frame into a typed event or
raises :class:`ProtocolViolation`. App -> Twilio: :func:`encode_media`, :func:`encode_mark`,
:func:`encode_clear`. The Twilio side, for the call simulator and tests: the ``twilio_*``
builders and :func:`parse_outbound`.

Field rules, so a slightly odd frame never costs a call:

* Fields closeloop acts on are required and type-checked: ``streamSid``, ``start.callSid``,
  ``start.customParameters`` (an object of strings; may be absent), ``media.payload``,
  ``dtmf.digit`` and ``mark.name``. A missing or mistyped one is a ``bad_field`` violation.
* Informational fields are lenient. Numbers arrive as strings: ``"123"`` and ``123`` both parse;
  anything else (or a missing field) becomes ``None``. Informational strings of the wrong type
  become ``None`` as well.

Bad-frame budget: the decoder counts the *total* number of violations over the socket's life,
not consecutive ones. A real Twilio sends none, and a total count also stops a peer that slips a
good frame between bad ones from keeping a session open while it floods the logs. Violations
number 1..``max_bad_frames`` are non-fatal (drop the frame, log ``reason``); the next one is
raised as fatal ``too_many_bad_frames``. Details in violations name fields and types, never
payloads or parameter values, so they are safe to log.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

MAX_FRAME_BYTES = 65536
"""Largest text frame accepted, in UTF-8 bytes (64 KiB)."""

DEFAULT_MAX_BAD_FRAMES = 50
"""Non-fatal violations tolerated per socket before the next one is fatal."""

DTMF_DIGITS = frozenset("0123456789*#")

_DIGITS = re.compile(r"[0-9]{1,18}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


class ProtocolViolation(Exception):
    """A frame Twilio would never send, or one that is illegal in the current state.

    Attributes:
        reason: stable code for logs and metrics: ``invalid_json``, ``not_object``,
            ``missing_event``, ``unknown_event``, ``bad_field``, ``bad_base64``,
            ``empty_payload``, ``media_before_start``, ``wrong_stream_sid``, ``duplicate_start``,
            ``after_stop`` (non-fatal unless the budget is spent); ``frame_too_large``,
            ``binary_frame``, ``too_many_bad_frames`` (fatal).
        detail: a short explanation naming fields and types, never content.
        fatal: True when the caller must close the WebSocket; False when it drops the frame.
    """

    def __init__(self, reason: str, detail: str = "", *, fatal: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class Connected:
    """First message on a stream; carries no call data."""

    protocol: str | None
    version: str | None


@dataclass(frozen=True, slots=True)
class Start:
    """Stream metadata. ``custom_parameters`` are the TwiML ``<Parameter>``s, as sent."""

    stream_sid: str
    call_sid: str
    account_sid: str | None
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str] = field(hash=False)
    encoding: str | None
    sample_rate: int | None
    channels: int | None
    sequence_number: int | None


@dataclass(frozen=True, slots=True)
class Media:
    """One chunk of caller audio; ``payload`` is decoded 8 kHz mu-law (any length >= 1)."""

    stream_sid: str
    payload: bytes
    timestamp_ms: int | None
    chunk: int | None
    track: str | None
    sequence_number: int | None


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A key the caller pressed: one of ``0-9``, ``*``, ``#``."""

    stream_sid: str
    digit: str
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    """Audio queued before the mark ``name`` finished playing (or was cleared)."""

    stream_sid: str
    name: str
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """The stream ended (hang-up, call update, or ``<Connect>`` left). ``call_sid`` may be None
    only for a stop that arrives before ``start`` without one."""

    stream_sid: str
    call_sid: str | None
    sequence_number: int | None = None


Event: TypeAlias = Connected | Start | Media | Dtmf | Mark | Stop


class StreamDecoder:
    """Decodes the Twilio -> app frames of one Media Streams WebSocket.

    States: before ``start`` only ``connected``, ``start`` and ``stop`` are legal; after ``start``
    every frame must carry the same ``streamSid``; after ``stop`` nothing is. A ``stop`` before
    ``start`` is accepted (it ends the stream either way). After a fatal violation every further
    call raises a fatal violation with the same reason.

    Args:
        max_bad_frames: non-fatal violations tolerated in total; the one after is fatal
            (``too_many_bad_frames``). 0 makes every violation fatal.

    Attributes:
        stream_sid: the ``streamSid`` from ``start``, None before it.
        call_sid: the ``callSid`` from ``start``, None before it.
        started: True once a valid ``start`` was decoded.
        closed: True once a ``stop`` was decoded.
        bad_frames: violations raised so far, fatal ones included.
    """

    def __init__(self, *, max_bad_frames: int = DEFAULT_MAX_BAD_FRAMES) -> None:
        if max_bad_frames < 0:
            raise ValueError("max_bad_frames must be >= 0")
        self.max_bad_frames = max_bad_frames
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.started = False
        self.closed = False
        self.bad_frames = 0
        self._failure: ProtocolViolation | None = None

    def decode(self, frame: str | bytes) -> Event:
        """Decode one WebSocket frame.

        Returns:
            The event. (Never None: every frame is either an event or a violation.)

        Raises:
            ProtocolViolation: for any frame that is malformed or illegal now. Nothing else is
                raised, whatever the input.
        """
        if self._failure is not None:
            raise ProtocolViolation(self._failure.reason, "decoder already failed", fatal=True)
        try:
            return self._decode(frame)
        except ProtocolViolation as violation:
            self.bad_frames += 1
            if not violation.fatal and self.bad_frames > self.max_bad_frames:
                violation = ProtocolViolation(
                    "too_many_bad_frames",
                    f"{self.bad_frames} bad frames (budget {self.max_bad_frames}); last was {violation.reason}",
                    fatal=True,
                )
            if violation.fatal:
                self._failure = violation
            raise violation from None

    def _decode(self, frame: object) -> Event:
        if not isinstance(frame, str):
            # Twilio only sends text (binary from the app is its error 31950).
            raise ProtocolViolation("binary_frame", f"{type(frame).__name__} frame", fatal=True)
        if _too_large(frame):
            raise ProtocolViolation("frame_too_large", f"over {MAX_FRAME_BYTES} bytes", fatal=True)
        try:
            message = json.loads(frame)
        except (ValueError, RecursionError):
            raise ProtocolViolation("invalid_json", "frame is not JSON") from None
        if not isinstance(message, dict):
            raise ProtocolViolation("not_object", f"JSON {type(message).__name__}, not an object")
        event = message.get("event")
        if not isinstance(event, str):
            raise ProtocolViolation("missing_event", "no string 'event' field")
        if self.closed:
            raise ProtocolViolation("after_stop", f"{_name(event)} after stop")
        if event == "media":
            return self._media(message)
        if event == "mark":
            return self._mark(message)
        if event == "dtmf":
            return self._dtmf(message)
        if event == "start":
            return self._start(message)
        if event == "stop":
            return self._stop(message)
        if event == "connected":
            return Connected(_str_or_none(message.get("protocol")), _str_or_none(message.get("version")))
        raise ProtocolViolation("unknown_event", f"event {_name(event)}")

    def _start(self, message: dict[str, Any]) -> Start:
        if self.started:
            raise ProtocolViolation("duplicate_start", "second start on one stream")
        body = _object(message, "start")
        top, inner = message.get("streamSid"), body.get("streamSid")
        if top is not None and inner is not None and top != inner:
            raise ProtocolViolation("bad_field", "streamSid and start.streamSid differ")
        stream_sid = _required_str({"streamSid": top if top is not None else inner}, "streamSid")
        call_sid = _required_str(body, "callSid", "start.callSid")
        params = body.get("customParameters")
        if params is None:
            params = {}
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            raise ProtocolViolation("bad_field", "start.customParameters is not an object of strings")
        tracks = body.get("tracks")
        media_format = body.get("mediaFormat")
        if not isinstance(media_format, dict):
            media_format = {}
        start = Start(
            stream_sid=stream_sid,
            call_sid=call_sid,
            account_sid=_str_or_none(body.get("accountSid")),
            tracks=tuple(t for t in tracks if isinstance(t, str)) if isinstance(tracks, list) else (),
            custom_parameters=dict(params),
            encoding=_str_or_none(media_format.get("encoding")),
            sample_rate=_int_or_none(media_format.get("sampleRate")),
            channels=_int_or_none(media_format.get("channels")),
            sequence_number=_int_or_none(message.get("sequenceNumber")),
        )
        self.started = True
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        return start

    def _media(self, message: dict[str, Any]) -> Media:
        stream_sid = self._check_stream(message, "media")
        body = _object(message, "media")
        payload = body.get("payload")
        if not isinstance(payload, str):
            raise ProtocolViolation("bad_field", "media.payload is not a string")
        if not payload:
            raise ProtocolViolation("empty_payload", "media.payload is empty")
        try:
            audio = base64.b64decode(payload, validate=True)
        except ValueError:  # binascii.Error, and non-ASCII text
            raise ProtocolViolation("bad_base64", "media.payload is not base64") from None
        if not audio:
            raise ProtocolViolation("empty_payload", "media.payload decodes to no audio")
        return Media(
            stream_sid=stream_sid,
            payload=audio,
            timestamp_ms=_int_or_none(body.get("timestamp")),
            chunk=_int_or_none(body.get("chunk")),
            track=_str_or_none(body.get("track")),
            sequence_number=_int_or_none(message.get("sequenceNumber")),
        )

    def _mark(self, message: dict[str, Any]) -> Mark:
        stream_sid = self._check_stream(message, "mark")
        name = _required_str(_object(message, "mark"), "name", "mark.name")
        return Mark(stream_sid, name, _int_or_none(message.get("sequenceNumber")))

    def _dtmf(self, message: dict[str, Any]) -> Dtmf:
        stream_sid = self._check_stream(message, "dtmf")
        digit = _object(message, "dtmf").get("digit")
        if not isinstance(digit, str) or digit not in DTMF_DIGITS:
            raise ProtocolViolation("bad_field", "dtmf.digit is not one of 0-9 * #")
        return Dtmf(stream_sid, digit, _int_or_none(message.get("sequenceNumber")))

    def _stop(self, message: dict[str, Any]) -> Stop:
        stream_sid = _required_str(message, "streamSid")
        if self.started and stream_sid != self.stream_sid:
            raise ProtocolViolation("wrong_stream_sid", "stop for another stream")
        # The stop body is informational: the stream ends whatever it holds.
        body = message.get("stop")
        call_sid = _str_or_none(body.get("callSid")) if isinstance(body, dict) else None
        self.closed = True
        return Stop(stream_sid, call_sid or self.call_sid, _int_or_none(message.get("sequenceNumber")))

    def _check_stream(self, message: dict[str, Any], event: str) -> str:
        if not self.started:
            raise ProtocolViolation("media_before_start", f"{event} before start")
        stream_sid = _required_str(message, "streamSid")
        if stream_sid != self.stream_sid:
            raise ProtocolViolation("wrong_stream_sid", f"{event} for another stream")
        return stream_sid


# --- app -> Twilio -------------------------------------------------------------------------


def encode_media(stream_sid: str, mulaw: bytes) -> str:
    """``{"event":"media","streamSid":S,"media":{"payload":B64}}`` for raw 8 kHz mu-law audio.

    Raises:
        ValueError: empty ``stream_sid`` or empty audio (Twilio has nothing to play).
    """
    _check_sid(stream_sid)
    if not mulaw:
        raise ValueError("mulaw audio is empty")
    payload = base64.b64encode(bytes(mulaw)).decode("ascii")
    return _dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}})


def encode_mark(stream_sid: str, name: str) -> str:
    """``{"event":"mark","streamSid":S,"mark":{"name":N}}``: Twilio echoes it once played.

    Raises:
        ValueError: empty ``stream_sid`` or ``name``.
    """
    _check_sid(stream_sid)
    if not isinstance(name, str) or not name:
        raise ValueError("mark name must be a non-empty string")
    return _dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def encode_clear(stream_sid: str) -> str:
    """``{"event":"clear","streamSid":S}``: drop buffered audio; pending marks come back."""
    _check_sid(stream_sid)
    return _dumps({"event": "clear", "streamSid": stream_sid})


# --- the Twilio side, for the simulator and tests ------------------------------------------


def twilio_connected() -> str:
    """The ``connected`` message Twilio sends first."""
    return _dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def twilio_start(
    stream_sid: str,
    call_sid: str,
    account_sid: str,
    custom_parameters: Mapping[str, str],
    *,
    seq: int = 1,
) -> str:
    """A ``start`` message as Twilio sends it for ``<Connect><Stream>`` (inbound track, mu-law)."""
    return _dumps(
        {
            "event": "start",
            "sequenceNumber": str(seq),
            "start": {
                "accountSid": account_sid,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": dict(custom_parameters),
            },
            "streamSid": stream_sid,
        }
    )


def twilio_media(stream_sid: str, seq: int, chunk: int, timestamp_ms: int, mulaw: bytes) -> str:
    """A ``media`` message carrying caller audio (numbers as strings, like Twilio)."""
    return _dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(timestamp_ms),
                "payload": base64.b64encode(bytes(mulaw)).decode("ascii"),
            },
            "streamSid": stream_sid,
        }
    )


def twilio_dtmf(stream_sid: str, seq: int, digit: str) -> str:
    """A ``dtmf`` message for one key press."""
    return _dumps(
        {
            "event": "dtmf",
            "streamSid": stream_sid,
            "sequenceNumber": str(seq),
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
    )


def twilio_mark(stream_sid: str, seq: int, name: str) -> str:
    """A ``mark`` message: Twilio finished playing (or cleared) audio up to mark ``name``."""
    return _dumps(
        {"event": "mark", "sequenceNumber": str(seq), "streamSid": stream_sid, "mark": {"name": name}}
    )


def twilio_stop(stream_sid: str, seq: int, account_sid: str, call_sid: str) -> str:
    """The ``stop`` message that ends a stream."""
    return _dumps(
        {
            "event": "stop",
            "sequenceNumber": str(seq),
            "streamSid": stream_sid,
            "stop": {"accountSid": account_sid, "callSid": call_sid},
        }
    )


_OUTBOUND_KEYS = {
    "media": ({"event", "streamSid", "media"}, "media", {"payload"}),
    "mark": ({"event", "streamSid", "mark"}, "mark", {"name"}),
    "clear": ({"event", "streamSid"}, None, set()),
}


def parse_outbound(frame: str | bytes, *, stream_sid: str | None = None) -> dict[str, Any]:
    """Validate an app -> Twilio message the way Twilio would, for the call simulator.

    Stricter than Twilio on one point, on purpose: unknown keys are rejected, so a typo in
    closeloop's own encoder fails a test instead of being silently ignored.

    Args:
        frame: the WebSocket frame the app sent.
        stream_sid: when given, the message must address this stream.

    Returns:
        The parsed message, unchanged (``media.payload`` is still base64 text).

    Raises:
        ValueError: binary frame (Twilio error 31950), not JSON, unknown event, missing or extra
            fields, wrong ``streamSid``, payload that is empty or not base64 (error 31951).
    """
    if not isinstance(frame, str):
        raise ValueError("31950: binary frame; Twilio accepts text frames only")
    try:
        message = json.loads(frame)
    except (ValueError, RecursionError):
        raise ValueError("31951: frame is not JSON") from None
    if not isinstance(message, dict):
        raise ValueError("31951: message is not a JSON object")
    event = message.get("event")
    if not isinstance(event, str) or event not in _OUTBOUND_KEYS:
        raise ValueError(f"31951: unknown event {_name(event)}")
    keys, body_key, body_keys = _OUTBOUND_KEYS[event]
    if set(message) != keys:
        raise ValueError(f"31951: {event} needs exactly the keys {sorted(keys)}, got {sorted(message)}")
    sid = message["streamSid"]
    if not isinstance(sid, str) or not sid:
        raise ValueError("31951: streamSid must be a non-empty string")
    if stream_sid is not None and sid != stream_sid:
        raise ValueError("31951: wrong streamSid")
    if body_key is None:
        return message
    body = message[body_key]
    if not isinstance(body, dict) or set(body) != body_keys:
        raise ValueError(f"31951: {body_key} must be an object with exactly {sorted(body_keys)}")
    value = body[next(iter(body_keys))]
    if not isinstance(value, str) or not value:
        raise ValueError(f"31951: {body_key}.{next(iter(body_keys))} must be a non-empty string")
    if event == "media":
        try:
            base64.b64decode(value, validate=True)
        except ValueError:
            raise ValueError("31951: media.payload is not base64") from None
    return message


# --- helpers ---------------------------------------------------------------------------------


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def _too_large(text: str) -> bool:
    # A character is 1-4 UTF-8 bytes: only frames in between need the encode. Lone surrogates
    # (legal in a Python str, not in UTF-8) are counted as 3 bytes instead of raising.
    if len(text) > MAX_FRAME_BYTES:
        return True
    if len(text) * 4 <= MAX_FRAME_BYTES:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES


def _name(value: object) -> str:
    """A log-safe rendering of an untrusted event name: identifiers only, never free text."""
    if isinstance(value, str) and _IDENTIFIER.fullmatch(value):
        return repr(value)
    if isinstance(value, str):
        return f"<text of {len(value)} chars>"
    return f"<{type(value).__name__}>"


def _object(message: dict[str, Any], key: str) -> dict[str, Any]:
    value = message.get(key)
    if not isinstance(value, dict):
        raise ProtocolViolation("bad_field", f"'{key}' is not an object")
    return value


def _required_str(obj: dict[str, Any], key: str, label: str | None = None) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolViolation("bad_field", f"'{label or key}' is not a non-empty string")
    return value


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int_or_none(value: object) -> int | None:
    """Lenient non-negative integer: ``"123"``, ``123`` and ``123.0`` parse; anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value.is_integer() and 0 <= value < 2**63 else None
    if isinstance(value, str):
        text = value.strip()
        return int(text) if _DIGITS.fullmatch(text) else None
    return None


def _check_sid(stream_sid: str) -> None:
    if not isinstance(stream_sid, str) or not stream_sid:
        raise ValueError("stream_sid must be a non-empty string")
