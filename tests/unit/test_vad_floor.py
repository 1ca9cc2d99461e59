"""The VAD never calls near-digital silence speech: a codec's residue after the last word (Opus
leaves a few LSB where the caller sent zeros) does not keep a turn going."""

from __future__ import annotations

from typing import Any

import numpy as np
from pipecat.audio.vad.vad_analyzer import VADParams, VADState

from voice.vad import SILENCE_FLOOR_RMS, WINDOW_SAMPLES, SileroVAD


class SureSilero:
    """An ONNX session that scores every window as speech (Silero's answer on Opus residue)."""

    def run(self, _outputs: Any, feed: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return np.array([[0.99]], dtype=np.float32), feed["state"]


def window(rms: float, seed: int) -> bytes:
    noise = np.random.default_rng(seed).normal(0.0, 1.0, WINDOW_SAMPLES)
    return (noise / np.sqrt(np.mean(noise * noise)) * rms).round().astype("<i2").tobytes()


def test_a_codecs_residue_after_speech_is_not_speech_however_sure_silero_is() -> None:
    vad = SileroVAD(SureSilero(), VADParams(min_volume=0.0))  # type: ignore[arg-type]
    for n in range(20):
        vad.analyze(window(3000.0, n))  # ~ -21 dBFS: speech
    assert vad.state == VADState.SPEAKING
    vad.analyze(window(4.0, 99))  # a few LSB: what Opus decodes where the caller sent zeros
    assert vad.state == VADState.STOPPING  # Silero and the volume say speech; the floor decides
    assert not vad.onset_voiced


def test_quiet_speech_above_the_floor_still_counts() -> None:
    vad = SileroVAD(SureSilero(), VADParams(min_volume=0.0))  # type: ignore[arg-type]
    for n in range(20):
        vad.analyze(window(SILENCE_FLOOR_RMS * 3, n))  # ~ -50 dBFS: a quiet caller
    assert vad.state == VADState.SPEAKING
