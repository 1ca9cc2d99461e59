"""Audio at the telephone edge, pure numpy: G.711 mu-law, resampling, WAV, frame accounting.

PCM is always mono ``int16`` at the int16 scale (full scale 32768). Telephone audio is 8 kHz
mu-law, one byte per sample, usually sent in 20 ms (160-byte) frames.

mu-law follows the ITU-T G.191 reference (``ulaw_compress`` / ``ulaw_expand`` in the STL's
``g711.c``) bit for bit. Note that the older Sun ``g711.c`` (and so the deprecated ``audioop``)
take the magnitude of negative samples differently and pick the next code up for some negative
inputs at quantisation boundaries; decoding is identical.

Resampling is a polyphase FIR (Kaiser-windowed sinc, like ``scipy.signal.resample_poly``, which
is not a dependency) written as one matrix product per call: for a ratio ``up/down`` every block
of ``down`` input samples gives ``up`` output samples through the same ``up x W`` matrix.
"""

from __future__ import annotations

import functools
import io
import math
import operator
import struct
import wave
from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

ULAW_RATE = 8000
ULAW_FRAME_BYTES = 160
"""20 ms of 8 kHz mu-law: Twilio's usual frame size (not a contract)."""
ULAW_SILENCE = 0xFF
"""The mu-law code for 0 (positive zero)."""

# Filter design: taps per side of the prototype filter = _HALF_LEN * max(up, down), i.e. about
# 2 * _HALF_LEN input samples per output sample at the lower rate. Cut-off at the lower rate's
# Nyquist frequency. Kaiser beta 6 gives ~63 dB stop-band rejection with a ~1.3 kHz transition
# centred on 4 kHz when the lower rate is 8 kHz (the telephone band ends at 3.4 kHz).
_HALF_LEN = 10
_KAISER_BETA = 6.0
_MAX_MATRIX = 1 << 22  # refuse ratios whose polyphase matrix would exceed 16 MiB of float32


def _ulaw_tables() -> tuple[np.ndarray, np.ndarray]:
    """Encode table (indexed by the int16 sample's bits as uint16) and decode table (by code)."""
    pcm = np.arange(-32768, 32768, dtype=np.int32)
    # G.191: 14-bit magnitude, one's complement for negatives, plus the mu-law bias of 33.
    absno = np.minimum(np.where(pcm < 0, (~pcm) >> 2, pcm >> 2) + 33, 0x1FFF)
    high = absno >> 6
    segno = 1 + sum((high >= (1 << k)).astype(np.int32) for k in range(7))
    low_nibble = 0x0F - ((absno >> segno) & 0x0F)
    codes = ((8 - segno) << 4) | low_nibble | np.where(pcm >= 0, 0x80, 0)
    encode = np.empty(65536, dtype=np.uint8)
    encode[pcm & 0xFFFF] = codes

    log = np.arange(256, dtype=np.int32)
    mantissa = ~log
    exponent = (mantissa >> 4) & 0x07
    step = 4 << (exponent + 1)
    magnitude = (0x80 << exponent) + step * (mantissa & 0x0F) + step // 2 - 4 * 33
    decode = np.where(log < 0x80, -magnitude, magnitude).astype(np.int16)
    return encode, decode


_ENCODE, _DECODE = _ulaw_tables()


def ulaw_to_pcm16(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode G.711 mu-law bytes to int16 PCM (one sample per byte)."""
    return _DECODE[np.frombuffer(data, dtype=np.uint8)]


def pcm16_to_ulaw(pcm: np.ndarray) -> bytes:
    """Encode int16 PCM to G.711 mu-law bytes (one byte per sample).

    Other integer dtypes are clipped to the int16 range first.

    Raises:
        TypeError: for float (or other non-integer) samples: scale them to int16 explicitly.
    """
    return _ENCODE[_as_int16(pcm).view(np.uint16)].tobytes()


def resample(pcm: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample int16 PCM with a polyphase anti-aliasing FIR filter.

    The output is aligned with the input (the filter delay is compensated) and has
    ``ceil(len(pcm) * dst_rate / src_rate)`` samples, like ``scipy.signal.resample_poly``.
    For audio that arrives in chunks use :class:`Resampler`: resampling each chunk alone adds
    clicks at chunk boundaries.

    Raises:
        TypeError: non-integer samples.
        ValueError: non-positive rates, or a ratio so irregular (e.g. 8000 -> 7999) that its
            filter bank would be huge: go through a common rate instead.
    """
    samples = _as_int16(pcm)
    if src_rate == dst_rate and src_rate > 0:
        return samples.copy()
    bank = _bank(src_rate, dst_rate)
    n_out = -(-samples.size * bank.up // bank.down)
    if n_out == 0:
        return np.zeros(0, dtype=np.int16)
    blocks = -(-n_out // bank.up)
    padded = np.zeros(max((blocks - 1) * bank.down + bank.width, bank.lead + samples.size), dtype=np.float32)
    padded[bank.lead : bank.lead + samples.size] = samples
    return _to_int16(bank.run(padded, blocks)[:n_out])


class Resampler:
    """Streaming :func:`resample`: state is kept across chunks, so chunk boundaries are seamless.

    Feeding a signal in any chunking and then calling :meth:`flush` gives the same samples as
    one :func:`resample` call (to within 1 LSB of float rounding). Output lags input by the
    filter's look-ahead, ``_HALF_LEN`` samples at the lower rate (1.25 ms for 8 kHz), plus up to
    one block (``down`` input samples; 20 ms for 22050 -> 8000).

    Args:
        src_rate: input rate in Hz.
        dst_rate: output rate in Hz.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self.src_rate = src_rate
        self.dst_rate = dst_rate
        self._bank = None if src_rate == dst_rate and src_rate > 0 else _bank(src_rate, dst_rate)
        self.reset()

    def reset(self) -> None:
        """Forget buffered input (e.g. on barge-in) and start a new signal."""
        lead = self._bank.lead if self._bank else 0
        self._buffer = np.zeros(lead, dtype=np.float32)
        self._samples_in = 0
        self._samples_out = 0

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """Add a chunk of int16 PCM; return every output sample that is now complete."""
        samples = _as_int16(pcm)
        if self._bank is None:
            return samples.copy()
        bank = self._bank
        self._samples_in += samples.size
        self._buffer = np.concatenate((self._buffer, samples.astype(np.float32)))
        if self._buffer.size < bank.width:
            return np.zeros(0, dtype=np.int16)
        blocks = (self._buffer.size - bank.width) // bank.down + 1
        return self._emit(blocks, limit=None)

    def flush(self) -> np.ndarray:
        """Return the remaining output (the input is padded with silence) and reset."""
        if self._bank is None:
            self.reset()
            return np.zeros(0, dtype=np.int16)
        bank = self._bank
        total = -(-self._samples_in * bank.up // bank.down)
        remaining = total - self._samples_out
        out = np.zeros(0, dtype=np.int16)
        if remaining > 0:
            blocks = -(-remaining // bank.up)
            needed = (blocks - 1) * bank.down + bank.width
            if self._buffer.size < needed:
                self._buffer = np.concatenate(
                    (self._buffer, np.zeros(needed - self._buffer.size, dtype=np.float32))
                )
            out = self._emit(blocks, limit=remaining)
        self.reset()
        return out

    def _emit(self, blocks: int, limit: int | None) -> np.ndarray:
        assert self._bank is not None
        y = self._bank.run(self._buffer, blocks)
        if limit is not None:
            y = y[:limit]
        self._buffer = self._buffer[blocks * self._bank.down :]
        self._samples_out += y.size
        return _to_int16(y)


def wav_to_pcm16(data: bytes) -> tuple[np.ndarray, int]:
    """Read an integer PCM WAV file (8, 16, 24 or 32 bit) to mono int16 and its sample rate.

    Several channels are averaged into one.

    Raises:
        ValueError: not a WAV file, or a format the stdlib ``wave`` module cannot read (float).
    """
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, struct.error) as exc:
        raise ValueError(f"not a PCM WAV file: {exc}") from exc
    if channels < 1 or width not in (1, 2, 3, 4):
        raise ValueError(f"unsupported WAV format: {channels} channels, {width * 8}-bit")
    raw = raw[: len(raw) - len(raw) % (width * channels)]
    if width == 1:
        wide = (np.frombuffer(raw, dtype=np.uint8).astype(np.int32) - 128) << 8
    elif width == 2:
        wide = np.frombuffer(raw, dtype="<i2").astype(np.int32)
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        wide = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)) >> 16
    else:
        wide = np.frombuffer(raw, dtype="<i4") >> 16
    if channels > 1:
        wide = np.rint(wide.reshape(-1, channels).mean(axis=1))
    return wide.astype(np.int16), rate


def pcm16_to_wav(pcm: np.ndarray, rate: int, *, channels: int = 1) -> bytes:
    """Write int16 PCM as a 16-bit WAV file, mono by default.

    With ``channels`` > 1, ``pcm`` holds interleaved frames, e.g. a ``(samples, channels)`` array.
    """
    samples = _as_int16(pcm)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def frames(mulaw: bytes, size: int = ULAW_FRAME_BYTES, *, pad: bool = False) -> Iterator[bytes]:
    """Split mu-law audio into frames of ``size`` bytes.

    The last frame is shorter when the audio does not divide evenly (Twilio accepts any size),
    or filled up with mu-law silence when ``pad`` is true.
    """
    if size <= 0:
        raise ValueError("frame size must be positive")
    view = memoryview(mulaw).cast("B")
    for start in range(0, len(view), size):
        frame = bytes(view[start : start + size])
        if pad and len(frame) < size:
            frame += bytes([ULAW_SILENCE]) * (size - len(frame))
        yield frame


def duration_ms(n_bytes_ulaw: int, rate: int = ULAW_RATE) -> float:
    """Play time of ``n_bytes_ulaw`` bytes of mono mu-law (160 bytes at 8 kHz = 20.0 ms)."""
    return n_bytes_ulaw * 1000.0 / rate


def rms_dbfs(pcm: np.ndarray) -> float:
    """RMS level in dB relative to int16 full scale (a full-scale square wave is 0 dBFS).

    Returns ``-inf`` for silence or no samples.
    """
    samples = np.asarray(pcm, dtype=np.float64).reshape(-1)
    if samples.size == 0:
        return -math.inf
    rms = math.sqrt(float(np.mean(samples * samples)))
    return 20.0 * math.log10(rms / 32768.0) if rms > 0 else -math.inf


def trim_leading_silence(
    pcm: np.ndarray, rate: int, *, level: float = 20.0, window_ms: int = 5, keep_ms: int = 0
) -> np.ndarray:
    """``pcm`` from its first ``window_ms`` window whose RMS exceeds ``level`` (int16 scale; 20 is
    about -64 dBFS, under any speech onset and above a synthesizer's digital near-silence), less
    ``keep_ms`` before it. Piper starts every sentence with 30-55 ms of near-silence, which a
    caller would otherwise wait through before the first sound of each reply; the cut lands where
    the sound is still at about -64 dBFS, so it makes no click. All-quiet input is returned
    unchanged (nothing to find the start of)."""
    window = max(1, rate * window_ms // 1000)
    loud = loud_windows(pcm, window, level)
    if loud.size == 0:
        return pcm
    start = max(0, int(loud[0]) * window - rate * keep_ms // 1000)
    return pcm[start:]


def loud_windows(pcm: np.ndarray, window: int, level: float) -> np.ndarray:
    """Indexes of the whole ``window``-sample windows of ``pcm`` whose RMS exceeds ``level``
    (int16 scale); a trailing partial window is not looked at."""
    n = pcm.size // window
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    blocks = pcm[: n * window].astype(np.float64).reshape(n, window)
    return np.flatnonzero(np.sqrt((blocks * blocks).mean(axis=1)) > level)


# --- internals -------------------------------------------------------------------------------


class _Bank:
    """The polyphase filter bank for one ratio ``up/down`` (in lowest terms).

    Output sample ``b*up + j`` is ``sum_r x[b*down + r] * h[j*down - r*up + half]`` over the
    ``width`` values of ``r`` starting at ``-lead``; ``matrix[r + lead, j]`` holds those taps.
    """

    def __init__(self, up: int, down: int) -> None:
        self.up, self.down = up, down
        max_rate = max(up, down)
        half = _HALF_LEN * max_rate
        n = np.arange(-half, half + 1)
        h = np.sinc(n / max_rate) * np.kaiser(2 * half + 1, _KAISER_BETA)
        h *= up / h.sum()  # unity gain at DC after zero-stuffing by `up`
        r_min = -(half // up)
        r_max = ((up - 1) * down + half) // up
        self.lead = -r_min
        self.width = r_max - r_min + 1
        j = np.arange(up)[None, :]
        r = np.arange(r_min, r_max + 1)[:, None]
        index = j * down - r * up + half
        valid = (index >= 0) & (index <= 2 * half)
        self.matrix = np.where(valid, h[np.clip(index, 0, 2 * half)], 0.0).astype(np.float32)

    def run(self, padded: np.ndarray, blocks: int) -> np.ndarray:
        """Filter ``blocks`` blocks of ``padded`` (whose index 0 is input sample ``-lead``)."""
        windows = sliding_window_view(padded, self.width)[:: self.down][:blocks]
        # Overlapping rows are not BLAS-compatible: copy once so the product runs in sgemm.
        return (np.ascontiguousarray(windows) @ self.matrix).reshape(-1)


def _bank(src_rate: int, dst_rate: int) -> _Bank:
    return _bank_for(operator.index(src_rate), operator.index(dst_rate))


@functools.lru_cache(maxsize=16)
def _bank_for(src_rate: int, dst_rate: int) -> _Bank:
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError("sample rates must be positive")
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    # The matrix is up x width, width ~= down + 2 * half / up.
    if up * down + 2 * _HALF_LEN * max(up, down) + up > _MAX_MATRIX:
        raise ValueError(f"resampling {src_rate} -> {dst_rate} Hz needs too large a filter bank")
    return _Bank(up, down)


def _as_int16(pcm: np.ndarray) -> np.ndarray:
    samples = np.asarray(pcm).reshape(-1)
    if samples.dtype == np.int16:
        return samples
    if not np.issubdtype(samples.dtype, np.integer):
        raise TypeError(f"expected int16 PCM, got {samples.dtype}: scale float audio to int16 first")
    return np.clip(samples, -32768, 32767).astype(np.int16)


def _to_int16(y: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16)
