"""Speech-to-text models on phone audio: word error rate, latency and memory of each Whisper model.

Renders 48 contact-center utterances (orders, refunds, balances, digits, names) with five voices
(four espeak-ng variants and the Piper joe voice), two voices per utterance, so 96 recordings.
Each goes the way a caller's speech reaches closeloop: down to 8 kHz, noise at 20 dB SNR (seeded),
mu-law and back, and up to 16 kHz in 20 ms frames through ``voice.speech_stack.Upsampler``. Piper
samples its prosody, so its recordings differ a little from run to run; espeak-ng's and the noise
do not. Each setup then runs in its own process (so the RSS is its model's own) the way a call
runs it: ``WhisperSTT(model=...)``, warmed up, one utterance at a time, on closeloop's short
encoder window (what calls use) or faster-whisper's 30 s window.

Word error rate: case and punctuation removed; numbers compared digit by digit after number words
become digits ("four five one seven", "4517" and "45 17" are the same), "$20" is "20 dollars".
Latency: ``Transcript.elapsed`` per utterance (the call path's wait); CPU ms is the process's CPU
time per utterance, less sensitive to other work on a shared machine.

Run:  .venv/bin/python benchmarks/stt_models.py             (records in RESULTS.md)
      .venv/bin/python benchmarks/stt_models.py --quick     (12 recordings, RESULTS.md untouched)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from voice.audio import pcm16_to_ulaw, resample, wav_to_pcm16  # noqa: E402

#: What callers say, written as a person would type it; none of it comes from the tests.
PHRASES = [
    "Hi, I'm calling about an order I placed last week",
    "My order number is 7 3 0 2",
    "It's order eight one four six",
    "I never got the blender I paid for",
    "Could you tell me when my package will be delivered",
    "The tracking page hasn't changed in five days",
    "I'd like to return the shoes, they're too small",
    "Can I get my money back for the broken lamp",
    "The refund should go back to my credit card",
    "How much is left on my gift card",
    "What's the balance on my account right now",
    "Why was I charged forty nine dollars",
    "I think you billed me twice this month",
    "Please cancel the subscription before it renews",
    "Can you stop the order before it ships",
    "My name is Maria Lopez",
    "The account is under James Carter",
    "My last name is spelled K E L L Y",
    "My phone number is 6 1 7 5 5 5 0 1 9 2",
    "The zip code is 9 4 1 1 0",
    "The last four digits of my card are 3 3 8 1",
    "Yes, that's the one",
    "No, the other order",
    "Can I speak with a supervisor please",
    "I've been waiting on hold for twenty minutes",
    "The box arrived damaged and the glass is cracked",
    "Is there a charge for sending it back",
    "I want to change the delivery address",
    "Send it to 42 Oak Street instead",
    "Do you have the jacket in a larger size",
    "How long does a refund usually take",
    "I'd like to update my email address",
    "The coupon code didn't work at checkout",
    "Can you apply the discount to my last purchase",
    "I was told I would get a callback yesterday",
    "I want to close my account",
    "Please reset my password",
    "The item I received is the wrong color",
    "Can I exchange it instead of getting a refund",
    "My payment was declined but the money left my bank",
    "When will the new stock come in",
    "I ordered three of them but only two came",
    "That's all, thank you very much",
    "Sorry, could you repeat that",
    "I'd like to pay my bill",
    "What are the fees for express shipping",
    "My order was supposed to arrive on Monday",
    "Could you read me the confirmation number again",
]

#: Caller voices: (label, how it is rendered). Each utterance is said by two of them.
VOICES = [
    ("espeak-ng en-us, 160 wpm", ["-v", "en-us", "-s", "160"]),
    ("espeak-ng en-us+f3, 175 wpm", ["-v", "en-us+f3", "-s", "175"]),
    ("espeak-ng en-gb-x-rp+m3, 150 wpm", ["-v", "en-gb-x-rp+m3", "-s", "150"]),
    ("espeak-ng en-029+f2, 165 wpm", ["-v", "en-029+f2", "-s", "165"]),
    ("Piper en_US-joe-medium", None),
]
SNR_DB = 20.0
LEAD_SECONDS, TAIL_SECONDS = 0.25, 0.35  # line noise around the speech, as the detector cuts it
#: What is measured, as MODEL:THREADS:WINDOW (WINDOW: "short", closeloop's encoder window, or "30s",
#: faster-whisper's own): each bundled model as calls run it, and on the 30 s window.
SETUPS = [
    "tiny.en:2:short:prompt",
    "tiny.en:2:short",
    "base:2:short:prompt",
    "base:2:short",
    "tiny.en:2:30s",
    "base:2:30s",
]


# --- the recordings -----------------------------------------------------------------------------


def _render(text: str, voice: list[str] | None, folder: Path) -> tuple[np.ndarray, int]:
    """``text`` said by ``voice`` (espeak-ng arguments, or None for Piper), as PCM16 and its rate."""
    out = folder / "voice.wav"
    if voice is None:
        from voice.piper_server import default_voice_path  # noqa: PLC0415

        command = [sys.executable, "-m", "piper", "-m", str(default_voice_path()), "-f", str(out)]
        subprocess.run(command, input=text.encode(), check=True, capture_output=True)
    else:
        subprocess.run(["espeak-ng", *voice, "-w", str(out), text], check=True, capture_output=True)
    return wav_to_pcm16(out.read_bytes())


def phone_line(pcm: np.ndarray, rate: int, seed: int) -> np.ndarray:
    """Speech as closeloop gets it from a phone call, at 16 kHz int16 (see the module doc)."""
    from voice.speech_stack import Upsampler  # noqa: PLC0415

    speech = resample(pcm, rate, 8000).astype(np.float64)
    voiced = speech[np.abs(speech) > 0.05 * np.abs(speech).max()]
    noise_rms = np.sqrt(np.mean(voiced**2)) / 10 ** (SNR_DB / 20)
    padded = np.concatenate([np.zeros(int(LEAD_SECONDS * 8000)), speech, np.zeros(int(TAIL_SECONDS * 8000))])
    noisy = padded + np.random.default_rng(seed).normal(0.0, noise_rms, len(padded))
    ulaw = pcm16_to_ulaw(np.clip(noisy, -32768, 32767).astype(np.int16))
    upsample = Upsampler()
    return np.concatenate([upsample(ulaw[i : i + 160]) for i in range(0, len(ulaw), 160)])


@dataclass(frozen=True)
class Recording:
    text: str
    voice: str
    audio: np.ndarray  # 16 kHz int16, as the call path hands it to Whisper


def recordings(quick: bool, folder: Path) -> list[Recording]:
    """The benchmark's recordings: each phrase said by two voices, through the phone line."""
    out: list[Recording] = []
    for index, text in enumerate(PHRASES):
        for voice_index in (index % len(VOICES), (index + 2) % len(VOICES)):
            label, voice = VOICES[voice_index]
            pcm, rate = _render(text, voice, folder)
            out.append(Recording(text, label, phone_line(pcm, rate, seed=len(out))))
            if quick and len(out) >= 12:
                return out
    return out


# --- word error rate ----------------------------------------------------------------------------

_UNITS = "zero one two three four five six seven eight nine".split()
_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)} | {w: 10 + i for i, w in enumerate(_TEENS)}
_NUMBER_WORDS |= {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_SPELLING = {"ok": "okay", "cancelled": "canceled", "colour": "color", "mr": "mister", "st": "street"}
_ORDINALS = {"1st": "first", "2nd": "second", "3rd": "third", "4th": "fourth", "5th": "fifth"}


def _number_words_to_digits(words: list[str]) -> list[str]:
    """Runs of number words as the numbers they say: "forty nine" -> "49", "one hundred" -> "100",
    "seven three" -> "7 3" (digits said one by one stay apart)."""
    out: list[str] = []
    value: int | None = None
    for word in [*words, ""]:
        number = _NUMBER_WORDS.get(word)
        if word in ("hundred", "thousand") and value is not None:
            value *= 100 if word == "hundred" else 1000
        elif number is not None and value is not None and number < 10 and value % 10 == 0 and value >= 20:
            value += number  # "forty" "nine"
        elif number is not None and value is not None and value % 100 == 0 and value >= 100:
            value += number  # "one hundred" "twenty"
        else:
            if value is not None:
                out.append(str(value))
                value = None
            if number is not None:
                value = number
            elif word:
                out.append(word)
    return out


def normalize(text: str) -> list[str]:
    """Words to compare: lower case, no punctuation, numbers as single digits (see the module doc)."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"\$(\d[\d,]*)", r"\1 dollars", text)
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"[^a-z0-9' ]+", " ", text).replace("'", "")
    words = [_SPELLING.get(w, _ORDINALS.get(w, w)) for w in text.split()]
    out: list[str] = []
    for word in _number_words_to_digits(words):
        out.extend(list(word) if word.isdigit() else [word])
    return out


def edit_distance(hypothesis: list[str], reference: list[str]) -> int:
    """Word substitutions, insertions and deletions that turn ``reference`` into ``hypothesis``."""
    row = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        previous, row[0] = row[:], i
        for j, hyp in enumerate(hypothesis, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ref != hyp))
    return row[-1]


# --- one model in its own process ---------------------------------------------------------------


def run_model(setup: str, corpus: Path) -> dict[str, Any]:
    """Load the model of ``setup`` as a call does, transcribe every recording, and report (runs in a child)."""
    import psutil  # noqa: PLC0415

    from voice.stt import DEFAULT_PROMPT, WhisperSTT  # noqa: PLC0415

    model, threads, window, *rest = setup.split(":")
    prompt = DEFAULT_PROMPT if rest == ["prompt"] else None
    process = psutil.Process()
    audio = list(np.load(corpus).values())
    rss_before = process.memory_info().rss

    async def transcribe_all() -> dict[str, Any]:
        stt = WhisperSTT(model=model, cpu_threads=int(threads), short_window=window == "short")
        started = time.perf_counter()
        await stt.load()
        load_seconds = time.perf_counter() - started
        rss_loaded = process.memory_info().rss
        warm_up = (np.random.default_rng(0).standard_normal(16000) * 300).astype(np.int16)
        await stt.transcribe(warm_up)  # as SpeechStack warms up
        texts, elapsed, cpu = [], [], []
        for clip in audio:
            cpu_started = time.process_time()
            transcript = await stt.transcribe(clip, prompt=prompt)
            cpu.append(time.process_time() - cpu_started)
            elapsed.append(transcript.elapsed)
            texts.append(transcript.text)
        stt.close()
        return {
            "texts": texts,
            "elapsed": elapsed,
            "cpu": cpu,
            "load_seconds": load_seconds,
            "rss_model_mib": (rss_loaded - rss_before) / 2**20,
            "rss_loaded_mib": rss_loaded / 2**20,
            "rss_after_mib": process.memory_info().rss / 2**20,
        }

    return asyncio.run(transcribe_all())


def measure(setup: str, corpus: Path) -> dict[str, Any]:
    """``run_model`` in a new Python process, so the RSS measured is this model's alone."""
    command = [sys.executable, __file__, "--child", setup, "--corpus", str(corpus)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- report -------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def _digits(words: list[str]) -> str:
    return "".join(w for w in words if w.isdigit())


def summarize(setup: str, result: dict[str, Any], clips: list[Recording]) -> dict[str, Any]:
    """One table row, and the word error rate per voice."""
    references = [normalize(c.text) for c in clips]
    hypotheses = [normalize(t) for t in result["texts"]]
    errors = [edit_distance(h, r) for h, r in zip(hypotheses, references, strict=True)]
    with_digits = [i for i, r in enumerate(references) if _digits(r)]
    per_voice: dict[str, list[int]] = {}
    for clip, error, reference in zip(clips, errors, references, strict=True):
        counts = per_voice.setdefault(clip.voice, [0, 0])
        counts[0] += error
        counts[1] += len(reference)
    model, threads, window, *rest = setup.split(":")
    return {
        "model": model,
        "threads": threads,
        "window": ("closeloop's short window" if window == "short" else "30 s window")
        + (", vocabulary prompt" if rest == ["prompt"] else ""),
        "wer": sum(errors) / sum(len(r) for r in references),
        "exact": sum(e == 0 for e in errors) / len(errors),
        "digits": sum(_digits(hypotheses[i]) == _digits(references[i]) for i in with_digits)
        / len(with_digits),
        "p50": _percentile(result["elapsed"], 50) * 1000,
        "p95": _percentile(result["elapsed"], 95) * 1000,
        "cpu50": _percentile(result["cpu"], 50) * 1000,
        "load": result["load_seconds"],
        "rss_model": result["rss_model_mib"],
        "rss": result["rss_loaded_mib"],
        "rss_after": result["rss_after_mib"],
        "per_voice": {v: e / n for v, (e, n) in per_voice.items()},
        "worst": sorted(
            zip(errors, [c.text for c in clips], result["texts"], strict=True), key=lambda x: -x[0]
        )[:5],
    }


def table(rows: list[dict[str, Any]], n: int) -> str:
    lines = [
        "| model | threads | encoder | recordings | WER | exact | digit strings right | p50 ms | p95 ms "
        "| CPU ms p50 | load s | RSS after load MiB | model's RSS MiB | RSS after run MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['window']} | {n} | {r['wer']:.3f} | {r['exact']:.2f} | {r['digits']:.2f} "
            f"| {r['p50']:.0f} | {r['p95']:.0f} | {r['cpu50']:.0f} | {r['load']:.2f} | {r['rss']:.0f} "
            f"| {r['rss_model']:.0f} | {r['rss_after']:.0f} |"
        )
    return "\n".join(lines)


def voice_table(rows: list[dict[str, Any]]) -> str:
    voices = list(rows[0]["per_voice"])
    lines = ["| voice | " + " | ".join(f"{r['model']}, {r['window']}" for r in rows) + " |"]
    lines.append("|---|" + "---:|" * len(rows))
    for voice in voices:
        lines.append(f"| {voice} | " + " | ".join(f"{r['per_voice'][voice]:.3f}" for r in rows) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs (nproc), {cpu}, Python {platform.python_version()}, {platform.machine()}"


def record(section: str) -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    text = results.read_text()
    title = "## Speech-to-text models on phone audio"
    text = re.sub(re.escape(title) + r"\n.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip()
    results.write_text(text + "\n\n" + section.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="12 recordings; RESULTS.md untouched")
    parser.add_argument(
        "--setups",
        nargs="+",
        default=SETUPS,
        help="MODEL:THREADS:WINDOW[:prompt], MODEL a key of voice.stt.BUNDLED_MODELS, WINDOW short or 30s, "
        "prompt: Whisper primed with voice.stt.DEFAULT_PROMPT (what calls use)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_model(args.child, args.corpus)))
        return

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        clips = recordings(args.quick, Path(tmp))
        corpus = Path(tmp) / "corpus.npz"
        np.savez(corpus, *[c.audio for c in clips])
        rows = [summarize(setup, measure(setup, corpus), clips) for setup in args.setups]
    load_after = os.getloadavg()[0]
    seconds = sum(len(c.audio) for c in clips) / 16000
    body = table(rows, len(clips))
    print(body)
    print()
    print(voice_table(rows))
    for r in rows:
        print(f"\n{r['model']} ({r['threads']} threads, {r['window']}), most errors:")
        for errors, reference, heard in r["worst"]:
            print(f"  {errors}: {reference!r} -> {heard!r}")
    print(f"\n{len(clips)} recordings, {seconds:.0f} s of audio; ran {time.perf_counter() - started:.0f} s")
    if args.quick:
        return
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    command = "`.venv/bin/python benchmarks/stt_models.py" + (
        f" --setups {' '.join(args.setups)}`" if args.setups != SETUPS else "`"
    )
    record(
        "## Speech-to-text models on phone audio\n\n"
        f"Run {date} on {machine()}; load average {load_before:.2f} before and {load_after:.2f} after "
        "(the machine is shared, so latencies are indicative; CPU ms is less affected). "
        f"Command: {command}.\n\n"
        f"{len(clips)} recordings ({seconds:.0f} s) of {len(PHRASES)} contact-center utterances, each said by two "
        f"of {len(VOICES)} voices, through the phone path: 8 kHz, noise at {SNR_DB:.0f} dB SNR, mu-law, "
        "`Upsampler` to 16 kHz (see the docstring of `benchmarks/stt_models.py`). Each model in its own process, "
        "run as a call runs it (`WhisperSTT(model=...)`, int8, warmed up), on closeloop's short encoder window "
        "and on faster-whisper's 30 s one, with and without the vocabulary prompt calls use "
        "(`voice.stt.DEFAULT_PROMPT`, `CLOSELOOP_STT_PROMPT`). WER over all words (numbers "
        "compared digit by digit); exact: recordings heard without an error; digit strings right: recordings "
        "with a number whose digits all came out right. Latency: `Transcript.elapsed` per recording. "
        "Model's RSS: growth from loading the model.\n\n"
        f"{body}\n\nWER per voice:\n\n{voice_table(rows)}\n"
    )


if __name__ == "__main__":
    main()
