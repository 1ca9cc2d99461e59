"""The VAD never calls near-digital silence speech: a codec's residue after the last word (Opus
leaves a few LSB where the caller sent zeros) does not keep a turn going."""

from __future__ import annotations

from typing import Any

import numpy as np
from pipecat.audio.vad.vad_analyzer import VADParams, VADState

from voice.vad import ONSET_CONFIDENCE, SILENCE_FLOOR_RMS, WINDOW_SAMPLES, SileroVAD


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


class ScriptedSilero:
    """An ONNX session that gives the windows the scores it was told, in order."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)

    def run(self, _outputs: Any, feed: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return np.array([[self.scores.pop(0)]], dtype=np.float32), feed["state"]


def test_a_hesitant_silero_score_on_a_loud_window_is_an_onset_not_yet_speech() -> None:
    # Silero often scores a caller's first syllable (a nasal "no, no") 0.4-0.6 for a few windows:
    # loud enough, speech-like enough to pause the bot, not enough to confirm speech.
    vad = SileroVAD(ScriptedSilero([0.5] * 8), VADParams(min_volume=0.0))  # type: ignore[arg-type]
    for n in range(8):
        vad.analyze(window(3000.0, n))
        assert vad.onset_voiced
        assert vad.state == VADState.QUIET


def test_onset_confidence_sits_between_noise_and_confirmed_speech() -> None:
    # Below the onset level nothing pauses the bot; confirmed speech keeps its own threshold.
    low = SileroVAD(ScriptedSilero([ONSET_CONFIDENCE - 0.05] * 4), VADParams(min_volume=0.0))  # type: ignore[arg-type]
    for n in range(4):
        low.analyze(window(3000.0, n))
        assert not low.onset_voiced
    assert 0.0 < ONSET_CONFIDENCE < VADParams().confidence
    # A deployment that confirms speech below the onset level (confidence 0.3) gets onsets there too.
    strict = SileroVAD(ScriptedSilero([0.32]), VADParams(confidence=0.3, min_volume=0.0))  # type: ignore[arg-type]
    strict.analyze(window(3000.0, 0))
    assert strict.onset_voiced
