"""The caller's audio of a simulated call: espeak-ng speech or a WAV file, as 8 kHz mu-law."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from voice.audio import (
    ULAW_RATE,
    loud_windows,
    pcm16_to_ulaw,
    resample,
    wav_to_pcm16,
)

ESPEAK_ARGS = ("-v", "en-us", "-s", "165")

_TRIM_WINDOW = 80  # 10 ms at 8 kHz
_TRIM_LEVEL = 300.0  # RMS (int16 scale, about -40 dBFS) that counts as speech when trimming
_TRIM_MARGIN = 2  # windows of silence kept around speech
_TTS_CACHE: dict[str, bytes] = {}


def trim_silence(pcm: np.ndarray) -> np.ndarray:
    """Cut leading and trailing silence (10 ms windows under about -40 dBFS) from 8 kHz PCM."""
    loud = loud_windows(pcm, _TRIM_WINDOW, _TRIM_LEVEL)
    if loud.size == 0:
        return pcm
    n = pcm.size // _TRIM_WINDOW
    first = max(0, int(loud[0]) - _TRIM_MARGIN) * _TRIM_WINDOW
    last = min(n, int(loud[-1]) + 1 + _TRIM_MARGIN) * _TRIM_WINDOW
    return pcm[first:last]


def render_tts(text: str, *, cache_dir: Path | None = None) -> bytes:
    """Speak ``text`` with espeak-ng (en-us, 165 wpm) as 8 kHz mu-law, silence trimmed.

    Results are cached in memory by text, and in ``cache_dir`` when given.

    Raises:
        RuntimeError: espeak-ng is not installed or failed.
    """
    if text in _TTS_CACHE:
        return _TTS_CACHE[text]
    cached = None
    if cache_dir is not None:
        key = hashlib.sha256(" ".join((*ESPEAK_ARGS, text)).encode()).hexdigest()[:32]
        cached = cache_dir / f"{key}.ulaw"
        if cached.is_file():
            _TTS_CACHE[text] = cached.read_bytes()
            return _TTS_CACHE[text]
    with tempfile.TemporaryDirectory(prefix="closeloop-tts-") as tmp:
        out = Path(tmp) / "speech.wav"
        try:
            subprocess.run(
                ["espeak-ng", *ESPEAK_ARGS, "--stdin", "-w", str(out)],
                input=text.encode(),
                capture_output=True,
                check=True,
                timeout=60,
            )
        except FileNotFoundError:
            raise RuntimeError("espeak-ng is not installed: run `apt-get install -y espeak-ng`") from None
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"espeak-ng failed: {e}") from e
        ulaw = _to_phone_audio(out.read_bytes())
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(
            f"{cached.name}.{os.getpid()}.part"
        )  # parallel renders never see half a file
        partial.write_bytes(ulaw)
        os.replace(partial, cached)
    _TTS_CACHE[text] = ulaw
    return ulaw


def load_wav(path: Path) -> bytes:
    """A WAV file as 8 kHz mu-law, silence trimmed.

    Raises:
        ValueError: not an integer PCM WAV file.
        OSError: the file cannot be read.
    """
    return _to_phone_audio(path.read_bytes())


def _to_phone_audio(wav: bytes) -> bytes:
    pcm, rate = wav_to_pcm16(wav)
    return pcm16_to_ulaw(trim_silence(resample(pcm, rate, ULAW_RATE)))
