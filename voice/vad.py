"""The speech models under turn detection, run through their ONNX sessions directly: Silero VAD
(one session per process, recurrent state per call) and smart-turn v3.2 (one session, a small
thread pool). Both weight files ship inside ``pipecat-ai``.

closeloop owns these few pieces instead of subclassing pipecat internals: pipecat's VAD analyzer
keeps its state in private members and its smart-turn analyzer predicts through a private method,
and its Silero wrapper loads a session per call. What is used from pipecat is public: the bundled
weights, :class:`VADParams` / :class:`VADState`, :class:`AudioVolumeTracker` and ``exp_smoothing``.
smart-turn's Whisper-style log-mel features come from faster-whisper's public
``FeatureExtractor`` (same math as pipecat's copy, measured equal to 1e-5).

The VAD state machine is pipecat's (confidence and smoothed volume over 32 ms windows;
``start_secs`` of speech confirm a start, ``stop_secs`` of quiet a stop), with Silero's state
reset after ~2 s of clear non-speech as pipecat's Silero analyzer does.
"""

from __future__ import annotations

import asyncio
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort
from faster_whisper.feature_extractor import FeatureExtractor

with warnings.catch_warnings():
    # pipecat.audio.utils imports the deprecated stdlib ``audioop`` (closeloop itself does not use
    # it); keep that import-time DeprecationWarning from failing runs with warnings as errors.
    warnings.filterwarnings("ignore", message=".*audioop.*", category=DeprecationWarning)
    from pipecat.audio.utils import exp_smoothing
    from pipecat.audio.vad.vad_analyzer import VADParams, VADState
    from pipecat.audio.volume import AudioVolumeTracker

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 512  # Silero's window at 16 kHz (32 ms)
_CONTEXT_SAMPLES = 64  # Silero v5 sees the last 64 samples of the previous window
_VOLUME_SMOOTHING = 0.2
#: A window counts as a possible onset at this share of ``min_volume`` (the smoothed volume climbs
#: for ~100 ms after speech begins): early enough to pause the bot, which can be undone.
ONSET_VOLUME_SHARE = 0.75
#: ... and at this Silero confidence (confirming speech still needs ``VADParams.confidence``, 0.7).
#: Silero's score for a 32 ms window depends on where the window falls in the first syllable, so a
#: call's window phase decided whether a nasal opening ("no no, ...") paused the bot at 140 ms or at
#: 880 ms. On ``benchmarks/turn_dev.py``'s development set (14 interruptions and 8 backchannels in 8
#: voices outside the turn-taking benchmark's, each at 8 window phases) interruptions paused the bot
#: 128 / 680 ms (p50 / p95) after the caller began at 0.7 and 124 / 271 ms at 0.35; 20 noise
#: recordings (keyboard, breath, music, thumps, traffic; 3 phases each) caused 3 onsets instead of
#: 0, each a pause that ``OnsetLost`` undoes ~100 ms later; coughs caused none at either level.
ONSET_CONFIDENCE = 0.35
#: A window quieter than this (int16 RMS; 33 is about -60 dBFS) is never speech, whatever Silero
#: says. A caller's speech reaches turn detection at -40 to -18 dBFS; below -60 is the near-silence
#: a codec leaves after the last word. Silero scores Opus's decoded residue there (a few LSB) as
#: speech for one or two more windows where it scores digital zero as silence, so without this
#: floor a browser caller's turn ended up to 60 ms later than the same words over a Twilio line.
SILENCE_FLOOR_RMS = 33.0
#: smart-turn v3 looks at (at most) the last 8 s of the turn.
SMART_TURN_SECONDS = 8

# Silero under-reports speech after long silence or music: reset its state every ~2 s of clear
# non-speech (what pipecat's Silero analyzer does).
_RESET_INTERVAL_SECS = 2.0
_RESET_MAX_CONFIDENCE = 0.1
_RESET_LOW_CONFIDENCE_WINDOWS = 5


def _bundled(package: str, name: str) -> str:
    return str(resources.files(package).joinpath(name))


class SileroModel:
    """The Silero VAD ONNX model shipped in ``pipecat-ai``, one session for the whole process
    (onnxruntime sessions are thread-safe; each call's state lives in its :class:`SileroVAD`).

    Args:
        model_path: A Silero VAD v5 ``.onnx``; defaults to the bundled one.
    """

    def __init__(self, model_path: str | Path | None = None) -> None:
        path = model_path or _bundled("pipecat.audio.vad.data", "silero_vad.onnx")
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(path), providers=["CPUExecutionProvider"], sess_options=options
        )

    def analyzer(self, params: VADParams | None = None) -> SileroVAD:
        """A new per-call VAD with its own state."""
        return SileroVAD(self._session, params or VADParams())


class SileroVAD:
    """Voice activity of one audio stream: Silero confidence + smoothed volume -> :class:`VADState`.

    ``analyze`` runs on the caller's thread: a 32 ms window costs ~0.1 ms, less than handing it
    to a thread would.
    """

    def __init__(self, session: ort.InferenceSession, params: VADParams) -> None:
        self._session = session
        self.params = params
        windows_per_second = SAMPLE_RATE / WINDOW_SAMPLES
        self._start_windows = round(params.start_secs * windows_per_second)
        self._stop_windows = round(params.stop_secs * windows_per_second)
        self._buffer = b""
        self._volume = AudioVolumeTracker()
        self._previous_volume = 0.0
        self.state = VADState.QUIET
        self.onset_voiced = False  # the last window sounded like the start of speech
        self._starting = 0
        self._stopping = 0
        self._reset_model()
        self._windows_since_reset = 0
        self._low_confidence_windows = 0

    def _reset_model(self) -> None:
        self._model_state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, _CONTEXT_SAMPLES), dtype=np.float32)

    def voice_confidence(self, window: bytes) -> float:
        """Silero's probability that the 32 ms ``window`` (16 kHz int16) is speech."""
        audio = np.frombuffer(window, dtype=np.int16).astype(np.float32)[None, :] / 32768.0
        x = np.concatenate((self._context, audio), axis=1)
        out, self._model_state = self._session.run(
            None, {"input": x, "state": self._model_state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)}
        )
        self._context = x[:, -_CONTEXT_SAMPLES:]
        confidence = float(np.asarray(out).reshape(-1)[0])
        self._windows_since_reset += 1
        self._low_confidence_windows = (
            self._low_confidence_windows + 1 if confidence < _RESET_MAX_CONFIDENCE else 0
        )
        if (
            self._windows_since_reset * WINDOW_SAMPLES >= _RESET_INTERVAL_SECS * SAMPLE_RATE
            and self.state == VADState.QUIET
            and self._low_confidence_windows >= _RESET_LOW_CONFIDENCE_WINDOWS
        ):
            self._reset_model()
            self._windows_since_reset = 0
        return confidence

    def analyze(self, audio: bytes) -> VADState:
        """Add 16 kHz int16 audio and return the VAD state after it."""
        self._buffer += audio
        size = WINDOW_SAMPLES * 2
        while len(self._buffer) >= size:
            window, self._buffer = self._buffer[:size], self._buffer[size:]
            confidence = self.voice_confidence(window)
            self._volume.update(window, SAMPLE_RATE)
            volume = exp_smoothing(self._volume.volume, self._previous_volume, _VOLUME_SMOOTHING)
            self._previous_volume = volume
            samples = np.frombuffer(window, dtype=np.int16).astype(np.float64)
            audible = float(np.sqrt(np.mean(samples * samples))) >= SILENCE_FLOOR_RMS
            speechlike = audible and confidence >= self.params.confidence
            self.onset_voiced = (
                audible
                and confidence >= min(ONSET_CONFIDENCE, self.params.confidence)
                and volume >= ONSET_VOLUME_SHARE * self.params.min_volume
            )
            self._step(speechlike and volume >= self.params.min_volume)
        return self.state

    def _step(self, voiced: bool) -> None:
        if voiced:
            if self.state == VADState.QUIET:
                self.state, self._starting = VADState.STARTING, 1
            elif self.state == VADState.STARTING:
                self._starting += 1
            elif self.state == VADState.STOPPING:
                self.state, self._stopping = VADState.SPEAKING, 0
        elif self.state == VADState.STARTING:
            self.state, self._starting = VADState.QUIET, 0
        elif self.state == VADState.SPEAKING:
            self.state, self._stopping = VADState.STOPPING, 1
        elif self.state == VADState.STOPPING:
            self._stopping += 1
        if self.state == VADState.STARTING and self._starting >= self._start_windows:
            self.state, self._starting = VADState.SPEAKING, 0
        if self.state == VADState.STOPPING and self._stopping >= self._stop_windows:
            self.state, self._stopping = VADState.QUIET, 0


class SmartTurnModel:
    """smart-turn v3.2 (shipped in ``pipecat-ai``), shared by all calls of the process.

    Decisions run on a pool of ``workers`` threads (each ONNX run uses ``cpu_threads``), so
    the event loop never waits on the model; decisions beyond ``workers`` queue.

    Args:
        model_path: A smart-turn v3 ``.onnx``; defaults to the bundled smart-turn-v3.2-cpu.
        workers: Decisions that may run at once.
        cpu_threads: onnxruntime threads per decision.
    """

    def __init__(
        self, model_path: str | Path | None = None, *, workers: int = 2, cpu_threads: int = 1
    ) -> None:
        path = model_path or _bundled("pipecat.audio.turn.smart_turn.data", "smart-turn-v3.2-cpu.onnx")
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = cpu_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(path), providers=["CPUExecutionProvider"], sess_options=options
        )
        self._features = FeatureExtractor(
            feature_size=80, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=SMART_TURN_SECONDS
        )
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="smart-turn")

    def probability_sync(self, audio16k: np.ndarray) -> float:
        """Blocking form of :meth:`probability` (benchmarks, scripts)."""
        audio = np.asarray(audio16k)
        if audio.dtype == np.int16:
            audio = audio.astype(np.float32) / 32768.0
        size = SMART_TURN_SECONDS * SAMPLE_RATE
        audio = audio[-size:].astype(np.float32)
        if len(audio) < size:  # the model reads 8 s: pad in front with silence
            audio = np.pad(audio, (size - len(audio), 0))
        normalized = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
        features = self._features(normalized, padding=0)[:, : size // 160]
        (probabilities,) = self._session.run(
            None, {"input_features": features[None, ...].astype(np.float32)}
        )[:1]
        return float(np.asarray(probabilities).reshape(-1)[0])

    async def probability(self, audio16k: np.ndarray) -> float:
        """Probability, 0..1, that the turn in ``audio16k`` (16 kHz mono) is complete."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.probability_sync, audio16k)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = [
    "ONSET_CONFIDENCE",
    "SAMPLE_RATE",
    "SileroModel",
    "SileroVAD",
    "SmartTurnModel",
    "VADParams",
    "VADState",
]
