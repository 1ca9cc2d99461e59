"""The development set behind closeloop's turn-taking rules: what a rule was chosen on, kept apart
from ``benchmarks/turn_taking.py``'s held-out callers (other voices, other phrasing).

Two studies, offline (no server, no calls), on the benchmark's phone line (8 kHz phone band, pink
noise at 20 dB SNR, mu-law, closeloop's 8 -> 16 kHz resampler):

* ``onsets``: when does the bot pause for a caller who speaks over it? For 14 interruptions and
  8 backchannels said by 8 development voices (half the grid: 88 recordings), each fed at 8
  phases of Silero's 32 ms window (a call's window phase is wherever its samples so far left it),
  the time from the caller's first sound to the first window that counts as an onset, for
  several onset confidences (``voice.vad.ONSET_CONFIDENCE``); and how many onsets 60 noise
  recordings (keyboard, breath, music, thumps, traffic; 5 s each at the speech level) and
  48 coughs cause at each level.
* ``pauses``: can a mid-sentence pause be told from a finished sentence when the turn is
  decided (0.3 s of silence)? 16 trailing-off fragments ("I'd like to return the") and 20
  finished sentences (4 with order numbers) in the same voices: smart-turn's probability, the
  speculative transcript (tiny.en with the vocabulary prompt, on the audio the call transcribes
  at the VAD's stop), Whisper's 4-best list, and how often each candidate rule would answer at
  the short pause ("fast": a fragment answered fast is a cut-in if the caller goes on after
  0.6-0.9 s) or wait 0.8 s ("long") or 1.2 s ("hold").

Run:  .venv/bin/python benchmarks/turn_dev.py               (both; about 3 minutes)
      .venv/bin/python benchmarks/turn_dev.py onsets        (about 40 s)
Writes the "## Turn taking: development set" section of benchmarks/RESULTS.md (``--no-write``: no).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.turn_taking import RESULTS_FILE, write_section  # noqa: E402
from benchmarks.turn_taking_material import (  # noqa: E402
    Voice,
    band_limit,
    cough_burst,
    on_the_line,
    phone_speech,
)
from benchmarks.voice_latency import machine, markdown_table, text_table  # noqa: E402
from voice.audio import ULAW_RATE, Resampler, pcm16_to_ulaw, ulaw_to_pcm16  # noqa: E402

SECTION = "## Turn taking: development set"

#: None of these is a voice of the held-out benchmark (benchmarks/turn_taking_material.VOICES).
DEV_VOICES: tuple[Voice, ...] = (
    Voice("d-us-m2", "espeak", "en-us+m2", 165, 48),
    Voice("d-gb-f1", "espeak", "en-gb+f1", 150, 60),
    Voice("d-rp-m5", "espeak", "en-gb-x-rp+m5", 170, 40),
    Voice("d-carib-f3", "espeak", "en-029+f3", 160, 55),
    Voice("d-scot-m4", "espeak", "en-gb-scotland+m4", 155, 42),
    Voice("d-us-f5", "espeak", "en-us+f5", 175, 65),
    Voice("d-carib-m2", "espeak", "en-029+m2", 150, 45),
    Voice("d-piper", "piper", piper_length_scale=1.05),
)
INTERRUPTIONS = (
    "no no no, hold on", "nope, that's wrong", "no, not that one", "never mind that", "now wait a second",
    "my mistake, go back", "hmm, no", "mm, I need a human", "no thanks, stop", "wait, wrong account",
    "excuse me", "not now please", "hold on a minute", "um, can I ask something",
)  # fmt: skip
BACKCHANNELS = ("mm hmm", "uh huh", "yep", "sure", "okay", "mhm", "right right", "ah ok")
FRAGMENTS = (
    "I'd like to return the", "can you tell me if my", "I was hoping to get a", "the jacket I ordered is",
    "I need to update my", "could you help me with the", "my package was delivered to", "I want to know why my",
    "the refund for my", "I'm trying to track the", "is there any way to", "I got charged for a",
    "so the shoes I bought were", "I'm not happy with the", "we ordered two of the", "please check the status of",
)  # fmt: skip
FINISHED = (
    "I'd like to return the jacket", "can you tell me if my order shipped", "I was hoping to get a refund",
    "the jacket I ordered is too small", "I need to update my address", "could you help me with a return",
    "my package was delivered to the wrong house", "I want to know why my card was charged",
    "where is the refund for my order", "I'm trying to track my parcel", "is there any way to speed this up",
    "I got charged for a gift card I never bought", "the shoes I bought were the wrong size",
    "I'm not happy with the service", "we ordered two of the lamps", "please check the status of my return",
    "my order is 4 5 2 9", "the order number is 4 5 3 3", "I'm calling about order 4 5 1 8", "it's 4 5 4 4",
)  # fmt: skip
ONSET_LEVELS = (0.7, 0.5, 0.4, 0.35, 0.3, 0.2)
PHASES = 8  # window phases per recording, 4 ms apart (Silero's window is 32 ms)
WINDOW_MS = 32.0


@dataclass
class Take:
    """One development recording on the line: who, what, which study, 8 kHz int16."""

    voice: str
    text: str
    kind: str  # interruption | backchannel | noise | cough | fragment | finished
    pcm: np.ndarray


def _grid(texts: Sequence[str], kind: str, tail_ms: int = 0) -> list[Take]:
    """Half the voices x texts grid (alternating), each on the line with its own noise."""
    out = []
    for vi, voice in enumerate(DEV_VOICES):
        for ti, text in enumerate(texts):
            if (vi + ti) % 2:
                continue
            speech = np.concatenate([phone_speech(voice, text), np.zeros(tail_ms * ULAW_RATE // 1000)])
            rng = np.random.default_rng(zlib.crc32(f"{voice.name}|{text}".encode()))
            out.append(Take(voice.name, text, kind, on_the_line(speech, rng)))
    return out


def _noises() -> list[Take]:
    """Sounds that are not speech, at the speech level, on the same line."""
    rng = np.random.default_rng(7)
    n = 5 * ULAW_RATE
    t = np.arange(n) / ULAW_RATE

    def keyboard() -> np.ndarray:
        x = np.zeros(n)
        for _ in range(30):
            at = int(rng.uniform(0, n - 80))
            x[at : at + 80] += band_limit(rng.standard_normal(80), 300, 3400) * np.exp(-np.arange(80) / 24)
        return x

    def thump() -> np.ndarray:
        x, k = np.zeros(n), int(0.2 * ULAW_RATE)
        x[ULAW_RATE : ULAW_RATE + k] = band_limit(rng.standard_normal(k), 300, 800) * np.exp(
            -np.arange(k) / 400
        )
        return x

    makers: dict[str, Callable[[], np.ndarray]] = {
        "keyboard": keyboard,
        "breath": lambda: band_limit(rng.standard_normal(n), 300, 3400) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t)) ** 2,
        "music": lambda: sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (220, 277, 330, 440))
        * (1 + 0.5 * np.sin(2 * np.pi * 2 * t)),
        "thump": thump,
        "traffic": lambda: band_limit(rng.standard_normal(n), 300, 900) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.2 * t)),
    }  # fmt: skip
    out = [
        Take("noise", name, "noise", on_the_line(make(), rng))
        for name, make in makers.items()
        for _ in range(4)
    ]
    for k in range(6):
        burst = np.concatenate([cough_burst(rng), np.zeros(ULAW_RATE // 2)])
        out.append(Take("noise", f"cough {k + 1}", "cough", on_the_line(burst, rng)))
    return out


def to_16k(pcm8: np.ndarray) -> np.ndarray:
    """What a call's turn detection gets: mu-law on the wire, then closeloop's resampler."""
    return Resampler(ULAW_RATE, 16000).process(ulaw_to_pcm16(pcm16_to_ulaw(pcm8)))


# ---- onsets ----------------------------------------------------------------------------------------
@dataclass
class OnsetStudy:
    levels: tuple[float, ...]
    #: kind -> level -> ms from the first sound to the onset (None: never), per recording and phase
    onset_ms: dict[str, dict[float, list[float | None]]] = field(default_factory=dict)
    #: noise kind -> level -> onsets counted (a new one after 100 ms without an onset window)
    false_onsets: dict[str, dict[float, int]] = field(default_factory=dict)
    recordings: dict[str, int] = field(default_factory=dict)


def study_onsets(levels: Sequence[float] = ONSET_LEVELS) -> OnsetStudy:
    from pipecat.audio.utils import exp_smoothing  # noqa: PLC0415
    from pipecat.audio.volume import AudioVolumeTracker  # noqa: PLC0415

    from voice.vad import ONSET_VOLUME_SHARE, SILENCE_FLOOR_RMS, WINDOW_SAMPLES, SileroModel, VADParams  # noqa: PLC0415

    model, params = SileroModel(), VADParams()
    takes = _grid(INTERRUPTIONS, "interruption") + _grid(BACKCHANNELS, "backchannel") + _noises()
    study = OnsetStudy(tuple(levels))
    for take in takes:
        study.recordings[take.kind] = study.recordings.get(take.kind, 0) + 1
        for phase in range(PHASES if take.kind in ("interruption", "backchannel") else 3):
            lead = ULAW_RATE + phase * 32  # 1 s of line silence, shifted 4 ms per phase
            audio = to_16k(np.concatenate([np.zeros(lead, dtype=np.int16), take.pcm])).tobytes()
            vad, tracker, previous = model.analyzer(params), AudioVolumeTracker(), 0.0
            scored = []  # (confidence, smoothed volume, loud enough) per window
            size = WINDOW_SAMPLES * 2
            for at in range(0, len(audio) - size + 1, size):
                window = audio[at : at + size]
                confidence = vad.voice_confidence(window)
                tracker.update(window, 16000)
                previous = exp_smoothing(tracker.volume, previous, 0.2)
                samples = np.frombuffer(window, dtype=np.int16).astype(np.float64)
                scored.append(
                    (confidence, previous, float(np.sqrt(np.mean(samples**2))) >= SILENCE_FLOOR_RMS)
                )
            for level in levels:
                hits = [
                    c >= level and v >= ONSET_VOLUME_SHARE * params.min_volume and a for c, v, a in scored
                ]
                if take.kind in ("noise", "cough"):
                    counts = study.false_onsets.setdefault(take.kind, {})
                    counts[level] = counts.get(level, 0) + _onsets(hits)
                else:
                    first = next((i for i, h in enumerate(hits) if h), None)
                    ms = None if first is None else (first + 1) * WINDOW_MS - lead * 1000 / ULAW_RATE
                    study.onset_ms.setdefault(take.kind, {}).setdefault(level, []).append(ms)
    return study


def _onsets(hits: Sequence[bool], lost_windows: int = 4) -> int:
    """Onsets in a run of window verdicts; one ends after ``lost_windows`` (~100 ms) without a hit."""
    count, on, quiet = 0, False, 0
    for hit in hits:
        if hit and not on:
            count, on, quiet = count + 1, True, 0
        elif on and not hit:
            quiet += 1
            if quiet >= lost_windows:
                on = False
        elif on:
            quiet = 0
    return count


def _pct(values: Sequence[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else math.nan


def onset_rows(study: OnsetStudy) -> list[tuple[str, ...]]:
    rows = []
    for level in study.levels:
        row = [f"{level:g}"]
        for kind in ("interruption", "backchannel"):
            times = study.onset_ms.get(kind, {}).get(level, [])
            got = [t for t in times if t is not None]
            row += [f"{_pct(got, 50):.0f} / {_pct(got, 95):.0f} / {max(got, default=math.nan):.0f}",
                    f"{len(times) - len(got)}/{len(times)}"]  # fmt: skip
        row += [
            str(study.false_onsets.get("noise", {}).get(level, 0)),
            str(study.false_onsets.get("cough", {}).get(level, 0)),
        ]
        rows.append(tuple(row))
    return rows


ONSET_HEADER = ("onset confidence", "interruptions: onset p50 / p95 / max ms", "never",
                "backchannels: onset p50 / p95 / max ms", "never", "noise onsets", "cough onsets")  # fmt: skip


# ---- pauses ----------------------------------------------------------------------------------------
@dataclass
class PauseTake:
    kind: str  # fragment | finished
    voice: str
    said: str
    heard: str
    smart_turn: float
    alternatives: list[str]


def study_pauses() -> list[PauseTake]:
    import asyncio  # noqa: PLC0415

    from voice.stt import DEFAULT_PROMPT, WhisperSTT  # noqa: PLC0415
    from voice.vad import SmartTurnModel  # noqa: PLC0415

    stt, smart = WhisperSTT(), SmartTurnModel()
    takes = _grid(FRAGMENTS, "fragment", tail_ms=300) + _grid(FINISHED, "finished", tail_ms=300)
    out = []
    for take in takes:
        audio = to_16k(take.pcm)
        at_stop = audio[: audio.size - 1600]  # the VAD confirms the stop 0.2 s after the last word
        heard = asyncio.run(stt.transcribe(at_stop, prompt=DEFAULT_PROMPT)).text
        out.append(PauseTake(take.kind, take.voice, take.text, heard, smart.probability_sync(audio),
                             n_best(stt, at_stop, DEFAULT_PROMPT)))  # fmt: skip
    return out


def n_best(stt: object, audio16k: np.ndarray, prompt: str, k: int = 4) -> list[str]:
    """Whisper's ``k`` best transcripts by beam search, on the encoder window calls use."""
    import ctranslate2  # noqa: PLC0415
    from faster_whisper.tokenizer import Tokenizer  # noqa: PLC0415
    from faster_whisper.transcribe import get_suppressed_tokens  # noqa: PLC0415

    from voice.stt import MIN_WINDOW_SECONDS, SAMPLE_RATE  # noqa: PLC0415

    model = stt._model_sync()  # type: ignore[attr-defined]  # noqa: SLF001 - closeloop's own class
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
    audio = audio16k.astype(np.float32) / 32768.0
    window = max(MIN_WINDOW_SECONDS, math.ceil(audio.size / SAMPLE_RATE) + 2)
    padded = np.zeros(window * SAMPLE_RATE, dtype=np.float32)
    padded[: audio.size] = audio
    features = model.feature_extractor(padded)[:, : window * 100]
    encoded = model.model.encode(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])), to_cpu=False
    )
    result = model.model.generate(
        encoded, [model.get_prompt(tokenizer, tokenizer.encode(" " + prompt), without_timestamps=True)],
        beam_size=k, num_hypotheses=k, max_length=224, suppress_blank=True,
        suppress_tokens=list(get_suppressed_tokens(tokenizer, (-1,)) or []),
    )[0]  # fmt: skip
    return [tokenizer.decode([t for t in ids if t < tokenizer.eot]).strip() for ids in result.sequences_ids]


def _rules() -> dict[str, Callable[[PauseTake], str]]:
    from voice.spoken_text import sounds_finished, sounds_unfinished  # noqa: PLC0415

    def digits_end(text: str) -> bool:
        match = re.search(r"\d[\d\s,.-]*[.?!]?$", text.strip())
        return bool(match) and sum(ch.isdigit() for ch in match.group()) >= 3

    def today(t: PauseTake) -> str:
        if sounds_unfinished(t.heard):
            return "hold"
        return "fast" if t.smart_turn >= 0.5 or sounds_finished(t.heard) else "long"

    def digits_only(t: PauseTake) -> str:
        if sounds_unfinished(t.heard):
            return "hold"
        return "fast" if t.smart_turn >= 0.5 or (sounds_finished(t.heard) and digits_end(t.heard)) else "long"

    def n_best_hold(t: PauseTake) -> str:
        if any(sounds_unfinished(h) for h in [t.heard, *t.alternatives]):
            return "hold"
        return today(t)

    def both(t: PauseTake) -> str:
        return "hold" if any(sounds_unfinished(h) for h in t.alternatives) else digits_only(t)

    return {
        "today: smart-turn >= 0.5, or the transcript reads finished": today,
        "the transcript ends the turn only when it ends in digits": digits_only,
        "today, and hold when any of Whisper's 4 best trails off": n_best_hold,
        "both of the above": both,
        "smart-turn >= 0.5 alone": lambda t: "hold" if sounds_unfinished(t.heard) else ("fast" if t.smart_turn >= 0.5 else "long"),
    }  # fmt: skip


def pause_rows(takes: Sequence[PauseTake]) -> list[tuple[str, ...]]:
    rows = []
    for name, rule in _rules().items():
        row = [name]
        for kind in ("fragment", "finished"):
            verdicts = [rule(t) for t in takes if t.kind == kind]
            row += [f"{verdicts.count(v)}/{len(verdicts)}" for v in ("fast", "long", "hold")]
        rows.append(tuple(row))
    return rows


PAUSE_HEADER = ("rule", "fragments fast (cut-in)", "long (0.8 s)", "hold (1.2 s)",
                "finished fast", "long (0.8 s)", "hold (1.2 s)")  # fmt: skip


# ---- report ----------------------------------------------------------------------------------------
def render_section(
    study: OnsetStudy | None, pauses: list[PauseTake] | None, argv: Sequence[str], seconds: float
) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [SECTION, "", "`benchmarks/turn_dev.py`: the development set the turn-taking rules are chosen on (voices and "
             "phrasing that `benchmarks/turn_taking.py`'s held-out callers do not use); offline, on the same phone line.", "",
             f"Run {when} on {machine()}; {seconds / 60:.1f} min. Command: `{command_line(argv)}`"]  # fmt: skip
    if study is not None:
        n = {k: study.recordings.get(k, 0) for k in ("interruption", "backchannel", "noise", "cough")}
        parts += ["", f"Onsets: {n['interruption']} interruption and {n['backchannel']} backchannel recordings x {PHASES} "
                  f"window phases; ms from the caller's first sound to the first onset window (never: no "
                  f"onset in the recording); noise onsets over {n['noise']} noise recordings x 3 phases, cough "
                  f"onsets over {n['cough']} coughs x 3 phases. Confirming speech keeps Silero's 0.7.", "",
                  markdown_table(ONSET_HEADER, onset_rows(study))]  # fmt: skip
    if pauses is not None:
        frag = sum(t.kind == "fragment" for t in pauses)
        parts += ["", f"Pauses: {frag} fragments and {len(pauses) - frag} finished sentences; what each rule "
                  "does at the end of the speech (fast: answered at 0.3 s of silence).", "",
                  markdown_table(PAUSE_HEADER, pause_rows(pauses))]  # fmt: skip
    return "\n".join(parts) + "\n"


def command_line(argv: Sequence[str]) -> str:
    return " ".join([".venv/bin/python benchmarks/turn_dev.py", *map(shlex.quote, argv)])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", choices=("all", "onsets", "pauses"), default="all")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    study = pauses = None
    if args.study in ("all", "onsets"):
        print("turn-dev: onsets (Silero over 88 recordings x 8 phases, noise, coughs)", file=sys.stderr)
        study = study_onsets()
        print(text_table(ONSET_HEADER, onset_rows(study)), "\n")
    if args.study in ("all", "pauses"):
        print("turn-dev: pauses (smart-turn, tiny.en and its 4-best over 144 recordings)", file=sys.stderr)
        pauses = study_pauses()
        print(text_table(PAUSE_HEADER, pause_rows(pauses)))
    if not args.no_write:
        write_section(render_section(study, pauses, argv, time.monotonic() - started), RESULTS_FILE, SECTION)
        print(f'\nwrote the "{SECTION[3:]}" section of {RESULTS_FILE.relative_to(ROOT)}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
