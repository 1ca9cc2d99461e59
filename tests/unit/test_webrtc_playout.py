"""The browser call's audio path inside closeloop: the outbound track hands each frame the audio
taken for it (no prebuffer, no frame held back by a resampler), and the inbound buffer passes each
packet on as it arrives."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.rtp import RtpPacket

from telephony.webrtc import MAX_UNSENT, ArrivalOrder, BrowserCall, Playout, hear_on_arrival

TONE_8K = (3000 * np.sin(2 * np.pi * 300 * np.arange(160) / 8000)).astype("<i2").tobytes()  # 20 ms


def rms(frame: object) -> float:
    pcm = frame.to_ndarray().astype(np.float64)  # type: ignore[attr-defined]
    return float(np.sqrt(np.mean(pcm * pcm)))


async def test_audio_queued_before_the_first_frame_is_in_the_first_frame() -> None:
    playout = Playout(on_mark=lambda name: None)
    playout.enqueue_audio(TONE_8K)
    frame = await playout.recv()
    assert frame.sample_rate == 48000 and frame.samples == 960  # Opus's rate: the encoder takes it as is
    assert rms(frame) > 1000
    playout.stop()


async def test_each_frame_carries_the_audio_taken_for_it_not_the_previous_frames() -> None:
    playout = Playout(on_mark=lambda name: None)
    silent = [rms(await playout.recv()) for _ in range(2)]
    playout.enqueue_audio(TONE_8K)
    voiced = rms(await playout.recv())
    after = rms(await playout.recv())
    playout.stop()
    assert silent == [0.0, 0.0]
    assert voiced > 1000  # the frame the tone was queued for, not the one after it
    assert after < voiced / 2  # only the resampler's 2 ms filter tail spills over


async def test_a_mark_fires_once_the_frame_with_the_audio_before_it_is_out() -> None:
    marks: list[str] = []
    playout = Playout(on_mark=marks.append)
    playout.enqueue_audio(TONE_8K * 2)
    playout.enqueue_mark("reply-1")
    await playout.recv()
    assert marks == []
    await playout.recv()
    assert marks == ["reply-1"]
    assert playout.sent_audio_ms == 40.0
    playout.stop()


def packet(seq: int, payload: bytes = b"opus") -> RtpPacket:
    return RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960, payload=payload)


def test_arrival_order_passes_each_packet_on_as_it_arrives() -> None:
    buffer = ArrivalOrder()
    for seq in (10, 11, 13):  # 12 is lost: 13 is not held back waiting for it
        pli, frame = buffer.add(packet(seq, bytes([seq])))
        assert not pli and frame is not None
        assert frame.timestamp == seq * 960 and frame.data == bytes([seq])


def test_arrival_order_drops_repeated_and_late_packets() -> None:
    buffer = ArrivalOrder()
    buffer.add(packet(20))
    buffer.add(packet(22))
    assert buffer.add(packet(22)) == (False, None)  # a repeat
    assert buffer.add(packet(21)) == (False, None)  # late: the turn detector has moved on
    assert buffer.add(packet(23))[1] is not None


def test_arrival_order_follows_the_sequence_number_across_its_wrap_and_a_restarted_sender() -> None:
    buffer = ArrivalOrder()
    assert buffer.add(packet(65535))[1] is not None
    assert buffer.add(packet(0))[1] is not None
    assert buffer.add(packet(40000))[1] is not None  # far from the last one: a new sequence


async def test_a_browser_calls_audio_receiver_gets_the_arrival_order_buffer() -> None:
    caller, server = RTCPeerConnection(), RTCPeerConnection()
    try:
        caller.addTransceiver("audio")
        await caller.setLocalDescription(await caller.createOffer())
        await server.setRemoteDescription(caller.localDescription)
        assert hear_on_arrival(server)  # False would mean this aiortc moved its jitter buffer
    finally:
        await caller.close()
        await server.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_reply_that_starts_while_the_track_is_idle_goes_out_at_once_with_continuous_timestamps() -> (
    None
):
    clock = FakeClock()  # frozen: the second frame's slot never comes by itself
    playout = Playout(on_mark=lambda name: None, clock=clock)
    first = await playout.recv()  # idle: silence
    asyncio.get_running_loop().call_soon(playout.enqueue_audio, TONE_8K)  # while recv waits for its slot
    reply = await asyncio.wait_for(playout.recv(), 5)  # would wait for the slot forever
    playout.stop()
    assert rms(first) == 0.0 and rms(reply) > 1000
    assert reply.pts - first.pts == 960  # the RTP timestamps run on from the frame before
    assert playout.ahead_s == pytest.approx(0.02)  # the stream is now ahead by the skipped wait


async def test_idle_frames_pay_back_an_early_reply_start_so_the_track_keeps_real_time() -> None:
    clock = FakeClock()
    playout = Playout(on_mark=lambda name: None, clock=clock)
    await playout.recv()
    clock.now += 0.005  # mid-slot
    playout.enqueue_audio(TONE_8K)
    await playout.recv()  # goes at once: 15 ms early
    assert playout.ahead_s == pytest.approx(0.015)
    clock.now += 10  # every later slot has come: no waiting below
    for _ in range(5):
        await playout.recv()  # idle again: 1 ms back per frame
    assert playout.ahead_s == pytest.approx(0.011)
    for _ in range(20):
        await playout.recv()
    assert playout.ahead_s == 0.0
    playout.stop()


async def test_a_track_sending_audio_does_not_take_later_audio_early() -> None:
    clock = FakeClock()
    playout = Playout(on_mark=lambda name: None, clock=clock)
    playout.enqueue_audio(TONE_8K)
    await playout.recv()  # busy: this frame carried audio
    clock.now += 0.015  # the next slot is 5 ms away
    playout.enqueue_audio(TONE_8K)
    frame = await playout.recv()  # waits out the 5 ms to its slot
    playout.stop()
    assert rms(frame) > 1000
    assert playout.ahead_s == 0.0  # paced on its grid: nothing skipped


class _Channel:
    def __init__(self, state: str) -> None:
        self.readyState = state
        self.sent: list[str] = []

    def send(self, text: str) -> None:
        self.sent.append(text)


def test_captions_told_before_the_page_s_channel_opens_are_sent_in_order_when_it_does() -> None:
    call = BrowserCall(call_id="WR1", client="127.0.0.1", pc=None)  # type: ignore[arg-type]
    call.tell('{"caption": "bot", "text": "Thanks for calling."}')  # no channel yet
    channel = _Channel("connecting")
    call.channel = channel
    call.tell('{"caption": "bot", "text": "How can I help?"}')  # not open yet
    assert channel.sent == []
    channel.readyState = "open"
    call.channel_open()
    call.tell("hangup")
    assert channel.sent == [
        '{"caption": "bot", "text": "Thanks for calling."}',
        '{"caption": "bot", "text": "How can I help?"}',
        "hangup",
    ]
    assert call.unsent == []


def test_a_page_that_never_opens_its_channel_keeps_at_most_max_unsent_messages() -> None:
    call = BrowserCall(call_id="WR2", client="127.0.0.1", pc=None)  # type: ignore[arg-type]
    for n in range(MAX_UNSENT + 10):
        call.tell(f"caption {n}")
    assert len(call.unsent) == MAX_UNSENT and call.unsent[0] == "caption 0"
