"""Turn-manager time per turn: the embedded engine vs the LLM engine, whose own overhead this shows.

Both engines run in this process on the real services (``server.build_services``: PostgreSQL,
the built-in CRM, the intent encoder) and answer the same scripted web-chat conversations through
``ConversationService.handle_text``. The LLM engine talks through the real ``openai`` SDK (or
``anthropic`` with ``--provider anthropic``) to the fake model server of the tests on 127.0.0.1,
scripted to answer at once (latency 0): what is left is the engine's own cost (prompt and tool
building, SDK, HTTP and SSE parsing on loopback, tool execution through the policy code, reply
checks) plus the fake server's, which shares this process and is counted in.

Reported per engine: turn-manager time (``handle``) p50/p95/max, whole turn (with the
transaction) p50/p95, and model calls per turn.

Run:  .venv/bin/python benchmarks/turn_engine.py                   (20 conversations, RESULTS.md)
      .venv/bin/python benchmarks/turn_engine.py --quick           (3 conversations, RESULTS.md untouched)
      .venv/bin/python benchmarks/turn_engine.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from crm_bridge.demo import add_customer, add_order  # noqa: E402
from pipeline.model import Channel  # noqa: E402
from server import Settings, build_services  # noqa: E402
from tests.fakes.llm_server import Call, FakeAnthropic, FakeOpenAI, LLMRequest, Say  # noqa: E402

SCRIPT = [
    "hi there",
    "where is my order {placed}",
    "I want a refund for my wireless headphones",
    "yes please",
    "what are your opening hours?",
    "thanks, bye",
]


def model(request: LLMRequest) -> list[Any]:
    """Answers like a model would for the script: tools where the script needs them."""
    user = request.last_user_text.lower()
    results = {r["name"]: r["result"] for r in request.tool_results}
    if "refund_order" in results:
        return [Say(results["refund_order"].get("message_for_customer") or "Sorry, I could not do that.")]
    if "get_order_status" in results:
        return [Say(results["get_order_status"].get("message_for_customer") or "Sorry, I could not do that.")]
    if "end_conversation" in results:
        return [Say(results["end_conversation"].get("message_for_customer") or "Sorry, I could not do that.")]
    if "identify_customer" in results:
        return [Say("Thanks, I found your account. What can I do for you?")]
    if "my phone is" in user:
        return [Call("identify_customer", {"phone": user.rsplit(" ", 1)[-1]})]
    if "list_orders" in results:
        found = [
            o["order_number"]
            for o in results["list_orders"].get("orders", [])
            if "headphones" in o["summary"].lower()
        ]
        if not found:
            print("bench: list_orders gave", results["list_orders"], file=sys.stderr)
            return [Say("I could not find that order.")]
        number = found[0]
        return [Call("refund_order", {"order_number": number})]
    if "refund" in user:
        return [Call("list_orders", {})]
    if user.startswith("yes"):
        number = re.findall(
            r"\b\d{4,}\b",
            " ".join(str(m.get("content")) for m in request.messages if m["role"] == "assistant"),
        )
        return [Call("refund_order", {"order_number": number[-1] if number else "0"})]
    if "where is" in user:
        return [Call("get_order_status", {"order_number": re.search(r"\d{4,}", user).group(0)})]
    if "bye" in user:
        return [Call("end_conversation", {})]
    if "hours" in user:
        return [Say("We're open Monday to Friday, 9 to 6.")]
    return [Say("Hi! How can I help you today?")]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_engine(name: str, settings: Settings, conversations: int) -> dict[str, Any]:
    services = await build_services(settings)
    try:
        turns = services.turns
        handle_ms: list[float] = []
        original = turns.handle

        async def timed(ctx: Any, text: str, work: Any) -> Any:
            start = time.perf_counter()
            try:
                return await original(ctx, text, work)
            finally:
                handle_ms.append((time.perf_counter() - start) * 1000)

        turns.handle = timed  # type: ignore[method-assign]
        now = dt.datetime.now(dt.UTC)
        whole_ms: list[float] = []
        # warm-up: the encoder, the SDK client and the connections
        await services.service.handle_text(Channel.WEBCHAT, f"warm-{name}", "hello")
        handle_ms.clear()
        for i in range(conversations):
            phone = f"+1{secrets.randbelow(10**9) + 2 * 10**9}"  # unique: the database may hold earlier runs
            cid = await add_customer(
                services.pool,
                name=f"Bench {name} {i}",
                phone=phone,
                email=f"b{i}-{name}-{os.getpid()}@example.com",
            )
            base = 50000 + i * 10 + (0 if name == "embedded" else 5)
            await add_order(
                services.pool,
                customer_id=cid,
                number=str(base),
                status="delivered",
                item="Wireless headphones",
                amount_cents=8900,
                now=now,
                age_days=3,
            )
            await add_order(
                services.pool,
                customer_id=cid,
                number=str(base + 1),
                status="placed",
                item="Desk lamp",
                amount_cents=4200,
                now=now,
                age_days=1,
            )
            address = f"bench-{name}-{os.getpid()}-{i}"
            await services.service.handle_text(Channel.WEBCHAT, address, f"my phone is {phone}")
            handle_ms.pop()
            for line in SCRIPT:
                start = time.perf_counter()
                await services.service.handle_text(Channel.WEBCHAT, address, line.format(placed=base + 1))
                whole_ms.append((time.perf_counter() - start) * 1000)
        return {
            "engine": name,
            "turns": len(handle_ms),
            "p50": statistics.median(handle_ms),
            "p95": pct(handle_ms, 0.95),
            "max": max(handle_ms),
            "whole_p50": statistics.median(whole_ms),
            "whole_p95": pct(whole_ms, 0.95),
        }
    finally:
        await services.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--provider", choices=["openai", "anthropic"], default="openai")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    parser.add_argument("--quick", action="store_true", help="3 conversations; RESULTS.md untouched")
    args = parser.parse_args()
    conversations = 3 if args.quick else args.conversations
    tmp = Path(tempfile.mkdtemp(prefix="closeloop-bench-"))
    common: dict[str, Any] = {
        "database_url": args.database_url,
        "data_dir": tmp,
        "demo_seed": False,
        "voice_preload": False,
        "frustration_detection": True,
    }
    fake_class = FakeOpenAI if args.provider == "openai" else FakeAnthropic
    rows = []
    rows.append(await run_engine("embedded", Settings(_env_file=None, **common), conversations))
    async with fake_class(model) as fake:
        llm = Settings(
            _env_file=None,
            engine="llm",
            llm_provider=args.provider,
            llm_base_url=fake.base_url,
            llm_api_key=fake.api_key,
            llm_model="bench",
            **common,
        )
        row = await run_engine(f"llm ({args.provider}, fake at 0 ms)", llm, conversations)
        row["model_calls"] = len(fake.requests) - 1
        rows.append(row)
    header = "| engine | turns | handle p50 ms | handle p95 ms | handle max ms | whole turn p50 ms | whole turn p95 ms | model calls/turn |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = f"{r['model_calls'] / r['turns']:.2f}" if "model_calls" in r else "-"
        lines.append(
            f"| {r['engine']} | {r['turns']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['max']:.1f} | "
            f"{r['whole_p50']:.1f} | {r['whole_p95']:.1f} | {calls} |"
        )
    table = "\n".join(lines)
    print(table)
    overhead = rows[1]["p50"] - rows[0]["p50"]
    print(f"LLM engine overhead over embedded, p50: {overhead:+.1f} ms per turn")
    if args.quick:
        return
    results = ROOT / "benchmarks" / "RESULTS.md"
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    section = (
        "## Turn manager: embedded vs LLM engine\n\n"
        f"`benchmarks/turn_engine.py --conversations {conversations} --provider {args.provider}`, "
        f"{dt.date.today()}, {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}. "
        "Same scripted web-chat conversations (greeting, order status, refund + confirmation, FAQ, goodbye) through "
        "`ConversationService` on real PostgreSQL; the LLM engine talks through the real SDK to the fake model server "
        "on 127.0.0.1 answering at once, so the difference is the engine's own overhead (SDK, HTTP/SSE on loopback, "
        "prompt and tools, policy-checked tool execution, reply checks, plus the in-process fake server).\n\n"
        f"{table}\n\nLLM engine overhead over embedded, p50: {overhead:+.1f} ms per turn.\n"
    )
    text = (
        re.sub(r"## Turn manager: embedded vs LLM engine\n.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip()
        + "\n\n"
        + section
    )
    results.write_text(text)
    print(f"recorded in {results}")


if __name__ == "__main__":
    asyncio.run(main())
