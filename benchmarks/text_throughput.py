"""How many web-chat messages per second can one closeloop server answer, and how fast?

Drives N concurrent web-chat conversations over ``WS /chat`` against the real server, started
as its own process, on real PostgreSQL. Each conversation is a closed loop: it sends its next
message only when the reply to the previous one has arrived. The script mixes the intents a
contact center answers all day (greeting, identify by phone, order status by number, "which
order?" and its answer, opening hours, shipping, balance, thanks) and leaves out refunds,
which are one-off and write much more. Reports messages/s, p50/p95/p99/max reply latency,
errors, and the CPU and memory of the server, PostgreSQL backends and the load generator,
which all share the machine.

Latency rule: a message's latency runs from just before its frame is sent to the arrival of
the last ``reply`` frame carrying its ``id`` that is in hand when the first one arrives. A
reader task queues every frame with its arrival time; once a ``reply`` with the message id is
taken, frames already queued are drained without waiting (no grace period). A second reply
frame that was not yet in hand is counted as "late" and not waited for.

Database: ``--database-url`` / ``BENCH_DATABASE_URL`` (used as is, never dropped), else a
throwaway database ``closeloop_bench_<random>`` on the local PostgreSQL of ``--admin-url``
(dropped at the end), else an embedded PostgreSQL in a temporary directory (started by this
script so it can seed it, passed to the server as ``DATABASE_URL``).

Run:  .venv/bin/python benchmarks/text_throughput.py                 (50 conversations, 30 s)
      .venv/bin/python benchmarks/text_throughput.py --quick         (smoke run, no RESULTS.md)
      .venv/bin/python benchmarks/text_throughput.py --server-workers 2 --procs 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS_FILE = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Text throughput (web chat)"
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_RATE = 200.0  # messages/s
TARGET_P95_MS = 100.0
MESSAGE_TIMEOUT = 15.0  # a reply slower than this counts as an error
ENCODER_CACHE_SIZE = 2048  # pipeline.embeddings.CACHE_SIZE, for the simulated hit rate


# ---- the conversation script ------------------------------------------------------------------------
@dataclass(frozen=True)
class Customer:
    phone: str
    first_name: str
    orders: tuple[str, ...]  # order numbers, newest first; the first two are placed/shipped


@dataclass(frozen=True)
class Step:
    """One customer message: how to word it and a phrase its reply must contain."""

    name: str
    phrasings: tuple[str, ...]
    expect: str  # a format string over the customer and the order number used

    def text(self, customer: Customer, rng: random.Random) -> tuple[str, str]:
        order = rng.choice(customer.orders)
        phrasing = rng.choice(self.phrasings)
        text = _decorate(phrasing, rng).format(phone=customer.phone, order=order)
        return text, self.expect.format(order=order, first_name=customer.first_name)


# Light variation, as people type: the same question in slightly different words, so the
# server's encoder cache sees a realistic share of texts it has not met before. Every
# combination below was checked against the seeded intents (see check_script()).
_OPENERS = ("", "", "", "hi, ", "hey, ", "um ", "so ", "quick question, ", "sorry, ", "also ")
_CLOSERS = ("", "", "", "?", " please", "!", " thx", " pls", " :)", "??")


def _decorate(phrasing: str, rng: random.Random) -> str:
    if phrasing.startswith("="):  # greetings and thanks are typed as they are
        return phrasing[1:] + rng.choice(("", "", "!", "."))
    return rng.choice(_OPENERS) + phrasing + rng.choice(_CLOSERS)


GREETING = Step(
    "greeting",
    (
        "=hi",
        "=hello",
        "=hey there",
        "=good morning",
        "=hi, how are you",
        "=hello, is anybody there",
        "=hey, how's it going",
        "=hi I need some help",
        "=good afternoon",
        "=hello there",
        "=hiya",
    ),
    "Hi",
)
# Asked before the customer is known: the bot asks for a phone number and keeps the question.
ORDER_UNKNOWN = Step(
    "order_unknown",
    (
        "where is order {order}",
        "what's the status of order {order}",
        "can you track order {order} for me",
        "has order {order} shipped yet",
        "when will order {order} arrive",
        "is order {order} on its way",
    ),
    "find your account",
)
# The answer to "what's the phone number on your account?": two reply frames, "I found your
# account" and the status of the order asked about.
IDENTIFY = Step(
    "identify",
    (
        "=my phone number is {phone}",
        "=my number is {phone}",
        "=it's {phone}",
        "={phone}",
        "=the phone on my account is {phone}",
        "=you can find me under {phone}",
        "=I'm {phone}",
        "=my mobile is {phone}",
        "=phone {phone}",
        "=sure, {phone}",
    ),
    "I found your account",
)
ORDER_STATUS = Step(
    "order_status",
    (
        "where is order {order}",
        "what's the status of order {order}",
        "can you track order {order} for me",
        "has order {order} shipped yet",
        "when will order {order} arrive",
        "any news on order {order}",
        "I'd like to know where order number {order} is",
        "track order {order}",
        "status of my order {order}",
        "is order {order} on its way",
        "when is order {order} going to be delivered",
        "order {order}, where is it",
    ),
    "Order {order}",
)
ORDER_WHICH = Step(
    "order_which",
    (
        "where is my order",
        "has my order shipped yet",
        "when will my order arrive",
        "is my order on its way",
        "I'm just checking on an order I made",
        "my order hasn't arrived yet",
        "where's my parcel",
        "what's the status of my order",
        "when is my package going to be delivered",
        "track my order",
    ),
    "Which order is it",
)
ORDER_PICK = Step(
    "order_pick",
    (
        "=the first one",
        "=the second one",
        "=the first",
        "=second one",
        "=the last one",
        "=the first one please",
    ),
    "Order ",
)
FAQ_HOURS = Step(
    "faq_hours",
    (
        "what are your opening hours",
        "when are you open",
        "what time do you open",
        "what time do you close",
        "are you open on saturday",
        "are you open on weekends",
        "what are your hours",
        "how late are you open tonight",
        "what are the support hours",
        "when can I call customer service",
        "what are your business hours",
    ),
    "Monday to Friday",
)
FAQ_SHIPPING = Step(
    "faq_shipping",
    (
        "how long does shipping take",
        "how much is shipping",
        "what are your shipping costs",
        "do you offer free shipping",
        "do you ship internationally",
        "how fast is express delivery",
        "what are the delivery options",
        "what does delivery cost",
        "how many business days is standard shipping",
        "what shipping methods do you have",
    ),
    "Standard shipping",
)
BALANCE = Step(
    "balance",
    (
        "what's my balance",
        "how much do I owe",
        "what is my account balance",
        "check my balance",
        "how much store credit do I have",
        "do I have any credit on my account",
        "can you tell me my balance",
        "what's the amount due on my account",
        "do I have an unpaid balance",
        "how much credit have I got",
    ),
    "Your account balance is",
)
THANKS = Step(
    "thanks",
    (
        "=thanks",
        "=thank you",
        "=thanks, that's all",
        "=great, thanks",
        "=ok thank you goodbye",
        "=cheers",
        "=thanks a lot",
        "=that's all for now",
        "=thanks for the help, bye",
        "=perfect, thank you",
    ),
    "Thanks for contacting us",
)

OPENING = (GREETING, ORDER_UNKNOWN, IDENTIFY)
CYCLE = (ORDER_STATUS, FAQ_HOURS, BALANCE, ORDER_WHICH, ORDER_PICK, FAQ_SHIPPING, THANKS)
ALL_STEPS = (
    GREETING,
    ORDER_UNKNOWN,
    IDENTIFY,
    ORDER_STATUS,
    ORDER_WHICH,
    ORDER_PICK,
    FAQ_HOURS,
    FAQ_SHIPPING,
    BALANCE,
    THANKS,
)


def session_steps(count: int) -> list[Step]:
    """The steps of one web-chat session: greet, ask, identify when asked, then cycle."""
    steps = list(OPENING)
    while len(steps) < count:
        steps.extend(CYCLE)
    return steps[:count]


# ---- load generator (runs in its own process) --------------------------------------------------------
@dataclass
class WorkerPlan:
    url: str
    conversations: int
    messages_per_conversation: int
    start: float  # time.monotonic() (system-wide on Linux) when clients start
    measure_from: float
    stop: float
    customers: list[Customer]
    seed: int


@dataclass
class WorkerResult:
    latencies: list[float] = field(default_factory=list)  # seconds, messages inside the window
    welcome_latencies: list[float] = field(default_factory=list)
    sent: list[tuple[float, str]] = field(default_factory=list)  # (send time, text) of every message
    messages: int = 0  # answered messages inside the window
    answered_total: int = 0
    multi_frame: int = 0  # messages whose reply came as 2+ frames, all in hand
    late_frames: int = 0  # reply frames that arrived after the message was considered answered
    late_gaps: list[float] = field(default_factory=list)  # how much later than the counted frame
    pushes: int = 0
    sessions: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_examples) < 5:
            self.error_examples.append(f"{kind}: {detail[:200]}")


class _Socket:
    """A client socket with a reader task that timestamps and queues every frame."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: asyncio.Queue[tuple[float, dict[str, Any] | None]] = asyncio.Queue()
        self.answered: tuple[str, float] = ("", 0.0)  # the last message id and when it counted as answered
        self._reader = asyncio.create_task(self._read(), name="bench-ws-reader")

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.put_nowait((time.monotonic(), json.loads(raw)))
        except Exception:  # the closed marker below tells the waiting side
            pass
        finally:
            self.frames.put_nowait((time.monotonic(), None))

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def _exchange(sock: _Socket, mid: str, result: WorkerResult) -> tuple[list[str], float]:
    """Frames of the reply to message ``mid``: wait for the first, then drain what is queued."""
    texts: list[str] = []
    done_at = 0.0
    async with asyncio.timeout(MESSAGE_TIMEOUT):
        while not texts:
            arrived, frame = await sock.frames.get()
            _take(sock, frame, arrived, mid, texts, result)
            done_at = arrived
    while not sock.frames.empty():
        arrived, frame = sock.frames.get_nowait()
        if _take(sock, frame, arrived, mid, texts, result):
            done_at = arrived
    sock.answered = (mid, done_at)
    return texts, done_at


def _take(
    sock: _Socket,
    frame: dict[str, Any] | None,
    arrived: float,
    mid: str,
    texts: list[str],
    result: WorkerResult,
) -> bool:
    if frame is None:
        raise ConnectionError("socket closed by the server")
    kind = frame.get("type")
    if kind == "reply" and frame.get("id") == mid:
        texts.append(str(frame.get("text", "")))
        return True
    if kind == "reply":
        result.late_frames += 1
        if frame.get("id") == sock.answered[0]:
            result.late_gaps.append(arrived - sock.answered[1])
    elif kind == "push":
        result.pushes += 1
    elif kind == "error":
        raise ValueError(f"error frame {frame.get('code')}")
    else:
        raise ValueError(f"unexpected frame type {kind!r}")
    return False


async def _conversation(plan: WorkerPlan, rng: random.Random, result: WorkerResult) -> None:
    """One simulated customer after another on one socket slot, until the window closes."""
    from websockets.asyncio.client import connect  # noqa: PLC0415

    while time.monotonic() < plan.stop:
        customer = rng.choice(plan.customers)
        try:
            async with connect(
                plan.url, open_timeout=10, close_timeout=2, ping_interval=None, max_size=2**20
            ) as ws:
                sock = _Socket(ws)
                try:
                    t0 = time.monotonic()
                    await ws.send(json.dumps({"type": "hello", "session": None}))
                    async with asyncio.timeout(MESSAGE_TIMEOUT):
                        _, welcome = await sock.frames.get()
                    if not welcome or welcome.get("type") != "welcome":
                        raise ValueError(f"expected welcome, got {welcome!r}")
                    if t0 >= plan.measure_from:
                        result.welcome_latencies.append(time.monotonic() - t0)
                    result.sessions += 1
                    for step in session_steps(plan.messages_per_conversation):
                        if time.monotonic() >= plan.stop:
                            break
                        text, expect = step.text(customer, rng)
                        mid = uuid.uuid4().hex
                        sent_at = time.monotonic()
                        await ws.send(json.dumps({"type": "message", "text": text, "id": mid}))
                        texts, done_at = await _exchange(sock, mid, result)
                        result.sent.append((sent_at, text))
                        result.answered_total += 1
                        if len(texts) > 1:
                            result.multi_frame += 1
                        if not any(expect in t for t in texts):
                            result.error("unexpected_reply", f"{step.name}: {text!r} -> {texts!r}")
                        if sent_at >= plan.measure_from and done_at <= plan.stop:
                            result.latencies.append(done_at - sent_at)
                            result.messages += 1
                finally:
                    await sock.close()
        except TimeoutError:
            result.error("timeout", f"no reply within {MESSAGE_TIMEOUT} s")
        except (OSError, ConnectionError, ValueError) as e:
            result.error(type(e).__name__, str(e))
            await asyncio.sleep(0.2)  # do not spin on a server that refuses connections
        except Exception as e:  # websockets' own errors: keep the slot going, record why
            result.error(type(e).__name__, str(e))
            await asyncio.sleep(0.2)


async def _run_worker(plan: WorkerPlan) -> WorkerResult:
    result = WorkerResult()
    await asyncio.sleep(max(0.0, plan.start - time.monotonic()))
    rng = random.Random(plan.seed)
    tasks = [
        asyncio.create_task(
            _conversation(plan, random.Random(rng.random()), result), name=f"bench-conversation-{i}"
        )
        for i in range(plan.conversations)
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def worker_main(plan: WorkerPlan, out: Any) -> None:
    """Entry point of a load-generator process: runs its conversations, sends back the result."""
    try:
        out.put(asyncio.run(_run_worker(plan)))
    except BaseException as e:  # the parent must hear about it instead of waiting forever
        failed = WorkerResult()
        failed.error("worker_crashed", repr(e))
        out.put(failed)


# ---- database and server ------------------------------------------------------------------------------
@dataclass
class Database:
    dsn: str
    kind: str  # "given", "throwaway" or "embedded"
    cleanup: Callable[[], Any] | None = None


async def open_database(args: argparse.Namespace, tmp: Path) -> Database:
    """The database to run against; see the module docstring for the order of choices."""
    import asyncpg  # noqa: PLC0415

    from crm_bridge import db  # noqa: PLC0415

    given = args.database_url or os.environ.get("BENCH_DATABASE_URL")
    if given:
        return Database(given, "given")
    try:
        conn = await asyncpg.connect(args.admin_url, timeout=3)
        await conn.close()
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        print(
            f"bench: {args.admin_url} not reachable ({type(e).__name__}); using embedded PostgreSQL",
            file=sys.stderr,
        )
    else:
        name = f"closeloop_bench_{secrets.token_hex(4)}"
        await db.ensure_database(args.admin_url, name)
        return Database(
            db.with_database(args.admin_url, name),
            "throwaway",
            lambda: db.drop_database(args.admin_url, name),
        )
    embedded = db.EmbeddedPostgres(tmp / "pgdata")
    dsn = await embedded.start()
    return Database(dsn, "embedded", embedded.stop)


async def seed_customers(dsn: str, count: int) -> list[Customer]:
    """Customers with a placed, a shipped and a delivered order each (unique phones/numbers)."""
    import asyncpg  # noqa: PLC0415

    from crm_bridge import db  # noqa: PLC0415
    from crm_bridge.demo import add_customer, add_order  # noqa: PLC0415

    first_names = ("Dana", "Sam", "Priya", "Lee", "Ana", "Omar", "Mia", "Jon", "Eva", "Raj", "Kim", "Tom")
    now = dt.datetime.now(dt.UTC)
    customers: list[Customer] = []
    conn = await asyncpg.connect(dsn)
    try:
        await db.migrate(conn)
        for typ in ("json", "jsonb"):
            await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        async with conn.transaction():
            for i in range(count):
                first = first_names[i % len(first_names)]
                phone = "+1555" + str(secrets.randbelow(10**7)).zfill(7)
                cid = await add_customer(
                    conn,
                    name=f"{first} Bench{i}",
                    phone=phone,
                    email=f"bench{phone[1:]}@example.com",
                    balance_cents=secrets.randbelow(5000) - 1000,
                )
                for status, item, cents, age in (
                    ("placed", "Desk lamp", 4200, 0.5),
                    ("shipped", "Running shoes", 12000, 2),
                    ("delivered", "Yoga mat", 3500, 9),
                ):
                    await add_order(
                        conn,
                        customer_id=cid,
                        number=str(10**6 + secrets.randbelow(9 * 10**6)),
                        status=status,
                        item=item,
                        amount_cents=cents,
                        now=now,
                        age_days=age,
                    )
                # Whatever was really stored (a given database may already hold a number).
                rows = await conn.fetch(
                    "SELECT number, status FROM orders WHERE customer_id = $1 ORDER BY placed_at DESC", cid
                )
                name = await conn.fetchval("SELECT name FROM customers WHERE id = $1", cid)
                active = [r["number"] for r in rows if r["status"] in ("placed", "shipped")]
                if len(active) == 2:  # "where is my order" must ask which one
                    customers.append(Customer(phone, name.split()[0], tuple(r["number"] for r in rows)))
    finally:
        await conn.close()
    if not customers:
        raise RuntimeError("could not seed any benchmark customer")
    return customers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(port: int, workers: int) -> list[str]:
    if workers <= 1:
        return [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port)]
    # `closeloop serve` runs one process; uvicorn's --workers shares the port between several,
    # each building its own app from the same environment.
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "server:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
        "--ws-max-size",
        "65536",
    ]


def server_env(args: argparse.Namespace, dsn: str, port: int, tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": dsn,
            "CLOSELOOP_DEMO_SEED": "false",
            "CLOSELOOP_LOG_LEVEL": "WARNING",
            "CLOSELOOP_DATA_DIR": str(tmp / "data"),
            "CLOSELOOP_PORT": str(port),
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        }
    )
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"):  # never text anyone from a benchmark
        env.pop(name, None)
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


async def wait_healthy(
    base_url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 120.0
) -> float:
    import httpx  # noqa: PLC0415

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode} during start-up:\n{_tail(log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{base_url}/healthz")).status_code == 200:
                    return time.monotonic() - started
            await asyncio.sleep(0.2)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def profile_server(output: str | None, pid: int, measure_from: float, stop: float) -> None:
    """Sample the server's Python stacks with py-spy over the window (collapsed-stack output)."""
    if not output:
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
    cmd = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--nonblocking",
        "--rate",
        "100",
        "--format",
        "raw",
        "--duration",
        str(max(1, int(stop - time.monotonic()))),
        "--output",
        output,
    ]
    try:
        spy_proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    except OSError as e:
        print(f"bench: py-spy not available ({e}); pip install py-spy", file=sys.stderr)
        return
    _, err = await spy_proc.communicate()
    if spy_proc.returncode:
        print(f"bench: py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)


# ---- resource accounting --------------------------------------------------------------------------------
def _tree(pid: int) -> list[Any]:
    import psutil  # noqa: PLC0415

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_seconds(procs: Sequence[Any]) -> float:
    import psutil  # noqa: PLC0415

    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_mb(procs: Sequence[Any]) -> float:
    import psutil  # noqa: PLC0415

    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


async def postgres_backends(dsn: str) -> list[Any]:
    """The server processes of PostgreSQL serving the benchmark database (when visible here)."""
    import asyncpg  # noqa: PLC0415
    import psutil  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    try:
        pids = [
            r["pid"]
            for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]
    finally:
        await conn.close()
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            p.cpu_times()
            procs.append(p)
    return procs


async def stuck_transactions(dsn: str) -> tuple[int, float]:
    """Connections of the benchmark database idle inside a transaction for over a second."""
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT count(*) AS n, COALESCE(extract(epoch FROM max(now() - state_change)), 0) AS longest
               FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'
                 AND now() - state_change > interval '1 second'"""
        )
    finally:
        await conn.close()
    return int(row["n"]), float(row["longest"])


@dataclass
class Usage:
    server_cpu: float = 0.0  # percent of one core
    server_rss_peak: float = 0.0
    server_rss_end: float = 0.0
    client_cpu: float = 0.0
    postgres_cpu: float | None = None
    machine_busy: float = 0.0  # percent of all cores
    cores: int = 1
    stuck_connections: int = 0  # connections idle in a transaction for over a second at the end
    stuck_longest: float = 0.0


async def watch(
    server_pid: int, client_pids: Sequence[int], dsn: str, measure_from: float, stop: float
) -> Usage:
    """CPU of server, load generator and PostgreSQL over the window; server RSS sampled."""
    import psutil  # noqa: PLC0415

    usage = Usage(cores=psutil.cpu_count() or 1)
    await asyncio.sleep(max(0.0, measure_from - time.monotonic()))
    server = _tree(server_pid)
    clients = [p for pid in client_pids for p in _tree(pid)]
    postgres = await postgres_backends(dsn)
    t0, machine0 = time.monotonic(), psutil.cpu_times()
    s0, c0, p0 = cpu_seconds(server), cpu_seconds(clients), cpu_seconds(postgres)
    while time.monotonic() < stop:
        usage.server_rss_peak = max(usage.server_rss_peak, rss_mb(server))
        await asyncio.sleep(min(0.5, max(0.0, stop - time.monotonic())))
    wall, machine1 = time.monotonic() - t0, psutil.cpu_times()
    usage.server_cpu = 100 * (cpu_seconds(server) - s0) / wall
    usage.client_cpu = 100 * (cpu_seconds(clients) - c0) / wall
    usage.postgres_cpu = 100 * (cpu_seconds(postgres) - p0) / wall if postgres else None
    usage.server_rss_end = rss_mb(server)
    usage.stuck_connections, usage.stuck_longest = await stuck_transactions(dsn)
    usage.server_rss_peak = max(usage.server_rss_peak, usage.server_rss_end)
    busy = sum(machine1) - sum(machine0)
    idle = (machine1.idle + machine1.iowait) - (machine0.idle + machine0.iowait)
    usage.machine_busy = 100 * (busy - idle) / busy if busy > 0 else 0.0
    return usage


# ---- the run --------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    args: argparse.Namespace
    database: str
    result: WorkerResult
    usage: Usage
    window: float
    startup: float
    customers: int
    workers_cmd: str

    @property
    def rate(self) -> float:
        return self.result.messages / self.window if self.window else 0.0

    def pct(self, p: float) -> float:
        return percentile(self.result.latencies, p) * 1000

    @property
    def errors(self) -> int:
        return sum(self.result.errors.values())

    @property
    def target_met(self) -> bool:
        return self.rate >= TARGET_RATE and self.pct(95) < TARGET_P95_MS and self.errors == 0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def merge(results: Sequence[WorkerResult]) -> WorkerResult:
    total = WorkerResult()
    for r in results:
        total.latencies += r.latencies
        total.welcome_latencies += r.welcome_latencies
        total.late_gaps += r.late_gaps
        total.sent += r.sent
        for name in ("messages", "answered_total", "multi_frame", "late_frames", "pushes", "sessions"):
            setattr(total, name, getattr(total, name) + getattr(r, name))
        for kind, n in r.errors.items():
            total.errors[kind] = total.errors.get(kind, 0) + n
        total.error_examples += r.error_examples
    total.sent.sort()
    return total


def encoder_cache_hits(sent: Sequence[tuple[float, str]]) -> tuple[float, int]:
    """Share of texts the server's LRU encoder cache would already hold, and distinct texts.

    Replays the texts in send order through an LRU of the server's size, keyed like the intent
    engine keys it (numbers removed), ignoring texts the turn manager answers without the
    classifier (identification, order picks): an estimate, not a server counter.
    """
    from pipeline.intent_engine import _prepare  # noqa: PLC0415

    cache: OrderedDict[str, None] = OrderedDict()
    hits = 0
    for _, text in sent:
        key = _prepare(text)
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            cache[key] = None
            if len(cache) > ENCODER_CACHE_SIZE:
                cache.popitem(last=False)
    return (hits / len(sent) if sent else 0.0), len({_prepare(t) for _, t in sent})


async def run(args: argparse.Namespace) -> Outcome:
    tmp = Path(tempfile.mkdtemp(prefix="closeloop-bench-"))
    database: Database | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        database = await open_database(args, tmp)
        customers = await seed_customers(database.dsn, args.customers or max(100, 2 * args.conversations))
        port = free_port()
        log_path = tmp / "server.log"
        cmd = server_command(port, args.server_workers)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=server_env(args, database.dsn, port, tmp),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        startup = await wait_healthy(f"http://127.0.0.1:{port}", proc, log_path)

        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        start = time.monotonic() + 2.0 + 0.5 * args.procs  # time for the load processes to import
        measure_from = start + args.warmup
        stop = measure_from + args.duration
        shares = [
            args.conversations // args.procs + (1 if i < args.conversations % args.procs else 0)
            for i in range(args.procs)
        ]
        workers = []
        for i, share in enumerate(shares):
            plan = WorkerPlan(
                f"ws://127.0.0.1:{port}/chat",
                share,
                args.messages_per_conversation,
                start,
                measure_from,
                stop,
                customers,
                seed=args.seed * 1000 + i,
            )
            w = ctx.Process(target=worker_main, args=(plan, out), name=f"bench-load-{i}")
            w.start()
            workers.append(w)
        profiler = asyncio.create_task(
            profile_server(args.py_spy, proc.pid, measure_from, stop), name="bench-py-spy"
        )
        usage = await watch(proc.pid, [w.pid for w in workers if w.pid], database.dsn, measure_from, stop)
        await profiler
        results = [
            await asyncio.to_thread(out.get, True, stop - time.monotonic() + MESSAGE_TIMEOUT + 30)
            for _ in workers
        ]
        for w in workers:
            w.join(timeout=10)
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the run:\n{_tail(log_path)}")
        return Outcome(
            args,
            database.kind,
            merge(results),
            usage,
            stop - measure_from,
            startup,
            len(customers),
            " ".join(cmd),
        )
    finally:
        if proc is not None:
            await asyncio.to_thread(stop_process, proc)
        if database is not None and database.cleanup is not None:
            try:
                await database.cleanup()
            except Exception as e:  # report, but the numbers are still good
                print(f"bench: could not clean up the {database.kind} database: {e}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


# ---- reporting ------------------------------------------------------------------------------------------
COLUMNS = (
    "conversations",
    "messages",
    "duration s",
    "msgs/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "errors",
    "server CPU %",
    "server RSS MB",
)


def table_row(o: Outcome) -> tuple[str, ...]:
    return (
        str(o.args.conversations),
        str(o.result.messages),
        f"{o.window:.0f}",
        f"{o.rate:.0f}",
        f"{o.pct(50):.1f}",
        f"{o.pct(95):.1f}",
        f"{o.pct(99):.1f}",
        f"{o.pct(100):.1f}",
        str(o.errors),
        f"{o.usage.server_cpu:.0f}",
        f"{o.usage.server_rss_peak:.0f}",
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def details(o: Outcome) -> list[str]:
    r, u = o.result, o.usage
    hit_rate, distinct = encoder_cache_hits(r.sent)
    pg = f"{u.postgres_cpu:.0f}%" if u.postgres_cpu is not None else "not visible from here"
    ours = u.server_cpu + u.client_cpu + (u.postgres_cpu or 0.0)
    other = max(0.0, u.machine_busy * u.cores - ours)
    gaps = f" (up to {max(r.late_gaps) * 1000:.1f} ms after the counted one)" if r.late_gaps else ""
    lines = [
        f"CPU over the window (100% = one core, {u.cores} cores): server {u.server_cpu:.0f}%, "
        f"PostgreSQL backends {pg}, load generator {u.client_cpu:.0f}% in {o.args.procs} process(es); "
        f"machine busy {u.machine_busy:.0f}% of all cores, of which about {other:.0f}% (of one core) by other processes.",
        f"Server RSS: peak {u.server_rss_peak:.0f} MB, end {u.server_rss_end:.0f} MB "
        f"({o.args.server_workers} process(es)); ready {o.startup:.1f} s after start.",
        f"Sessions opened: {r.sessions} (welcome p50 {percentile(r.welcome_latencies, 50) * 1000:.1f} ms, "
        f"p95 {percentile(r.welcome_latencies, 95) * 1000:.1f} ms); messages answered in all: {r.answered_total}, "
        f"{r.multi_frame} as 2+ reply frames in hand, {r.late_frames} reply frames late{gaps}, {r.pushes} pushes.",
        f"Texts: {distinct} distinct (numbers removed), estimated encoder-cache hit rate {hit_rate:.0%} "
        f"(LRU of {ENCODER_CACHE_SIZE}); {o.customers} seeded customers, database: {o.database}.",
    ]
    if u.stuck_connections:
        lines.append(
            f"At the end of the window {u.stuck_connections} PostgreSQL connections sat idle inside a transaction "
            f"(longest {u.stuck_longest:.1f} s): turns holding their connection while waiting for another one."
        )
    if r.errors:
        lines.append(
            "Errors: "
            + ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items()))
            + "; e.g. "
            + "; ".join(r.error_examples[:3])
        )
    return lines


def command_line(args: argparse.Namespace) -> str:
    parts = [".venv/bin/python benchmarks/text_throughput.py"]
    defaults = build_parser().parse_args([])
    for name in (
        "conversations",
        "messages_per_conversation",
        "duration",
        "warmup",
        "procs",
        "server_workers",
    ):
        value = getattr(args, name)
        if value != getattr(defaults, name) or args.quick:
            parts.append(
                f"--{name.replace('_', '-')} {value:g}"
                if isinstance(value, float)
                else f"--{name.replace('_', '-')} {value}"
            )
    parts += [f"--server-env {item}" for item in args.server_env]
    return " ".join(parts)


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} x {model}, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"{dt.date.today().isoformat()}"
    )


INTRO = (
    "`benchmarks/text_throughput.py`: concurrent web-chat conversations over `WS /chat` against the real server (its own "
    "process) and real PostgreSQL, on one machine with the load generator. Each conversation waits for the reply before "
    "its next message (closed loop): greeting, order status before identification, phone number when asked (two reply "
    'frames), order status by number, opening hours, balance, "where is my order" + "the first one", shipping, thanks '
    "(no refunds); then a new session. Latency: from sending a message to the last reply frame with its id already in hand "
    "when the first one arrives (queued frames drained without waiting; later frames are counted as late). The warm-up "
    "seconds are not counted. One block per setup; the latest run of a setup replaces its block."
)


def setup_label(args: argparse.Namespace) -> str:
    """The name of a run's block in RESULTS.md: what was loaded and how the server ran."""
    if args.label:
        return str(args.label)
    parts = [
        f"{args.conversations} conversations",
        f"{args.server_workers} server process" + ("es" if args.server_workers > 1 else ""),
    ]
    parts += [f"`{item}`" for item in args.server_env]
    if args.procs > 1:
        parts.append(f"{args.procs} load processes")
    return ", ".join(parts)


def render_block(o: Outcome) -> str:
    verdict = "met" if o.target_met else "NOT met"
    return "\n".join(
        [
            f"### {setup_label(o.args)}",
            "",
            f"Machine: {machine()}. Command: `{command_line(o.args)}`",
            "",
            markdown_table(COLUMNS, [table_row(o)]),
            "",
            *[f"- {line}" for line in details(o)],
            f"- Target (>= {TARGET_RATE:.0f} msgs/s with p95 < {TARGET_P95_MS:.0f} ms, no errors): {verdict}.",
        ]
    )


def render_section(block: str, existing: str, *, keep_others: bool = True) -> str:
    """This benchmark's section: intro, a summary row per setup, then the blocks of every setup."""
    title = block.splitlines()[0]
    blocks = [
        b if b.startswith("### ") else "### " + b
        for b in re.split(r"^### ", existing, flags=re.MULTILINE)[1:]
    ]
    blocks = [b.strip() for b in blocks if keep_others]
    titles = [b.splitlines()[0] for b in blocks]
    if title in titles:
        blocks[titles.index(title)] = block
    else:
        blocks.append(block)
    summary = []
    for b in blocks:
        rows = [
            line
            for line in b.splitlines()
            if line.startswith("| ") and not line.startswith("| conversations")
        ]
        if rows:
            summary.append((b.splitlines()[0][4:], *[cell.strip() for cell in rows[0].strip("|").split("|")]))
    return "\n\n".join([SECTION, INTRO, markdown_table(("setup", *COLUMNS), summary), *blocks]) + "\n"


def write_section(block: str, *, keep_others: bool = True, path: Path = RESULTS_FILE) -> None:
    """Put this run's block into this benchmark's section of RESULTS.md; other sections stay as they are."""
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}[ \t]*\n(.*?)(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    found = pattern.search(current)
    section = render_section(block, found.group(1) if found else "", keep_others=keep_others)
    if found:
        updated = current[: found.start()] + section + "\n" + current[found.end() :]
    else:
        updated = current.rstrip("\n") + "\n\n" + section
    path.write_text(updated.rstrip("\n") + "\n", encoding="utf-8")


def print_report(o: Outcome) -> None:
    widths = [max(len(c), len(v)) for c, v in zip(COLUMNS, table_row(o), strict=True)]
    print("  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    print("  ".join(v.rjust(w) for v, w in zip(table_row(o), widths, strict=True)))
    for line in details(o):
        print("  " + line)
    print(
        f"  target >= {TARGET_RATE:.0f} msgs/s, p95 < {TARGET_P95_MS:.0f} ms: {'met' if o.target_met else 'NOT met'}"
    )


# ---- CLI ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--conversations", type=int, default=50, help="concurrent web-chat conversations (default 50)"
    )
    p.add_argument(
        "--messages-per-conversation",
        type=int,
        default=10,
        help="messages per session before the client opens a new one (default 10)",
    )
    p.add_argument(
        "--duration", type=float, default=30.0, help="measured seconds after the warm-up (default 30)"
    )
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load not counted (default 3)")
    p.add_argument("--procs", type=int, default=1, help="load-generator processes (default 1)")
    p.add_argument(
        "--server-workers", type=int, default=1, help="server processes (uvicorn --workers; default 1)"
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server, e.g. CLOSELOOP_DB_POOL_SIZE=40 (repeatable)",
    )
    p.add_argument(
        "--customers", type=int, default=0, help="customers to seed (default max(100, 2 x conversations))"
    )
    p.add_argument(
        "--database-url", help="database to use as is (else BENCH_DATABASE_URL, a throwaway one, or embedded)"
    )
    p.add_argument(
        "--admin-url",
        default=ADMIN_URL,
        help=f"server to create the throwaway database on (default {ADMIN_URL})",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed of the conversation scripts")
    p.add_argument(
        "--py-spy", metavar="FILE", help="record the server with py-spy over the window (collapsed stacks)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 5 conversations, 5 s, 1 s warm-up; RESULTS.md untouched",
    )
    p.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument(
        "--label", help="name of this setup's block in RESULTS.md (default: derived from the options)"
    )
    p.add_argument(
        "--replace-all", action="store_true", help="drop the blocks of other setups from RESULTS.md"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.conversations, args.duration, args.warmup = 5, 5.0, 1.0
    if args.conversations < 1 or args.procs < 1 or args.duration <= 0 or args.messages_per_conversation < 1:
        print(
            "bench: --conversations, --procs, --duration and --messages-per-conversation must be positive",
            file=sys.stderr,
        )
        return 2
    args.procs = min(args.procs, args.conversations)
    print(
        f"bench: {args.conversations} conversations, {args.warmup:g} s warm-up + {args.duration:g} s measured, "
        f"{args.procs} load process(es), {args.server_workers} server process(es)",
        file=sys.stderr,
    )
    try:
        outcome = asyncio.run(run(args))
    except RuntimeError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    print_report(outcome)
    if not (args.quick or args.no_write):
        write_section(render_block(outcome), keep_others=not args.replace_all)
        print(f"bench: wrote '{setup_label(args)}' in {RESULTS_FILE.relative_to(ROOT)}", file=sys.stderr)
    if outcome.result.messages == 0:
        print("bench: no message was answered inside the window", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
