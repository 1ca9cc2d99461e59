"""Voice-to-voice latency of closeloop phone calls, next to a stock pipecat bot, 1 to 8 calls at once.

Voice to voice is what a caller waits: from the end of their speech to the first bot audio. It
is measured by closeloop's own Twilio simulator (``telephony/simulator.py``): real espeak-ng
speech in 20 ms mu-law frames over the real media stream, latency from the last frame of an
utterance to the moment the first voiced 20 ms of the reply (RMS over ``VOICED_RMS``, the WebRTC
caller's threshold) plays, bot audio being played back to back at real time from the arrival of
its first ``media`` as Twilio does (see :func:`voiced_reply`): both transports count the reply
from its first audible frame as the caller hears it, not from a packet of leading silence. Only
the caller's turns count, not the greeting.

Two systems take the same calls in the same run, each in its own process on loopback:

* **closeloop**: ``.venv/bin/closeloop serve`` with the demo company on a throwaway PostgreSQL
  database (``closeloop_vbench_<random>`` on ``--admin-url``, dropped at the end; an embedded
  PostgreSQL in a temporary directory when that server is not reachable), no Twilio
  credentials. Callers are the demo customers, so "check my balance" gets a real answer.
* **reference**: ``benchmarks/reference_pipecat.py``, a stock pipecat 1.14 Twilio bot (Silero
  VAD, smart-turn v3, faster-whisper tiny.en, Piper over HTTP) whose "LLM" is an echo: what a
  closeloop user would have without closeloop. Its answers are sentences of similar length.

Each level runs K calls at once; every call dials, hears the greeting and says the script
(``SCRIPT``). At level 1 there are ``--repeats`` rounds (one call each), above it
``--repeats-loaded``; the systems take turns round by round, the one going first alternating,
so a drift in the load of a shared machine falls on both. Both systems get one warm-up call
first, which is not counted. Per level and system: turns measured, p50/p95/max voice to voice,
the server's CPU (its process and children, e.g. Piper: 100% = one core), memory (RSS peak;
RSS per call = growth from the level's start to its peak / concurrent calls), errors (missing
replies, protocol violations Twilio would reject, failed calls), and the CPU the rest of the
machine used meanwhile ("other CPU": on a shared machine, read the latencies next to it).

Transports (``--transport webrtc|twilio|both``, default both): closeloop also takes the same
script as browser calls, an aiortc peer sending Opus over loopback to ``POST /webrtc/offer``
(``benchmarks/webrtc_caller.py``: same espeak-ng audio, latency from the last voiced frame sent to
the first received frame with energy, out of the caller's receive path). Its rows say ``webrtc``;
the reference takes only Twilio. The caller's receive path (``--caller-receive``): ``arrival``
(default) decodes each packet as it arrives, as the Twilio simulator takes each ``media`` as it
arrives, so neither simulated caller has a receive buffer and the transports compare like for
like; ``aiortc`` keeps aiortc's fixed 80 ms jitter buffer (a browser's adaptive one is measured by
``benchmarks/browser_receive.py``). Besides the table, both at arrival: the WebRTC latency to the
packet's arrival and the Twilio latency to the arrival of the ``media`` holding the first voiced
20 ms.

After the calls, closeloop's own per-turn timings (``voice_turn`` events: stt_ms,
turn_manager_ms, tts_first_audio_ms, voice_to_voice_ms; the actions ``GET
/api/conversations/{id}`` shows) are read from the run's throwaway database, so no API token is
needed, to show where its time goes.

Run:  .venv/bin/python benchmarks/voice_latency.py                  (levels 1,4,8; about 6-7 minutes)
      .venv/bin/python benchmarks/voice_latency.py --quick          (level 1, one call; RESULTS.md untouched)
      .venv/bin/python benchmarks/voice_latency.py --levels 1,4 --repeats 3 --systems closeloop
      .venv/bin/python benchmarks/voice_latency.py --systems closeloop --levels 1 --repeats 4   (WebRTC vs Twilio)
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, TextIO  # noqa: E402

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.procstats import cpu_seconds, rss_mb  # noqa: E402
from benchmarks.webrtc_caller import RECEIVE_PATHS, VOICED_RMS, run_webrtc_call  # noqa: E402
from crm_bridge import db  # noqa: E402
from telephony.simulator import CallReport, Utterance, render_tts, run_call  # noqa: E402
from voice.audio import ulaw_to_pcm16  # noqa: E402

RESULTS_FILE = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Voice latency"
CALLER_RECEIVE = "arrival"  # the WebRTC caller's receive path (--caller-receive)
RECEIVE_TEXT = {
    "arrival": "each packet decoded as it arrives, no jitter buffer, as the Twilio simulator takes each `media`",
    "aiortc": "aiortc's jitter buffer, which lets a frame out once four more came: 80 ms",
}
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# Short questions with short answers that the bundled Whisper tiny.en hears right in the
# simulator's espeak-ng voice over 8 kHz mu-law ("what is my account balance" comes out as "well,
# in my account, Madeline", which no intent matches, so closeloop would answer its long "sorry").
SCRIPT = ("what time do you open", "check my balance please", "that's all thanks bye")
WARM_UP_SCRIPT = ("what time do you open",)
# The demo customers (crm_bridge/demo.py): the caller's number identifies them, so the balance
# question gets a real answer. Concurrent calls take them in turn.
CALLERS = ("+15550100001", "+15550100002", "+15550100003")
SYSTEMS = ("closeloop", "reference")
TRANSPORTS = ("twilio", "webrtc")  # the reference takes Twilio calls only

TARGET_P50_1 = 800.0  # single call, ms
TARGET_P95_1 = 1200.0
TARGET_P95_4 = 1500.0
TARGET_RATIO = 1.1  # closeloop p50 / reference p50, per level
TARGET_WEBRTC_DELTA = 50.0  # closeloop WebRTC p50 - Twilio p50, same run, ms

START_TIMEOUT_S = 180.0
SAMPLE_S = 0.25  # resource sampling period
CALL_MAX_S = 120.0
REPLY_TIMEOUT_S = 15.0


# ---- processes -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Server:
    """One system under test, running as a child process on loopback."""

    name: str
    base_url: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready_s: float = 0.0
    database: str = ""

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self) -> None:
        """SIGINT (uvicorn shuts down and stops Piper), then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _spawn(name: str, cmd: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out: TextIO = log.open("w")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


async def _wait_for(server: Server, *, log_line: str, started: float) -> None:
    """Until /healthz answers 200 and the log shows ``log_line``."""
    async with httpx.AsyncClient(timeout=2, trust_env=False) as http:
        healthy = False
        while time.monotonic() - started < START_TIMEOUT_S:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"{server.name} exited with {server.proc.returncode} while starting:\n{_tail(server.log)}"
                )
            if not healthy:
                with contextlib.suppress(httpx.HTTPError):
                    healthy = (await http.get(f"{server.base_url}/healthz")).status_code == 200
            if healthy and log_line in server.log.read_text(errors="replace"):
                server.ready_s = time.monotonic() - started
                return
            await asyncio.sleep(0.25)
    raise RuntimeError(f"{server.name} not ready after {START_TIMEOUT_S:.0f} s:\n{_tail(server.log)}")


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("TWILIO_"):  # a benchmark never calls Twilio
            del env[name]
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"
    return env


def spawn_closeloop(dsn: str, tmp: Path, extra_env: dict[str, str] | None = None) -> Server:
    """Start ``closeloop serve``; wait for it with :func:`wait_ready`."""
    port = free_port()
    env = _base_env()
    env.update({
        "DATABASE_URL": dsn,
        "CLOSELOOP_DEMO_SEED": "true",
        "CLOSELOOP_LOG_LEVEL": "WARNING",
        "CLOSELOOP_DATA_DIR": str(tmp / "closeloop-data"),
    })  # fmt: skip
    env.update(extra_env or {})
    log = tmp / "closeloop.log"
    cmd = [str(ROOT / ".venv" / "bin" / "closeloop"), "serve", "--port", str(port)]
    return Server("closeloop", f"http://127.0.0.1:{port}", _spawn("closeloop", cmd, env, log), log)


def spawn_reference(tmp: Path) -> Server:
    """Start the stock pipecat reference; wait for it with :func:`wait_ready`."""
    port = free_port()
    log = tmp / "reference.log"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reference_pipecat.py"), "--port", str(port)]
    return Server("reference", f"http://127.0.0.1:{port}", _spawn("reference", cmd, _base_env(), log), log)


READY_LINES = {"closeloop": "speech models ready", "reference": "reference: stock pipecat bot on"}


async def wait_ready(server: Server) -> None:
    """Until the server is healthy and has printed that its speech models are loaded."""
    await _wait_for(server, log_line=READY_LINES[server.name], started=time.monotonic())


@dataclass
class Database:
    dsn: str
    kind: str  # "throwaway" or "embedded"
    cleanup: Callable[[], Any] | None = None


async def open_database(admin_url: str, tmp: Path) -> Database:
    """A throwaway database on ``admin_url``'s server, else an embedded PostgreSQL in ``tmp``."""
    try:
        await (await asyncpg.connect(admin_url, timeout=3)).close()
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        print(f"vbench: {admin_url} not reachable ({type(e).__name__}); embedded PostgreSQL", file=sys.stderr)
    else:
        name = f"closeloop_vbench_{secrets.token_hex(4)}"
        await db.ensure_database(admin_url, name)
        return Database(
            db.with_database(admin_url, name), "throwaway", lambda: db.drop_database(admin_url, name)
        )
    embedded = db.EmbeddedPostgres(tmp / "pgdata")
    return Database(await embedded.start(), "embedded", embedded.stop)


# ---- resources -------------------------------------------------------------------------------------
def _is_piper(p: psutil.Process) -> bool:
    try:
        return any("piper.http_server" in part for part in p.cmdline())
    except psutil.Error:
        return False


class ResourceWatch:
    """CPU time and RSS of a server's process tree over a window, sampled every ``SAMPLE_S``.

    CPU time is summed per process id over the window, so a child that exits mid-window keeps
    the time it had at its last sample.
    """

    def __init__(self, server: Server) -> None:
        self._server = server
        self._start_cpu: dict[int, float] = {}
        self._last_cpu: dict[int, float] = {}
        self.rss_before = 0.0
        self.rss_peak = 0.0
        self.piper_rss_peak = 0.0  # the Piper HTTP server child alone
        self.rss_after = 0.0
        self.wall = 0.0
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self._machine0: Any = None
        self._self0 = 0.0
        self.machine_busy_s = 0.0  # CPU seconds every process of the machine used in the window
        self.loadgen_s = 0.0  # CPU seconds of this process (the simulated callers)

    def _sample(self) -> float:
        procs = self._server.tree()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                self._last_cpu[p.pid] = t.user + t.system
                # A process born inside the window counts from zero.
                self._start_cpu.setdefault(p.pid, 0.0 if self._t0 else self._last_cpu[p.pid])
        rss = rss_mb(procs)
        self.rss_peak = max(self.rss_peak, rss)
        self.piper_rss_peak = max(self.piper_rss_peak, rss_mb([p for p in procs if _is_piper(p)]))
        return rss

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            self._sample()

    @staticmethod
    def _busy(t: Any) -> float:
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def start(self) -> None:
        self._t0 = 0.0
        self.rss_before = self.rss_peak = self._sample()
        self._machine0 = psutil.cpu_times()
        self._self0 = cpu_seconds([psutil.Process()])
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._loop(), name="vbench-resource-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.rss_after = self._sample()
        self.wall = time.monotonic() - self._t0
        self.machine_busy_s = self._busy(psutil.cpu_times()) - self._busy(self._machine0)
        self.loadgen_s = cpu_seconds([psutil.Process()]) - self._self0

    @property
    def cpu_seconds(self) -> float:
        return sum(self._last_cpu[pid] - self._start_cpu.get(pid, 0.0) for pid in self._last_cpu)


# ---- calls -------------------------------------------------------------------------------------------
@dataclass
class LevelResult:
    system: str
    calls: int  # concurrent calls
    transport: str = "twilio"
    placed: int = 0  # calls placed in all
    reports: list[CallReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # calls that could not be set up
    wall_s: float = 0.0  # time the rounds of this level took, summed
    server_cpu_s: float = 0.0  # server process and children (Piper)
    loadgen_cpu_s: float = 0.0  # the simulated callers (this process)
    machine_cpu_s: float = 0.0  # every process on the machine
    rss_before_mb: float = 0.0  # at the start of the level's first round
    rss_peak_mb: float = 0.0
    piper_rss_peak_mb: float = 0.0
    breakdown: dict[str, list[float]] = field(default_factory=dict)
    # The other definition of each turn's latency, at arrival: Twilio, to the arrival of the media
    # holding the first voiced 20 ms (leading silence in the same burst costs nothing there);
    # WebRTC, to the arrival of the first voiced frame's packet (before the caller's jitter buffer).
    other_ms: list[float] = field(default_factory=list)

    @property
    def cpu_pct(self) -> float:
        """Server CPU, 100 = one core."""
        return 100 * self.server_cpu_s / self.wall_s if self.wall_s else float("nan")

    @property
    def loadgen_pct(self) -> float:
        return 100 * self.loadgen_cpu_s / self.wall_s if self.wall_s else float("nan")

    @property
    def others_pct(self) -> float:
        """Everything else on the machine: PostgreSQL, the idle other system, unrelated jobs."""
        other = self.machine_cpu_s - self.server_cpu_s - self.loadgen_cpu_s
        return 100 * other / self.wall_s if self.wall_s else float("nan")

    @property
    def latencies(self) -> list[float]:
        return [ms for r in self.reports for ms in r.latencies_ms]

    @property
    def turns(self) -> int:
        return len(self.latencies)

    def ms(self, p: float) -> float:
        values = self.latencies
        return float(np.percentile(values, p)) if values else float("nan")

    @property
    def max_ms(self) -> float:
        return max(self.latencies, default=float("nan"))

    @property
    def rss_per_call_mb(self) -> float:
        return max(0.0, self.rss_peak_mb - self.rss_before_mb) / max(1, self.calls)

    @property
    def problems(self) -> list[str]:
        out = list(self.failures)
        for r in self.reports:
            out += [f"{r.call_sid[:10]}: {e}" for e in r.errors]
            out += [f"{r.call_sid[:10]}: violation {v}" for v in r.violations]
            if r.unspoken:
                out.append(
                    f"{r.call_sid[:10]}: {r.unspoken} utterance(s) not spoken, call ended by {r.ended_by}"
                )
        return out


def _script(texts: Sequence[str]) -> list[Utterance]:
    return [Utterance(text=t) for t in texts]


ULAW_FRAME = 160  # 20 ms of 8 kHz mu-law


def voiced_reply(
    report: CallReport, media: Sequence[tuple[str, float, float]]
) -> tuple[CallReport, list[float]]:
    """``report`` with each turn's reply starting when its first voiced 20 ms plays, and the
    latencies to the arrival of the first media holding it.

    closeloop sends a Twilio call its audio as fast as it is synthesized and Twilio plays it at
    real time, so a reply's leading silence arrives in the same burst as its first words but is
    still heard before them; a browser call's track is paced at real time by the server, so there
    the silence takes its time on the wire. Counting both from the moment the first voiced 20 ms
    plays (on Twilio: played back to back from the first media's arrival, as the simulator's
    playout does) makes them the same measure.

    ``media``: (event, ms since the call's start, seconds) of every bot ``media`` and ``clear`` in
    order, as the simulator's ``observe`` tells them; the media payloads are ``report.bot_audio``
    concatenated. A 20 ms is voiced when its RMS is over :data:`VOICED_RMS`.
    """
    voiced: list[tuple[float, float]] = []  # (plays at, arrived at) of each voiced 20 ms
    offset, cursor = 0, 0.0  # where the playout of the queued audio ends, ms
    for event, at_ms, seconds in media:
        if event == "clear":
            cursor = at_ms  # the queued audio is dropped
            continue
        size = round(seconds * 8000)
        pcm = ulaw_to_pcm16(report.bot_audio[offset : offset + size]).astype(np.float64)
        offset += size
        start = max(cursor, at_ms)
        for i in range(0, pcm.size, ULAW_FRAME):
            frame = pcm[i : i + ULAW_FRAME]
            if frame.size and np.sqrt(np.mean(frame * frame)) > VOICED_RMS:
                voiced.append((start + i / 8, at_ms))
        cursor = start + seconds * 1000
    turns, at_arrival = [], []
    for turn in report.turns:
        end = turn.caller_end_ms
        first = next(((p, a) for p, a in voiced if end is not None and a > end), None)
        if first is not None and end is not None:
            at_arrival.append(first[1] - end)
        turns.append(
            dataclasses.replace(
                turn,
                first_bot_audio_ms=None if first is None else first[0],
                latency_ms=None if first is None or end is None else first[0] - end,
            )
        )
    return dataclasses.replace(report, turns=turns), at_arrival


async def _one_call(
    server: Server,
    texts: Sequence[str],
    caller: str,
    cache: Path,
    transport: str = "twilio",
    other_ms: list[float] | None = None,
) -> CallReport:
    """One call; ``other_ms`` gets the turns' latencies by the other definition (see ``LevelResult``)."""
    if transport == "webrtc":  # a browser has no caller ID: the caller is not identified
        return await run_webrtc_call(
            server.base_url,
            _script(texts),
            idle_timeout_s=REPLY_TIMEOUT_S,
            tts_cache_dir=cache,
            arrivals_ms=other_ms,
            receive=CALLER_RECEIVE,
        )
    media: list[tuple[str, float, float]] = []
    report = await run_call(
        server.base_url,
        _script(texts),
        caller=caller,
        max_call_seconds=CALL_MAX_S,
        idle_timeout_s=REPLY_TIMEOUT_S,
        tts_cache_dir=cache,
        observe=lambda event, at_ms, seconds: media.append((event, at_ms, seconds)),
    )
    report, at_arrival = voiced_reply(report, media)
    if other_ms is not None:
        other_ms += at_arrival
    return report


async def run_round(server: Server, result: LevelResult, stagger_s: float) -> None:
    """``result.calls`` simultaneous calls to ``server``; their reports and resources go into ``result``.

    Call *i* dials ``i * stagger_s`` after the first: calls arriving at the same instant would
    speak in lock-step for the whole script (every turn of every call at once), which real
    traffic never does. ``stagger_s=0`` gives that worst case.
    """
    watch = ResourceWatch(server)

    async def caller(slot: int) -> None:
        await asyncio.sleep(slot * stagger_s)
        try:
            result.reports.append(
                await _one_call(
                    server,
                    SCRIPT,
                    CALLERS[slot % len(CALLERS)],
                    cache_dir(),
                    result.transport,
                    result.other_ms,
                )
            )
        except Exception as e:  # a failed call is a result, not a crash of the benchmark
            result.failures.append(f"call failed: {type(e).__name__}: {e}")

    first = result.wall_s == 0.0
    watch.start()
    try:
        await asyncio.gather(*(caller(i) for i in range(result.calls)))
    finally:
        await watch.stop()
    result.placed += result.calls
    result.wall_s += watch.wall
    result.server_cpu_s += watch.cpu_seconds
    result.loadgen_cpu_s += watch.loadgen_s
    result.machine_cpu_s += watch.machine_busy_s
    if first:
        result.rss_before_mb = watch.rss_before
    result.rss_peak_mb = max(result.rss_peak_mb, watch.rss_peak)
    result.piper_rss_peak_mb = max(result.piper_rss_peak_mb, watch.piper_rss_peak)


_CACHE: list[Path] = []


def cache_dir() -> Path:
    """Where the callers' rendered speech is kept for the run."""
    return _CACHE[0]


async def warm_up(server: Server, transport: str = "twilio") -> None:
    """One call, not counted: first inferences and first connections are slower."""
    report = await _one_call(server, WARM_UP_SCRIPT, CALLERS[0], cache_dir(), transport)
    if not report.latencies_ms:
        raise RuntimeError(
            f"{server.name} ({transport}): the warm-up call got no reply:\n{report.format()}\n{_tail(server.log)}"
        )


# ---- closeloop's own per-turn timings ---------------------------------------------------------------
BREAKDOWN_KEYS = ("stt_ms", "turn_manager_ms", "tts_first_audio_ms", "voice_to_voice_ms")


async def voice_turns(dsn: str) -> dict[str, list[dict[str, Any]]]:
    """``voice_turn`` event data of every voice conversation, by call sid (the address).

    Read from the run's own throwaway database (the same rows ``GET /api/conversations/{id}``
    returns as actions), so the benchmark needs no API credentials.
    """
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT c.address, e.data::text AS data FROM events e
               JOIN conversations c ON c.id = e.conversation_id
               WHERE e.kind = 'voice_turn' AND c.channel = 'voice' ORDER BY e.id"""
        )
    finally:
        await conn.close()
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        with contextlib.suppress(ValueError):
            data = json.loads(row["data"])
            if isinstance(data, dict):
                out.setdefault(str(row["address"]), []).append(data)
    return out


def attach_breakdown(result: LevelResult, turns_by_call: dict[str, list[dict[str, Any]]]) -> None:
    result.breakdown = {key: [] for key in BREAKDOWN_KEYS}
    for report in result.reports:
        for turn in turns_by_call.get(report.call_sid, []):
            for key in BREAKDOWN_KEYS:
                value = turn.get(key)
                if isinstance(value, int | float):
                    result.breakdown[key].append(float(value))


async def reference_turns(server: Server) -> list[dict[str, str]]:
    """(heard, answered) of every turn the reference answered so far."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10, trust_env=False) as http:
        return list((await http.get("/turns")).json().get("turns", []))


async def reply_texts(dsn: str, call_sids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(what closeloop heard, what it said) on these calls, from its stored transcripts."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT m.direction, m.body FROM messages m JOIN conversations c ON c.id = m.conversation_id
               WHERE c.channel = 'voice' AND c.address = ANY($1::text[]) ORDER BY c.id, m.seq""",
            list(call_sids),
        )
    finally:
        await conn.close()
    heard = [str(r["body"]) for r in rows if r["direction"] == "in"]
    said = [str(r["body"]) for r in rows if r["direction"] != "in"]
    return heard, said


# ---- report ------------------------------------------------------------------------------------------
COLUMNS = (
    "system",
    "transport",
    "calls",
    "turns",
    "p50 ms",
    "p95 ms",
    "max ms",
    "CPU %",
    "RSS MB",
    "RSS/call MB",
    "errors",
    "other CPU %",
)


def _f(value: float, digits: int = 0) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN -> "-"


def table_rows(results: Sequence[LevelResult]) -> list[tuple[str, ...]]:
    return [
        (r.system, r.transport, str(r.calls), str(r.turns), _f(r.ms(50)), _f(r.ms(95)), _f(r.max_ms), _f(r.cpu_pct),
         _f(r.rss_peak_mb), _f(r.rss_per_call_mb, 1), str(len(r.problems)), _f(r.others_pct))
        for r in results
    ]  # fmt: skip


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, text_columns: int = 1) -> str:
    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), *(fmt.format(*r) for r in rows)])


def _find(
    results: Sequence[LevelResult], system: str, calls: int, transport: str = "twilio"
) -> LevelResult | None:
    return next(
        (r for r in results if r.system == system and r.calls == calls and r.transport == transport), None
    )


def other_definitions(results: Sequence[LevelResult]) -> str:
    """The closeloop lanes' p50 by the other definition of a reply's start (see ``LevelResult.other_ms``)."""
    parts = []
    for r in results:
        if r.system != "closeloop" or not r.other_ms:
            continue
        p50 = float(np.percentile(r.other_ms, 50))
        if r.transport == "webrtc":
            parts.append(
                f"{r.calls} call(s) WebRTC at the packet's arrival (before the caller's receive path) "
                f"p50 {p50:.0f} ms over {len(r.other_ms)} turns"
            )
        else:
            parts.append(
                f"{r.calls} call(s) Twilio at the arrival of the `media` holding the first voiced 20 ms "
                f"(its leading silence arrives in the same burst) p50 {p50:.0f} ms"
            )
    return ("Other definitions: " + "; ".join(parts) + ".") if parts else ""


def webrtc_deltas(results: Sequence[LevelResult]) -> list[tuple[int, float]]:
    """(calls, closeloop WebRTC p50 - Twilio p50 in ms) per level that has both."""
    out = []
    for calls in sorted({r.calls for r in results}):
        twilio, webrtc = _find(results, "closeloop", calls), _find(results, "closeloop", calls, "webrtc")
        if twilio and webrtc and twilio.turns and webrtc.turns:
            out.append((calls, webrtc.ms(50) - twilio.ms(50)))
    return out


def ratios(results: Sequence[LevelResult]) -> list[tuple[int, float]]:
    out = []
    for calls in sorted({r.calls for r in results}):
        ours, ref = _find(results, "closeloop", calls), _find(results, "reference", calls)
        if ours and ref and ours.turns and ref.turns:
            out.append((calls, ours.ms(50) / ref.ms(50)))
    return out


def targets(results: Sequence[LevelResult]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each target the run can judge."""
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    one, four = _find(results, "closeloop", 1), _find(results, "closeloop", 4)
    if one and one.turns:
        out.append(("1 call: p50 <= 800 ms", f"{one.ms(50):.0f} ms", verdict(one.ms(50) <= TARGET_P50_1)))
        out.append(("1 call: p95 <= 1200 ms", f"{one.ms(95):.0f} ms", verdict(one.ms(95) <= TARGET_P95_1)))
    if four and four.turns:
        out.append(("4 calls: p95 <= 1500 ms", f"{four.ms(95):.0f} ms", verdict(four.ms(95) <= TARGET_P95_4)))
    for calls, ratio in ratios(results):
        out.append(
            (
                f"{calls} call(s): closeloop p50 <= 1.1 x reference p50",
                f"{ratio:.2f} x",
                verdict(ratio <= TARGET_RATIO),
            )
        )
    for calls, delta in webrtc_deltas(results):
        out.append(
            (
                f"{calls} call(s): WebRTC p50 within 50 ms of Twilio p50",
                f"{delta:+.0f} ms",
                verdict(abs(delta) <= TARGET_WEBRTC_DELTA),
            )
        )
    return out


def _pct(values: Sequence[float], p: float) -> str:
    return f"{np.percentile(values, p):.0f}" if values else "-"


def breakdown_rows(results: Sequence[LevelResult]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        if r.system != "closeloop" or not r.breakdown:
            continue
        b = r.breakdown
        rows.append((
            f"{r.calls} ({r.transport})", str(len(b["voice_to_voice_ms"])),
            *[f"{_pct(b[k], 50)} / {_pct(b[k], 95)}" for k in BREAKDOWN_KEYS],
            f"{r.ms(50) - float(np.median(b['voice_to_voice_ms'])):.0f}" if b["voice_to_voice_ms"] and r.turns else "-",
        ))  # fmt: skip
    return rows


def time_shares(results: Sequence[LevelResult]) -> str:
    """How a single call's median turn splits, from closeloop's medians (empty without them)."""
    one = _find(results, "closeloop", 1)
    if one is None or not one.breakdown or not one.breakdown["voice_to_voice_ms"] or not one.turns:
        return ""
    b = {k: float(np.median(v)) for k, v in one.breakdown.items() if v}
    client = one.ms(50)
    stt, core, tts = b.get("stt_ms", 0.0), b.get("turn_manager_ms", 0.0), b.get("tts_first_audio_ms", 0.0)
    before = client - b["voice_to_voice_ms"]
    return (
        f"At 1 call the median turn ({client:.0f} ms as the caller hears it) is roughly: end of speech to the VAD's "
        f"speech-stopped {before:.0f} ms, speech to text {stt:.0f} ms (from speech-stopped, end-of-turn "
        f"decision included), turn manager {core:.0f} ms, first synthesized audio {tts:.0f} ms after that "
        "(medians, so they need not add up)."
    )


BREAKDOWN_HEADER = ("calls", "turns", "STT p50/p95", "turn manager p50/p95", "TTS first audio p50/p95",
                    "server v2v p50/p95", "client p50 - server p50")  # fmt: skip


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        model = next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")), model,
        )  # fmt: skip
    return (f"{os.cpu_count()} CPUs (nproc), {model}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")  # fmt: skip


def command_line(argv: Sequence[str]) -> str:
    return " ".join([".venv/bin/python benchmarks/voice_latency.py", *map(shlex.quote, argv)])


@dataclass
class Run:
    argv: list[str]
    results: list[LevelResult]
    notes: list[str]
    started: dt.datetime
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    stagger_s: float = 1.0


def render_section(run: Run) -> str:
    rows = table_rows(run.results)
    levels = sorted({r.calls for r in run.results})
    lines = [
        SECTION,
        "",
        "`benchmarks/voice_latency.py`: voice to voice (end of the caller's speech to the first bot audio, as "
        f"closeloop's Twilio simulator measures it) for {', '.join(str(c) for c in levels)} simultaneous call(s), "
        "against closeloop (`closeloop serve`, demo company, throwaway PostgreSQL) and, in the same run, a stock "
        "pipecat 1.14 bot with an echo instead of an LLM (`benchmarks/reference_pipecat.py`: Silero VAD, "
        "smart-turn v3, faster-whisper tiny.en int8, Piper over HTTP with the same voice). Script per call: "
        f"greeting (not counted), then {', '.join(repr(s) for s in SCRIPT)}. A level's calls overlap for their "
        f"whole length and dial {run.stagger_s:g} s apart; the systems take turns round by round. CPU: the server "
        "process and its children (Piper), 100% = one core. RSS/call: growth of the server's RSS from the "
        "level's start to its peak / calls. Other CPU: the rest of the machine meanwhile (PostgreSQL, the idle "
        "other system, unrelated jobs); on a shared machine read the latencies next to it. Errors: replies that "
        "did not start within 15 s (the simulator then goes on, so a late reply lands in the next turn), "
        "protocol violations, failed calls.",
        "",
        f"Run {run.started:%Y-%m-%d %H:%M} UTC on {machine()}. Load average {run.load_before[0]:.2f} before and "
        f"{run.load_after[0]:.2f} after: the machine is shared, so latencies are indicative.",
        "",
        f"Command: `{command_line(run.argv)}`",
        "",
        markdown_table(COLUMNS, rows, text_columns=2),
        "",
    ]
    rs = ratios(run.results)
    if any(r.transport == "webrtc" for r in run.results):
        lines.append(
            "Transport `webrtc`: the same script as browser calls, an aiortc peer sending Opus over loopback "
            "(`benchmarks/webrtc_caller.py`). Both transports count the reply from the moment its first voiced "
            f"20 ms (int16 RMS > {VOICED_RMS:g}) plays: on WebRTC the first such frame out of the caller's receive "
            f"path ({RECEIVE_TEXT[CALLER_RECEIVE]}, then the Opus decoder; the server paces the track at real "
            "time), on "
            "Twilio its place in the bot audio played back to back at real time from the first `media`'s "
            "arrival (closeloop sends Twilio each reply in bursts, faster than real time; Twilio plays it at "
            "real time). Browser callers are anonymous (no caller ID), so "
            "'check my balance' is answered with a request to identify rather than the balance; the first "
            "audio of a reply, not its length, is what is measured."
        )
        lines.append("")
        other = other_definitions(run.results)
        if other:
            lines += [other, ""]
    if rs:
        lines.append(
            "closeloop p50 / reference p50: " + ", ".join(f"{c} call(s) {x:.2f}x" for c, x in rs) + "."
        )
        lines.append("")
    judged = targets(run.results)
    if judged:
        lines += ["| target | measured | verdict |", "|---|---:|---|"]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in judged]
        lines.append("")
    brows = breakdown_rows(run.results)
    if brows:
        lines += [
            "Where closeloop's time goes (its own `voice_turn` events, ms; server v2v counts from the VAD's "
            "speech-stopped event, so the client figure is larger by the VAD's stop delay and the network):",
            "",
            markdown_table(BREAKDOWN_HEADER, brows),
            "",
        ]
        share = time_shares(run.results)
        if share:
            lines += [share, ""]
    lines += [f"- {n}" for n in run.notes]
    return "\n".join(lines).rstrip() + "\n"


def write_section(text: str, path: Path = RESULTS_FILE) -> None:
    """Replace this benchmark's section of RESULTS.md (or add it); other sections stay as they are."""
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    found = re.search(rf"^{re.escape(SECTION)}[ \t]*\n.*?(?=^## |\Z)", current, re.MULTILINE | re.DOTALL)
    if found:
        updated = current[: found.start()] + text + "\n" + current[found.end() :]
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    path.write_text(updated.rstrip("\n") + "\n", encoding="utf-8")


def print_report(run: Run) -> None:
    print()
    print(text_table(COLUMNS, table_rows(run.results)))
    for calls, ratio in ratios(run.results):
        print(f"closeloop p50 / reference p50 at {calls} call(s): {ratio:.2f}x")
    for calls, delta in webrtc_deltas(run.results):
        print(f"closeloop WebRTC p50 - Twilio p50 at {calls} call(s): {delta:+.0f} ms")
    other = other_definitions(run.results)
    if other:
        print(other)
    for t, m, v in targets(run.results):
        print(f"target {t}: {m} -> {v}")
    brows = breakdown_rows(run.results)
    if brows:
        print("\ncloseloop voice_turn events (ms):")
        print(text_table(BREAKDOWN_HEADER, brows))
    for r in run.results:
        for problem in r.problems[:10]:
            print(f"  {r.system} {r.transport} x{r.calls}: {problem}")
    for n in run.notes:
        print(f"- {n}")


# ---- main ---------------------------------------------------------------------------------------------
def _levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels are positive integers, e.g. 1,4,8")
    return levels


def repeats_for(args: argparse.Namespace, calls: int) -> int:
    """Rounds of a level: ``--repeats`` at level 1, ``--repeats-loaded`` above."""
    return args.repeats if calls == 1 else args.repeats_loaded


async def run(args: argparse.Namespace, argv: list[str]) -> Run:
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    systems = [s for s in SYSTEMS if s in args.systems]
    # (system, transport) lanes: closeloop takes each chosen transport, the reference Twilio only
    lanes = [(name, t) for name in systems for t in (args.transports if name == "closeloop" else ("twilio",))]
    notes: list[str] = []
    results: list[LevelResult] = []
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="closeloop-vbench-") as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "caller-speech"
        _CACHE[:] = [cache]
        database: Database | None = None
        try:
            for text in {*SCRIPT, *WARM_UP_SCRIPT}:  # espeak once, before any call
                await asyncio.to_thread(render_tts, text, cache_dir=cache)
            if "closeloop" in systems:
                database = await open_database(args.admin_url, tmp)
                print(f"vbench: starting closeloop ({database.kind} database)", file=sys.stderr)
                servers["closeloop"] = spawn_closeloop(database.dsn, tmp, dict(args.server_env))
            if "reference" in systems:
                print("vbench: starting the stock pipecat reference", file=sys.stderr)
                servers["reference"] = spawn_reference(tmp)
            await asyncio.gather(*(wait_ready(server) for server in servers.values()))
            print("vbench: " + ", ".join(f"{s.name} ready in {s.ready_s:.1f} s" for s in servers.values())
                  + "; one warm-up call each", file=sys.stderr)  # fmt: skip

            async def warm_lanes(name: str) -> None:
                for lane in lanes:
                    if lane[0] == name:
                        await warm_up(servers[name], lane[1])

            await asyncio.gather(*(warm_lanes(name) for name in servers))
            reference_turns_before = (
                len(await reference_turns(servers["reference"])) if "reference" in servers else 0
            )
            for index, calls in enumerate(args.levels):
                level = {lane: LevelResult(lane[0], calls, lane[1]) for lane in lanes}
                repeats = repeats_for(args, calls)
                for rnd in range(repeats):
                    # Alternate which lane goes first, round by round, so a drift in the
                    # machine's load (it may be shared) falls on all.
                    order = lanes if (index + rnd) % 2 == 0 else lanes[::-1]
                    for lane in order:
                        print(
                            f"vbench: {lane[0]} ({lane[1]}): {calls} call(s) at once, round {rnd + 1}/{repeats}",
                            file=sys.stderr,
                        )
                        await run_round(servers[lane[0]], level[lane], args.stagger)
                for lane in lanes:
                    r, name = level[lane], f"{lane[0]} ({lane[1]})"
                    print(f"vbench:   {name} x{calls}: {r.turns} turns, p50 {_f(r.ms(50))} ms, p95 {_f(r.ms(95))} ms, "
                          f"{len(r.problems)} problem(s), other CPU {_f(r.others_pct)}%", file=sys.stderr)  # fmt: skip
                    results.append(r)
            if "closeloop" in servers and database is not None:
                ours = [r for r in results if r.system == "closeloop"]
                by_call = await voice_turns(database.dsn)
                for r in ours:
                    attach_breakdown(r, by_call)
                sids = [rep.call_sid for r in ours[:1] for rep in r.reports[:1]]
                heard, said = await reply_texts(database.dsn, sids)
                if heard or said:
                    notes.append(
                        "closeloop, first measured call: heard "
                        + "; ".join(f'"{h}"' for h in heard)
                        + " and said "
                        + " / ".join(f'"{a}"' for a in said)
                        + "."
                    )
            if "reference" in servers:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    pairs = (await reference_turns(servers["reference"]))[reference_turns_before:][
                        : len(SCRIPT)
                    ]
                    if pairs:
                        notes.append("reference, first measured call: " + "; ".join(
                            f"heard \"{p['heard']}\", said \"{p['answered']}\"" for p in pairs) + ".")  # fmt: skip
            if database is not None:
                notes.append(f"closeloop database: {database.kind}.")
        finally:
            for server in servers.values():
                server.stop()
            if database is not None and database.cleanup is not None:
                with contextlib.suppress(Exception):
                    await database.cleanup()
    if results:
        notes.append(
            "other CPU % = the rest of the machine during the level (PostgreSQL, the idle other system, unrelated "
            "jobs; 100 = one core). The simulated callers (this process) used "
            + ", ".join(f"{r.system} {r.transport} x{r.calls} {r.loadgen_pct:.0f}%" for r in results)
            + ". Piper's share of the RSS peak: "
            + ", ".join(f"{r.system} {r.transport} x{r.calls} {r.piper_rss_peak_mb:.0f} MB" for r in results)
            + "."
        )
    ready = ", ".join(f"{s.name} {s.ready_s:.0f} s" for s in servers.values())
    notes.append(
        f"Ready (healthy and speech models loaded): {ready}. Each system took one warm-up call first (not counted); "
        f"rounds per level: {args.repeats} at level 1, {args.repeats_loaded} above it."
    )
    if "reference" in systems:
        notes.append(
            "Reference set-up (see benchmarks/reference_pipecat.py): pipecat's defaults except TwilioFrameSerializer "
            "auto_hang_up=False (no credentials), PipelineParams audio_in_sample_rate=16000 (WhisperSTTService "
            "does not resample; 8 kHz in would be read as 16 kHz), WhisperSTTService given the local "
            "tiny.en folder with device=cpu, compute_type=int8, PiperHttpTTSService base_url .../synthesize. As "
            "stock, it builds one Whisper, Silero and smart-turn model per call and decodes with faster-whisper's "
            "defaults (beam 5); it answers after smart-turn (VAD stop_secs 0.2) or its 3 s silence fallback."
        )
    return Run(argv, results, notes, started, load_before, os.getloadavg(), args.stagger)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levels", type=_levels, default=[1, 4, 8], help="concurrent calls per level (default: 1,4,8)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="rounds at level 1, each caller placing one call per round (default: 2)",
    )
    parser.add_argument("--repeats-loaded", type=int, default=1, help="rounds above level 1 (default: 1)")
    parser.add_argument(
        "--stagger",
        type=float,
        default=1.0,
        help="seconds between the starts of a level's calls; 0 = all at once, in lock-step (default: %(default)s)",
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="closeloop,reference (default: both)")
    parser.add_argument(
        "--transport",
        choices=("webrtc", "twilio", "both"),
        default="both",
        help="how closeloop's callers call: browser calls over WebRTC, Twilio media streams, or both "
        "(default: %(default)s); the reference takes Twilio calls only",
    )
    parser.add_argument(
        "--admin-url", default=ADMIN_URL, help="PostgreSQL for the throwaway database (default: %(default)s)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: level 1, one call per system; RESULTS.md untouched"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="extra environment for closeloop (repeatable); the results go to their own RESULTS.md section",
    )
    parser.add_argument(
        "--caller-receive",
        choices=RECEIVE_PATHS,
        default="arrival",
        help="the WebRTC caller's receive path: decode each packet as it arrives, like the Twilio "
        "simulator (arrival, default), or through aiortc's fixed 80 ms jitter buffer (aiortc)",
    )
    return parser


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown or not args.systems:
        print(f"vbench: unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    args.transports = TRANSPORTS if args.transport == "both" else (args.transport,)
    if args.quick:
        args.levels, args.repeats, args.repeats_loaded = [1], 1, 1
    global SECTION, CALLER_RECEIVE
    CALLER_RECEIVE = args.caller_receive
    if "webrtc" in args.transports:  # its own section: the Twilio-only history stays as recorded
        SECTION = "## Voice latency: browser calls (WebRTC) and Twilio"
    if args.server_env:
        SECTION = f"{SECTION} ({', '.join(f'{k}={v}' for k, v in args.server_env)})"
    result = asyncio.run(run(args, argv))
    print_report(result)
    if not args.quick and not args.no_write:
        write_section(render_section(result))
        print(f'\nwrote the "{SECTION[3:]}" section of {RESULTS_FILE.relative_to(ROOT)}')
    problems = sum(len(r.problems) for r in result.results)
    return 1 if problems or not result.results else 0


if __name__ == "__main__":
    sys.exit(main())
