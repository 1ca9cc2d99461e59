"""How long a real browser holds closeloop's call audio before it plays it (Chromium, WebRTC).

``benchmarks/voice_latency.py`` measures browser calls with an aiortc peer as the caller. aiortc's
receive jitter buffer is fixed (it releases a frame once four more came: ~80 ms), while a
browser's (WebRTC's NetEq) adapts to the network. This measures the real thing: Debian's
Chromium (headless, a fake microphone playing an espeak-ng question) calls from ``/chat`` against
``closeloop serve`` on loopback, and the page's own ``RTCPeerConnection.getStats()`` says how long
audio waited in its jitter buffer and before playout:

* ``jitterBufferDelay / jitterBufferEmittedCount``: mean time a sample spent in the jitter
  buffer (inbound-rtp, audio);
* ``jitterBufferTargetDelay`` and ``jitterBufferMinimumDelay`` over the same count: what NetEq
  aimed at;
* ``totalPlayoutDelay / totalSamplesCount`` (media-playout) where the browser reports it: the
  delay from the jitter buffer's output to the audio device.

The page is the product's own ``/chat`` page, unchanged; an init script only keeps a reference to
each ``RTCPeerConnection`` the page makes so the stats can be read. Each call lasts until the
assistant's answer to the question was captioned and ``--listen`` seconds more have played.

Run: ``.venv/bin/python benchmarks/browser_receive.py`` (table + benchmarks/RESULTS.md);
``--no-write`` prints only. Needs Chromium (``CLOSELOOP_CHROMIUM``, default /usr/bin/chromium),
espeak-ng and PostgreSQL (or the embedded one), as ``make test`` installs them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads

import argparse  # noqa: E402
import asyncio  # noqa: E402
import datetime as dt  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.voice_latency import machine, open_database, spawn_closeloop, wait_ready  # noqa: E402
from voice.audio import pcm16_to_wav, resample, wav_to_pcm16  # noqa: E402

CHROMIUM = os.environ.get("CLOSELOOP_CHROMIUM", "/usr/bin/chromium")
RATE = 48000
QUESTIONS = ["what time do you open", "can I return something I bought last week"]
SECTION = "## Browser receive path (Chromium)"
AIORTC_PREFETCH_MS = 80  # aiortc's audio JitterBuffer: a frame leaves once four more came (4 x 20 ms)

KEEP_PEERS = """
(() => {
  const Native = window.RTCPeerConnection;
  window.__peers = [];
  window.RTCPeerConnection = function (...args) {
    const pc = new Native(...args);
    window.__peers.push(pc);
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
})();
"""

ANSWERED = """
() => {
  const items = [...document.querySelectorAll("#messages .from-customer, #messages .from-bot")];
  const asked = items.findIndex((e) => e.classList.contains("from-customer"));
  return asked >= 0 && items.slice(asked + 1).some((e) => e.classList.contains("from-bot"));
}
"""

READ_STATS = """
async () => {
  const pc = window.__peers[window.__peers.length - 1];
  if (!pc) return null;
  const out = {};
  (await pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") out.inbound = s;
    if (s.type === "media-playout") out.playout = s;
  });
  return JSON.parse(JSON.stringify(out));
}
"""


@dataclass
class CallStats:
    jitter_ms: float
    target_ms: float | None
    minimum_ms: float | None
    playout_ms: float | None
    samples_s: float
    concealed_pct: float
    packets: int
    lost: int


def fake_microphone(path: Path, question: str) -> Path:
    """6 s of silence (the greeting plays), the question, then 12 s of silence."""
    said = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(said), question], check=True)
    pcm, rate = wav_to_pcm16(said.read_bytes())
    speech = resample(pcm, rate, RATE)
    audio = np.concatenate([np.zeros(6 * RATE, np.int16), speech, np.zeros(12 * RATE, np.int16)])
    path.write_bytes(pcm16_to_wav(audio, RATE))
    return path


def _ratio(total: Any, count: Any) -> float | None:
    if not isinstance(total, int | float) or not isinstance(count, int | float) or count <= 0:
        return None
    return 1000.0 * total / count


def call_stats(raw: dict[str, Any]) -> CallStats:
    inbound = raw.get("inbound") or {}
    playout = raw.get("playout") or {}
    emitted = inbound.get("jitterBufferEmittedCount")
    received = float(inbound.get("totalSamplesReceived") or 0)
    return CallStats(
        jitter_ms=_ratio(inbound.get("jitterBufferDelay"), emitted) or 0.0,
        target_ms=_ratio(inbound.get("jitterBufferTargetDelay"), emitted),
        minimum_ms=_ratio(inbound.get("jitterBufferMinimumDelay"), emitted),
        playout_ms=_ratio(playout.get("totalPlayoutDelay"), playout.get("totalSamplesCount")),
        samples_s=received / RATE,
        concealed_pct=100.0 * float(inbound.get("concealedSamples") or 0) / received if received else 0.0,
        packets=int(inbound.get("packetsReceived") or 0),
        lost=int(inbound.get("packetsLost") or 0),
    )


async def one_call(base_url: str, question: str, tmp: Path, listen_s: float) -> CallStats:
    from playwright.async_api import async_playwright  # noqa: PLC0415

    microphone = fake_microphone(tmp / f"caller-{abs(hash(question))}.wav", question)
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            # bypass_csp: the page forbids eval, which reading its state from here needs.
            context = await browser.new_context(base_url=base_url, bypass_csp=True)
            await context.add_init_script(KEEP_PEERS)
            page = await context.new_page()
            await page.goto("/chat")
            await page.click("#call")
            await page.wait_for_function(
                "() => document.querySelector('#call-state')?.textContent === 'On a call with support'",
                timeout=30_000,
            )
            # The caller's question was captioned, then an answer from the assistant after it.
            await page.wait_for_function(ANSWERED, timeout=60_000, polling=200)
            listened = time.monotonic() + listen_s
            while time.monotonic() < listened:  # the answer plays on; stats accrue as it does
                await page.wait_for_timeout(500)
            raw = await page.evaluate(READ_STATS)
            # Hang up as a customer would, so the server frees the call at once (it limits the
            # open calls per address; a vanished browser is noticed only when ICE times out).
            await page.click("#hangup")
            await page.wait_for_function(
                "() => document.querySelector('#call-state')?.textContent === 'Call ended.'", timeout=10_000
            )
            if not raw or not raw.get("inbound"):
                raise RuntimeError("the page's peer connection reported no inbound audio")
            return call_stats(raw)
        finally:
            await browser.close()


def chromium_version() -> str:
    try:
        return subprocess.run(
            [CHROMIUM, "--version"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "Chromium (version unknown)"


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(results: list[tuple[str, CallStats]], argv: list[str]) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = [
        "| call | caller said | jitter buffer mean ms | NetEq target ms | NetEq minimum ms | playout delay ms "
        "| audio received s | concealed % | packets | lost |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, (question, s) in enumerate(results, start=1):
        rows.append(
            f"| {index} | {question} | {_f(s.jitter_ms)} | {_f(s.target_ms)} | {_f(s.minimum_ms)} "
            f"| {_f(s.playout_ms)} | {s.samples_s:.1f} | {s.concealed_pct:.2f} | {s.packets} | {s.lost} |"
        )
    jitter = statistics.median(s.jitter_ms for _, s in results)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/browser_receive.py", *argv])
    return "\n".join(
        [
            SECTION,
            "",
            "`benchmarks/browser_receive.py`: a real browser as the caller. Debian's Chromium (headless, fake "
            "microphone playing an espeak-ng question after 6 s) calls from `/chat` against `closeloop serve` "
            "on loopback; the page's `getStats()` gives the mean time a sample of closeloop's audio waited in "
            "Chromium's jitter buffer (`jitterBufferDelay / jitterBufferEmittedCount`), NetEq's target and "
            "minimum, and the playout delay after it where reported. aiortc, the caller in "
            "`benchmarks/voice_latency.py`, holds every frame a fixed ~"
            f"{AIORTC_PREFETCH_MS} ms instead (four frames of prefetch).",
            "",
            f"Run {now} on {machine()}, {chromium_version()}.",
            "",
            f"Command: `{command}`",
            "",
            *rows,
            "",
            f"Median over the calls: Chromium held closeloop's audio **{jitter:.0f} ms** in its jitter buffer, "
            f"against aiortc's ~{AIORTC_PREFETCH_MS} ms. On loopback there is no network jitter, so this is "
            "NetEq's floor; a real network raises it for any server.",
        ]
    )


def record(section: str) -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    text = results.read_text()
    text = re.sub(re.escape(SECTION) + r"\n.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip()
    results.write_text(text + "\n\n" + section.rstrip() + "\n")


async def run(args: argparse.Namespace) -> list[tuple[str, CallStats]]:
    with tempfile.TemporaryDirectory(prefix="closeloop-browser-rx-") as tmp_name:
        tmp = Path(tmp_name)
        database = await open_database(args.admin_url, tmp)
        server = spawn_closeloop(database.dsn, tmp)
        try:
            print("browser-rx: starting closeloop", file=sys.stderr)
            await wait_ready(server)
            results = []
            for index in range(args.calls):
                question = QUESTIONS[index % len(QUESTIONS)]
                print(f"browser-rx: call {index + 1}/{args.calls}: {question!r}", file=sys.stderr)
                results.append((question, await one_call(server.base_url, question, tmp, args.listen)))
            return results
        finally:
            server.stop()
            if database.cleanup is not None:
                await database.cleanup()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=3, help="browser calls, one after another (default: 3)")
    parser.add_argument(
        "--listen", type=float, default=4.0, help="seconds of the answer to play before reading stats"
    )
    parser.add_argument(
        "--admin-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL for the throwaway database (else an embedded one)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; RESULTS.md untouched")
    args = parser.parse_args(argv)
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        print(f"Chromium not found at {CHROMIUM}: set CLOSELOOP_CHROMIUM", file=sys.stderr)
        return 2
    results = asyncio.run(run(args))
    section = render(results, argv)
    print(section)
    if not args.no_write:
        record(section)
        print("browser-rx: recorded in benchmarks/RESULTS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
