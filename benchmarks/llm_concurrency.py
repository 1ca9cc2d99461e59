"""100 concurrent LLM-engine web-chat conversations against a fake model that takes 1 s per reply.

Each conversation runs three turns, one after the other (greeting, opening hours, goodbye; the
goodbye calls a tool, so it takes two model replies), all conversations at once, through
``ConversationService.handle_text`` on the real services (``server.build_services``: PostgreSQL,
pool of ``--pool-size`` connections, the built-in CRM). The LLM engine talks through the real
``openai`` SDK to the fake OpenAI server of the tests on 127.0.0.1, which waits ``--model-delay``
seconds before each reply.

Reported: completed turns, errors, pool exhaustion (a connection acquire that waited longer than
``--acquire-timeout`` s fails, as a production pool timeout would), turn latency p50/p95/max,
and the longest time a turn waited before its engine started: the time it queued behind other
conversations' turns (their connections, row locks and the turn slots), since every
conversation here is distinct and no turn has to wait for anything of its own.

Run:  .venv/bin/python benchmarks/llm_concurrency.py                 (records in RESULTS.md)
      .venv/bin/python benchmarks/llm_concurrency.py --label "before" --no-record
Stops by itself: the whole run is bounded by ``--deadline`` seconds (default 240).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from pipeline.model import Channel  # noqa: E402
from server import Settings, build_services  # noqa: E402
from tests.fakes.llm_server import Call, FakeOpenAI, LLMRequest, Say, Slow  # noqa: E402

SCRIPT = ["hello there", "what are your opening hours?", "thanks, bye"]


class Stats:
    def __init__(self) -> None:
        self.acquire_waits: list[float] = []
        self.acquire_timeouts = 0
        self.turn_s: list[float] = []
        self.admission_s: list[float] = []
        self.errors: dict[str, int] = {}
        self.loop_lag = 0.0


async def watch_loop(stats: Stats) -> None:
    """How late the event loop wakes a 50 ms sleeper: the process's CPU saturation."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(0.05)
        stats.loop_lag = max(stats.loop_lag, time.perf_counter() - start - 0.05)


SECTION = "## LLM-engine concurrency: 100 conversations, model 1 s per reply"
INTRO = (
    "`benchmarks/llm_concurrency.py`: 100 web-chat conversations at once, three turns each (greeting, "
    "opening hours, goodbye with a tool call: four model replies), LLM engine through the real `openai` SDK "
    "to the fake model server on 127.0.0.1 that waits 1 s before every reply; real PostgreSQL, pool of 20. "
    "A pool acquire waiting over 5 s fails (pool exhaustion). *Wait before the engine starts*: from "
    "`handle_text` to the engine's `handle`, i.e. the time a turn queued behind other conversations' turns "
    "(turn slots, connections, row locks) plus its own load. The event-loop lag column shows how saturated "
    "the process was (the machine is shared; numbers are indicative)."
)


def make_model(delay: float) -> Any:
    def model(request: LLMRequest) -> list[Any]:
        user = request.last_user_text.lower()
        results = {r["name"]: r["result"] for r in request.tool_results}
        if "end_conversation" in results:
            return [Slow(delay), Say("Thanks for chatting with us. Goodbye!")]
        if "bye" in user:
            return [Slow(delay), Call("end_conversation", {})]
        if "hours" in user:
            return [Slow(delay), Say("We're open Monday to Friday, 9 to 6.")]
        return [Slow(delay), Say("Hi! How can I help you today?")]

    return model


class TimedAcquire:
    """``pool.acquire()`` with a timeout, timing how long each acquire waited."""

    def __init__(self, ctx: Any, stats: Stats) -> None:
        self._ctx, self._stats = ctx, stats

    async def __aenter__(self) -> Any:
        start = time.perf_counter()
        try:
            return await self._ctx.__aenter__()
        except TimeoutError:
            self._stats.acquire_timeouts += 1
            raise
        finally:
            self._stats.acquire_waits.append(time.perf_counter() - start)

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._ctx.__aexit__(*exc)

    def __await__(self) -> Any:
        return self._ctx.__await__()


class TimedPool(asyncpg.Pool):
    __slots__ = ()
    stats: Stats
    timeout: float

    def acquire(self, *, timeout: float | None = None) -> Any:  # type: ignore[override]
        return TimedAcquire(super().acquire(timeout=timeout or TimedPool.timeout), TimedPool.stats)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stats = Stats()
    async with FakeOpenAI(make_model(args.model_delay)) as fake:
        settings = Settings(
            _env_file=None,
            database_url=args.database_url,
            data_dir=Path(tempfile.mkdtemp(prefix="closeloop-bench-")),
            demo_seed=False,
            voice_preload=False,
            engine="llm",
            llm_provider="openai",
            llm_base_url=fake.base_url,
            llm_api_key=fake.api_key,
            llm_model="bench",
            db_pool_size=args.pool_size,
        )
        services = await build_services(settings)
        try:
            pool = services.pool
            # asyncpg's Pool has slots: swap its class for one whose acquire is timed and bounded.
            TimedPool.stats, TimedPool.timeout = stats, args.acquire_timeout
            pool.__class__ = TimedPool
            turns = services.turns
            original_handle = turns.handle
            started: dict[str, float] = {}

            async def timed_handle(ctx: Any, text: str, work: Any) -> Any:
                key = f"{ctx.address}:{text}"
                if key in started:  # the first attempt of each turn is the one that queued
                    stats.admission_s.append(time.perf_counter() - started.pop(key))
                return await original_handle(ctx, text, work)

            turns.handle = timed_handle  # type: ignore[method-assign]
            await services.service.handle_text(Channel.WEBCHAT, f"warm-{os.getpid()}", "hello there")
            stats.admission_s.clear()

            async def conversation(i: int) -> None:
                address = f"bench-llmc-{os.getpid()}-{i}"
                for line in SCRIPT:
                    start = time.perf_counter()
                    started[f"{address}:{line}"] = start
                    try:
                        await services.service.handle_text(Channel.WEBCHAT, address, line)
                        stats.turn_s.append(time.perf_counter() - start)
                    except Exception as e:  # counted, and the conversation stops
                        name = type(e).__name__
                        stats.errors[name] = stats.errors.get(name, 0) + 1
                        return

            begin = time.perf_counter()
            watcher = asyncio.create_task(watch_loop(stats), name="bench-loop-watch")
            tasks = [
                asyncio.create_task(conversation(i), name=f"bench-conv-{i}")
                for i in range(args.conversations)
            ]
            done, pending = await asyncio.wait(tasks, timeout=args.deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            wall = time.perf_counter() - begin
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            model_calls = len(fake.requests) - 1
        finally:
            await services.close()
    return {
        "turns_planned": args.conversations * len(SCRIPT),
        "turns": len(stats.turn_s),
        "errors": sum(stats.errors.values()),
        "error_kinds": dict(stats.errors),
        "unfinished": len(pending),
        "acquire_timeouts": stats.acquire_timeouts,
        "acquire_max": max(stats.acquire_waits, default=0.0),
        "p50": statistics.median(stats.turn_s) if stats.turn_s else float("nan"),
        "p95": pct(stats.turn_s, 0.95),
        "max": max(stats.turn_s, default=float("nan")),
        "admission_max": max(stats.admission_s, default=0.0),
        "wall": wall,
        "loop_lag": stats.loop_lag,
        "model_calls": model_calls,
    }


def table(label: str, r: dict[str, Any]) -> str:
    header = (
        "| code | turns done / planned | errors | unfinished at deadline | pool acquire timeouts | "
        "max acquire wait s | turn p50 s | turn p95 s | turn max s | max wait before the engine starts s | "
        "wall s | model calls | max event-loop lag s |"
    )
    row = (
        f"| {label} | {r['turns']} / {r['turns_planned']} | {r['errors']} | {r['unfinished']} | "
        f"{r['acquire_timeouts']} | {r['acquire_max']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['max']:.2f} | "
        f"{r['admission_max']:.2f} | {r['wall']:.1f} | {r['model_calls']} | {r['loop_lag']:.2f} |"
    )
    return "\n".join([header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|", row])


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument(
        "--model-delay", type=float, default=1.0, help="seconds the fake model takes per reply"
    )
    parser.add_argument("--pool-size", type=int, default=20, help="database pool size (the default setting)")
    parser.add_argument("--acquire-timeout", type=float, default=5.0)
    parser.add_argument("--deadline", type=float, default=240.0, help="stop waiting for turns after this")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    parser.add_argument("--label", default="this code")
    parser.add_argument("--no-record", action="store_true", help="print only; RESULTS.md untouched")
    args = parser.parse_args()
    load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    result = await run(args)
    text = table(args.label, result)
    print(text)
    if result["error_kinds"]:
        print("errors:", result["error_kinds"])
    if args.no_record:
        return
    results = ROOT / "benchmarks" / "RESULTS.md"
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip() + f"\n\n{SECTION}\n\n{INTRO}\n"
    block = (
        f"### {args.label}\n\n`{shlex.join(['benchmarks/llm_concurrency.py', *sys.argv[1:]])}`, "
        f"{dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores (nproc), Python "
        f"{platform.python_version()}, load average before {load_before}.\n\n{table(args.label, result)}\n"
    )
    head = text.index(SECTION)
    tail = text.find("\n## ", head + len(SECTION))
    tail = len(text) if tail < 0 else tail
    body = text[head:tail]
    old = re.search(r"### " + re.escape(args.label) + r"\n.*?(?=\n### |\Z)", body, flags=re.S)
    body = body.replace(old.group(0), block.rstrip("\n")) if old else body.rstrip() + "\n\n" + block
    results.write_text(text[:head] + body.rstrip() + "\n" + text[tail:])
    print(f"recorded in {results}")


if __name__ == "__main__":
    asyncio.run(main())
