"""Development set for the weak-match hold (``pipeline.intent_engine.SURE_SCORE``).

A caller who pauses mid-sentence ("can you check on the ... running shoes") is often heard by
tiny.en as a finished but wrong sentence ("Can you hear it come this?"), which may then match an
intent and get answered inside the pause. This renders a development set, kept apart from the
turn-taking benchmark's held-out callers (other espeak-ng voice variants, other phrasings):
mid-sentence fragments and finished requests, phone band with noise, transcribed the way calls
transcribe (mu-law 8 kHz, ``Upsampler`` to 16 kHz, ``WhisperSTT`` defaults with the vocabulary
prompt), then classified by the shipped intents (``intents.yaml``). It prints, per recording,
what Whisper wrote, its ``avg_logprob``, whether the text reads as finished, the intent and its
score, and a summary of the score ranges by group: the numbers ``SURE_SCORE`` was chosen from.

Run: ``.venv/bin/python benchmarks/weak_match.py`` (prints only; a few minutes on 2 cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads

import asyncio  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import turn_taking_material as material  # noqa: E402
from voice.audio import ULAW_RATE, pcm16_to_ulaw  # noqa: E402

#: Voices not used by the turn-taking benchmark's held-out set (other espeak-ng variants, Piper at
#: a rate between its two).
DEV_VOICES = (
    material.Voice("dev-us-m2", "espeak", "en-us+m2", 170, 40),
    material.Voice("dev-gb-f1", "espeak", "en-gb+f1", 155, 60),
    material.Voice("dev-rp-m5", "espeak", "en-gb-x-rp+m5", 160, 45),
    material.Voice("dev-carib-f3", "espeak", "en-029+f3", 165, 60),
    material.Voice("dev-scot-m4", "espeak", "en-gb-scotland+m4", 150, 35),
    material.Voice("dev-us-f5", "espeak", "en-us+f5", 175, 55),
    material.Voice("dev-piper", "piper", piper_length_scale=1.05),
)
FRAGMENTS = (
    "I'd like to talk about the",
    "my daughter ordered a",
    "could you look into the",
    "I was charged for",
    "the tracking page says that",
    "I need to update my",
    "is there any way to",
    "we received the wrong",
    "can you tell me if the",
    "I placed an order for",
    "the delivery driver left my",
    "I want to know why the",
    "so I bought a",
    "I'm trying to return the",
    "the coat I got is",
    "yesterday I got an email about",
)
FINISHED = (
    "where is my package",
    "I want to return these boots",
    "please cancel my subscription",
    "my card was charged twice",
    "can I change my delivery address",
    "the jacket is too small",
    "when will my refund arrive",
    "I never got my order",
    "I need a new return label",
    "my parcel arrived broken",
    "how do I reset my password",
    "thank you that's all",
    "I'd like to speak to a manager",
    "what is your returns policy",
    "the box was empty",
    "my order number is 5 2 7 1",
)
TAIL_S = 0.25  # the silence after the words that the call's early transcript also holds


@dataclass
class Row:
    group: str
    voice: str
    said: str
    heard: str
    avg_logprob: float | None
    finished: bool
    intent: str | None
    score: float


def phone_audio(voice: material.Voice, text: str, seed: int) -> np.ndarray:
    """``text`` as a call hears it: phone band, -18 dBFS, pink noise at 20 dB SNR, mu-law, 16 kHz."""
    from voice.speech_stack import Upsampler  # noqa: PLC0415

    speech = material._phone_speech(voice, text)
    speech *= 10 ** (material.SPEECH_DBFS / 20) * 32768 / max(material._voiced_rms(speech), 1e-9)
    line = np.concatenate([speech, np.zeros(int(TAIL_S * ULAW_RATE))])
    noise = material._pink_noise(line.size, np.random.default_rng(seed))
    line += noise * 10 ** ((material.SPEECH_DBFS - material.SNR_DB) / 20) * 32768
    ulaw = pcm16_to_ulaw(line.clip(-32768, 32767).astype(np.int16))
    upsample = Upsampler()
    return np.concatenate([upsample(ulaw[i : i + 160]) for i in range(0, len(ulaw), 160)])


async def measure() -> list[Row]:
    from app.engines import shared_encoder  # noqa: PLC0415
    from crm_bridge.intents_store import load_yaml  # noqa: PLC0415
    from pipeline.intent_engine import EmbeddingIntentClassifier  # noqa: PLC0415
    from voice.spoken_text import sounds_finished  # noqa: PLC0415
    from voice.stt import WhisperSTT  # noqa: PLC0415

    classifier = EmbeddingIntentClassifier(shared_encoder())
    classifier.load(load_yaml(ROOT / "intents.yaml"))
    stt = WhisperSTT()
    await stt.transcribe(np.zeros(16000, np.int16))  # warm up
    rows = []
    for group, texts in (("fragment", FRAGMENTS), ("finished", FINISHED)):
        for index, text in enumerate(texts):
            for offset in (0, 3):  # each phrase in two voices
                voice = DEV_VOICES[(index + offset) % len(DEV_VOICES)]
                heard = await stt.transcribe(phone_audio(voice, text, seed=index * 7 + offset))
                match = classifier.classify(heard.text)
                row = Row(
                    group, voice.name, text, heard.text, heard.avg_logprob,
                    sounds_finished(heard.text), match.intent, match.score,
                )  # fmt: skip
                rows.append(row)
                print(f"weak-match: {group} {voice.name}: {heard.text!r}", file=sys.stderr)
    return rows


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f} (n={len(values)})" if values else "-"


def report(rows: list[Row]) -> str:
    from pipeline.intent_engine import SURE_SCORE  # noqa: PLC0415

    lines = [
        "| group | voice | said | Whisper wrote | avg_logprob | reads finished | intent | score |",
        "|---|---|---|---|---:|---|---|---:|",
    ]
    for r in rows:
        lp = "-" if r.avg_logprob is None else f"{r.avg_logprob:.2f}"
        lines.append(
            f"| {r.group} | {r.voice} | {r.said} | {r.heard} | {lp} | {'yes' if r.finished else 'no'} "
            f"| {r.intent or '-'} | {r.score:.2f} |"
        )
    lines.append("")
    for group in ("fragment", "finished"):
        of = [r for r in rows if r.group == group]
        matched = [r.score for r in of if r.intent is not None]
        logprobs = [r.avg_logprob for r in of if r.avg_logprob is not None]
        weak = sum(1 for s in matched if s < SURE_SCORE)
        lines.append(
            f"- {group}: {len(of)} recordings; matched an intent {len(matched)}, scores {_range(matched)}; "
            f"under SURE_SCORE {SURE_SCORE}: {weak}; avg_logprob {_range(logprobs)}"
        )
    return "\n".join(lines)


def main() -> int:
    print(report(asyncio.run(measure())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
