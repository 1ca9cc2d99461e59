"""Pure audio helpers: G.711 mu-law, resampling, WAV, frames and levels."""

from __future__ import annotations

import io
import math
import random
import wave

import numpy as np
import pytest

from voice.audio import (
    ULAW_SILENCE,
    Resampler,
    duration_ms,
    frames,
    pcm16_to_ulaw,
    pcm16_to_wav,
    resample,
    rms_dbfs,
    trim_leading_silence,
    ulaw_to_pcm16,
    wav_to_pcm16,
)

# --- reference: ITU-T G.191 STL g711.c, transliterated sample by sample -------------------------


def reference_ulaw_compress(linear: int) -> int:
    """``ulaw_compress`` for one 16-bit sample (14 bits left justified)."""
    absno = ((~linear) >> 2) + 33 if linear < 0 else (linear >> 2) + 33
    if absno > 0x1FFF:
        absno = 0x1FFF
    i = absno >> 6
    segno = 1
    while i != 0:
        segno += 1
        i >>= 1
    high_nibble = 0x0008 - segno
    low_nibble = 0x000F - ((absno >> segno) & 0x000F)
    log = (high_nibble << 4) | low_nibble
    if linear >= 0:
        log |= 0x0080
    return log


def reference_ulaw_expand(log: int) -> int:
    """``ulaw_expand`` for one code; the result is 14 bits left justified in 16."""
    sign = -1 if log < 0x0080 else 1
    mantissa = ~log
    exponent = (mantissa >> 4) & 0x0007
    segment = exponent + 1
    mantissa &= 0x000F
    step = 4 << segment
    return sign * ((0x0080 << exponent) + step * mantissa + step // 2 - 4 * 33)


ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


def tone(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 10000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.rint(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def level_db(pcm: np.ndarray, trim: int = 200) -> float:
    """RMS level away from the edges, where the filter sees the zero padding."""
    return rms_dbfs(pcm[trim:-trim])


# --- mu-law ------------------------------------------------------------------------------------


def test_ulaw_encoding_is_bit_exact_with_the_itu_reference_for_every_int16() -> None:
    expected = bytes(reference_ulaw_compress(int(x)) for x in ALL_INT16)
    assert pcm16_to_ulaw(ALL_INT16) == expected


def test_ulaw_decoding_is_bit_exact_with_the_itu_reference_for_every_code() -> None:
    expected = [reference_ulaw_expand(code) for code in range(256)]
    assert ulaw_to_pcm16(bytes(range(256))).tolist() == expected


def test_ulaw_round_trip_error_is_within_half_a_quantisation_step() -> None:
    codes = pcm16_to_ulaw(ALL_INT16)
    decoded = ulaw_to_pcm16(codes).astype(np.int32)
    x = ALL_INT16.astype(np.int32)
    error = np.abs(decoded - x)
    # A step is 8 << segment (16-bit scale): half a step is 4 in the finest segment and 512 in
    # the coarsest. Beyond the coding range (|x| > 32124) samples clip to +-32124.
    segment = ((~np.frombuffer(codes, dtype=np.uint8).astype(np.int32)) >> 4) & 0x07
    inside = np.abs(x) <= 32124
    assert np.all(error[inside] <= (4 << segment[inside]))
    assert int(error[~inside].max()) == 32768 - 32124
    # So the relative error stays under 3.4% once past the finest segments.
    big = (np.abs(x) >= 1000) & inside
    assert float((error[big] / np.abs(x[big])).max()) < 0.034


def test_reencoding_decoded_codes_is_stable() -> None:
    codes = bytes(range(256))
    reencoded = pcm16_to_ulaw(ulaw_to_pcm16(codes))
    # Both zeros (0x7F is "negative zero") decode to 0, which encodes as positive zero 0xFF.
    assert reencoded == bytes(0xFF if code == 0x7F else code for code in codes)


def test_ulaw_sine_keeps_a_signal_to_noise_ratio_above_35_db() -> None:
    x = tone(1000, 8000, amplitude=16000)
    y = ulaw_to_pcm16(pcm16_to_ulaw(x)).astype(np.float64)
    noise = y - x
    snr = 10 * math.log10(float(np.mean(x.astype(np.float64) ** 2)) / float(np.mean(noise**2)))
    assert snr > 35


def test_silence_encodes_to_the_ulaw_silence_code() -> None:
    assert pcm16_to_ulaw(np.zeros(160, dtype=np.int16)) == bytes([ULAW_SILENCE]) * 160
    assert ulaw_to_pcm16(bytes([ULAW_SILENCE]) * 3).tolist() == [0, 0, 0]


def test_ulaw_encoder_clips_wider_integers_and_refuses_floats() -> None:
    wide = np.array([-100000, 100000, 5], dtype=np.int64)
    assert pcm16_to_ulaw(wide) == pcm16_to_ulaw(np.array([-32768, 32767, 5], dtype=np.int16))
    with pytest.raises(TypeError):
        pcm16_to_ulaw(np.zeros(4, dtype=np.float32))


def test_ulaw_decoder_accepts_bytearray_and_memoryview_and_empty_input() -> None:
    data = bytes([0x00, 0x80, 0xFF])
    expected = ulaw_to_pcm16(data).tolist()
    assert ulaw_to_pcm16(bytearray(data)).tolist() == expected
    assert ulaw_to_pcm16(memoryview(data)).tolist() == expected
    assert ulaw_to_pcm16(b"").dtype == np.int16 and ulaw_to_pcm16(b"").size == 0
    assert pcm16_to_ulaw(np.zeros(0, dtype=np.int16)) == b""


# --- resampling --------------------------------------------------------------------------------

RATE_PAIRS = [(22050, 8000), (24000, 8000), (16000, 8000), (8000, 16000), (44100, 8000), (8000, 22050)]


@pytest.mark.parametrize(("src", "dst"), RATE_PAIRS)
@pytest.mark.parametrize("n", [0, 1, 2, 159, 160, 441, 1000, 22050])
def test_resample_length_is_the_ceiling_of_the_rate_ratio(src: int, dst: int, n: int) -> None:
    x = np.ones(n, dtype=np.int16)
    y = resample(x, src, dst)
    assert y.dtype == np.int16
    assert len(y) == -(-n * dst // src)


@pytest.mark.parametrize(("src", "dst"), RATE_PAIRS)
def test_in_band_tone_keeps_its_energy_and_frequency(src: int, dst: int) -> None:
    x = tone(1000, src)
    y = resample(x, src, dst)
    assert abs(level_db(y) - level_db(x)) < 0.1
    spectrum = np.abs(np.fft.rfft(y.astype(np.float64) * np.hanning(len(y))))
    assert abs(np.argmax(spectrum) * dst / len(y) - 1000) < 2


def test_6khz_tone_is_attenuated_more_than_30_db_going_22050_to_8000() -> None:
    x = tone(6000, 22050)
    y = resample(x, 22050, 8000)
    assert level_db(x) - level_db(y) > 30


def test_telephone_band_edge_is_nearly_flat_going_22050_to_8000() -> None:
    x = tone(3400, 22050)
    assert abs(level_db(resample(x, 22050, 8000)) - level_db(x)) < 0.5


def test_resampled_dc_stays_at_the_same_level() -> None:
    y = resample(np.full(22050, 1000, dtype=np.int16), 22050, 8000)
    assert np.all(np.abs(y[50:-50].astype(int) - 1000) <= 2)


def test_resample_to_the_same_rate_returns_a_copy() -> None:
    x = tone(440, 8000, 0.1)
    y = resample(x, 8000, 8000)
    assert np.array_equal(x, y) and y is not x


def test_resample_refuses_bad_rates_and_float_samples() -> None:
    x = np.zeros(10, dtype=np.int16)
    with pytest.raises(ValueError):
        resample(x, 0, 8000)
    with pytest.raises(ValueError):
        resample(x, 8000, -1)
    with pytest.raises(ValueError):
        resample(x, 8000, 7999)  # a 7999/8000 filter bank would be huge
    with pytest.raises(TypeError):
        resample(x.astype(np.float64), 16000, 8000)


@pytest.mark.parametrize(("src", "dst"), RATE_PAIRS)
def test_streaming_resampler_matches_one_shot_resample_for_any_chunking(src: int, dst: int) -> None:
    rng = np.random.default_rng(7)
    x = tone(440, src, 0.5) + rng.integers(-500, 500, int(src * 0.5)).astype(np.int16)
    expected = resample(x, src, dst)
    resampler = Resampler(src, dst)
    chunks, i = [], 0
    sizes = random.Random(3)
    while i < len(x):
        size = sizes.randint(1, 900)
        chunks.append(resampler.process(x[i : i + size]))
        i += size
    chunks.append(resampler.flush())
    y = np.concatenate(chunks)
    assert len(y) == len(expected)
    assert int(np.abs(y.astype(np.int32) - expected).max()) <= 1  # float rounding only


def test_streaming_resampler_has_no_boundary_clicks_where_per_chunk_resampling_does() -> None:
    x = tone(440, 22050, 0.5)
    expected = resample(x, 22050, 8000)
    per_chunk = np.concatenate([resample(x[i : i + 441], 22050, 8000) for i in range(0, len(x), 441)])
    resampler = Resampler(22050, 8000)
    streamed = np.concatenate([resampler.process(x[i : i + 441]) for i in range(0, len(x), 441)])
    streamed = np.concatenate([streamed, resampler.flush()])
    assert int(np.abs(per_chunk.astype(np.int32) - expected).max()) > 500  # the clicks
    assert int(np.abs(streamed.astype(np.int32) - expected).max()) <= 1


def test_resampler_flush_starts_a_new_signal() -> None:
    x = tone(300, 16000, 0.1)
    resampler = Resampler(16000, 8000)
    first = np.concatenate([resampler.process(x), resampler.flush()])
    second = np.concatenate([resampler.process(x), resampler.flush()])
    assert np.array_equal(first, second)
    assert resampler.flush().size == 0


def test_resampler_reset_drops_buffered_input() -> None:
    resampler = Resampler(22050, 8000)
    resampler.process(tone(300, 22050, 0.01))
    resampler.reset()
    assert resampler.flush().size == 0


def test_resampler_at_the_same_rate_passes_audio_through() -> None:
    resampler = Resampler(8000, 8000)
    x = tone(300, 8000, 0.02)
    assert np.array_equal(resampler.process(x), x)
    assert resampler.flush().size == 0


# --- WAV ---------------------------------------------------------------------------------------


def make_wav(raw: bytes, rate: int, channels: int, width: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(raw)
    return buffer.getvalue()


def test_wav_round_trip_keeps_samples_and_rate() -> None:
    x = np.concatenate([tone(440, 22050, 0.1), np.array([-32768, 32767, 0], dtype=np.int16)])
    pcm, rate = wav_to_pcm16(pcm16_to_wav(x, 22050))
    assert rate == 22050
    assert pcm.dtype == np.int16
    assert np.array_equal(pcm, x)


def test_stereo_wav_is_averaged_to_mono() -> None:
    left = np.array([1000, -2000, 300], dtype="<i2")
    right = np.array([3000, 2000, 300], dtype="<i2")
    data = make_wav(np.column_stack([left, right]).tobytes(), 16000, 2, 2)
    pcm, rate = wav_to_pcm16(data)
    assert rate == 16000
    assert pcm.tolist() == [2000, 0, 300]


@pytest.mark.parametrize(
    ("width", "raw", "expected"),
    [
        (1, bytes([128, 255, 0]), [0, 127 << 8, -32768]),
        (3, bytes([0x00, 0x00, 0x80, 0xFF, 0xFF, 0x7F, 0x00, 0x01, 0x00]), [-32768, 32767, 1]),
        (4, np.array([-(2**31), 2**31 - 1, 1 << 16], dtype="<i4").tobytes(), [-32768, 32767, 1]),
    ],
)
def test_8_24_and_32_bit_wav_are_converted_to_16_bit(width: int, raw: bytes, expected: list[int]) -> None:
    pcm, _ = wav_to_pcm16(make_wav(raw, 8000, 1, width))
    assert pcm.tolist() == expected


@pytest.mark.parametrize("data", [b"", b"not a wav file", b"RIFF\x00\x00\x00\x00WAVE"])
def test_garbage_wav_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        wav_to_pcm16(data)


# --- frames and levels -------------------------------------------------------------------------


def test_frames_split_into_160_byte_frames_with_a_short_tail() -> None:
    audio = bytes(range(256)) * 2  # 512 bytes
    chunks = list(frames(audio))
    assert [len(c) for c in chunks] == [160, 160, 160, 32]
    assert b"".join(chunks) == audio


def test_frames_can_pad_the_tail_with_silence() -> None:
    chunks = list(frames(b"\x00" * 170, pad=True))
    assert [len(c) for c in chunks] == [160, 160]
    assert chunks[1] == b"\x00" * 10 + bytes([ULAW_SILENCE]) * 150


def test_frames_of_custom_size_and_empty_audio() -> None:
    assert list(frames(b"abcdef", size=4)) == [b"abcd", b"ef"]
    assert list(frames(b"")) == []
    with pytest.raises(ValueError):
        list(frames(b"abc", size=0))


def test_duration_of_mulaw_bytes() -> None:
    assert duration_ms(160) == 20.0
    assert duration_ms(8000) == 1000.0
    assert duration_ms(0) == 0.0
    assert duration_ms(320, rate=16000) == 20.0


def test_rms_dbfs_of_reference_signals() -> None:
    square = np.array([32767, -32768] * 100, dtype=np.int16)
    assert rms_dbfs(square) == pytest.approx(0.0, abs=0.01)
    assert rms_dbfs(tone(1000, 8000, amplitude=32767)) == pytest.approx(-3.01, abs=0.02)
    assert rms_dbfs(tone(1000, 8000, amplitude=3277)) == pytest.approx(-23.01, abs=0.05)
    assert rms_dbfs(np.zeros(100, dtype=np.int16)) == -math.inf
    assert rms_dbfs(np.zeros(0, dtype=np.int16)) == -math.inf


# --- trim_leading_silence -----------------------------------------------------------------------


def _tone(ms: int, rate: int = 8000, amplitude: float = 3000.0) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.int16)


def test_a_replys_lead_in_silence_is_cut_where_the_first_sound_starts() -> None:
    rng = np.random.default_rng(7)
    hiss = rng.normal(0, 2, 8000 * 45 // 1000).astype(np.int16)  # 45 ms of Piper-like near-silence
    tone = _tone(200)
    out = trim_leading_silence(np.concatenate([hiss, tone]), 8000)
    assert np.array_equal(out, tone)  # from the first 5 ms window with sound
    kept = trim_leading_silence(np.concatenate([hiss, tone]), 8000, keep_ms=5)
    assert kept.size == tone.size + 40  # 5 ms (40 samples) before the sound, when asked
    assert np.array_equal(kept[40:], tone)


def test_audio_that_starts_at_once_or_is_all_quiet_is_left_as_it_is() -> None:
    tone = _tone(100)
    assert np.array_equal(trim_leading_silence(tone, 8000), tone)
    quiet = np.zeros(800, dtype=np.int16)
    assert np.array_equal(trim_leading_silence(quiet, 8000), quiet)
    short = np.zeros(10, dtype=np.int16)
    assert np.array_equal(trim_leading_silence(short, 8000), short)


def test_a_quiet_onset_above_the_level_is_kept_whole() -> None:
    onset = _tone(20, amplitude=60.0)  # a soft consonant, RMS ~42: speech, not silence
    audio = np.concatenate([np.zeros(400, dtype=np.int16), onset, _tone(100)])
    out = trim_leading_silence(audio, 8000)
    assert out.size == onset.size + 800
