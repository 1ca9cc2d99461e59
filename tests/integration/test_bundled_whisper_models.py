"""Each bundled Whisper model (CLOSELOOP_STT_MODEL) loads and hears phone-band speech.

Speech is rendered by espeak-ng and sent through 8 kHz mu-law and back up to 16 kHz as a call hears
it. Assertions hold on any CPU: which model is loaded, and keywords with alternatives, never one
exact transcript.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from voice.audio import pcm16_to_ulaw, resample, wav_to_pcm16
from voice.speech_stack import Upsampler
from voice.stt import WhisperSTT


def _phone_speech(text: str, folder: Path) -> np.ndarray:
    """``text`` said by espeak-ng, through 8 kHz mu-law and back up to 16 kHz as a call hears it."""
    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is needed to render caller audio: apt-get install espeak-ng"
    path = folder / "speech.wav"
    subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(path), text], check=True, timeout=30)
    pcm, rate = wav_to_pcm16(path.read_bytes())
    ulaw = pcm16_to_ulaw(resample(pcm, rate, 8000))
    upsample = Upsampler()
    return np.concatenate([upsample(ulaw[i : i + 160]) for i in range(0, len(ulaw), 160)])


@pytest.mark.parametrize(("model", "multilingual"), [("tiny.en", False), ("base", True)])
async def test_each_bundled_model_loads_and_hears_a_refund_request(
    model: str, multilingual: bool, tmp_path: Path
) -> None:
    stt = WhisperSTT(model=model)
    try:
        await stt.load()
        loaded = stt._model_sync()
        assert loaded.model.is_multilingual is multilingual  # the setting picked this model
        heard = (await stt.transcribe(_phone_speech("I want a refund for my order", tmp_path))).text.lower()
    finally:
        stt.close()
    assert "refund" in heard or "money back" in heard, heard
    assert any(word in heard for word in ("order", "purchase", "orders")), heard
