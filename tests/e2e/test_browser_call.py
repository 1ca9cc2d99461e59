"""A customer calls from the /chat page in Debian's headless Chromium: a fake microphone plays an
espeak-ng recording (``--use-file-for-fake-audio-capture``), the call runs over WebRTC to the real
server (aiortc) and its real models, the assistant answers, the page hangs up."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import numpy as np
from playwright.async_api import async_playwright, expect

from tests.e2e.test_console_browser import CHROMIUM_ARGS, _chromium, _shot
from tests.support import live_server
from voice.audio import pcm16_to_wav, resample, wav_to_pcm16

RATE = 48000


def fake_microphone(path: Path) -> Path:
    """5 s of silence (the greeting plays), the question, then silence."""
    said = path.with_suffix(".espeak.wav")
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(said), "what are your opening hours"], check=True
    )
    pcm, rate = wav_to_pcm16(said.read_bytes())
    speech = resample(pcm, rate, RATE)
    audio = np.concatenate([np.zeros(5 * RATE, np.int16), speech, np.zeros(6 * RATE, np.int16)])
    path.write_bytes(pcm16_to_wav(audio, RATE))
    return path


async def test_a_customer_calls_from_the_chat_page_and_is_answered_by_voice(
    database_url: str, tmp_path: Path
) -> None:
    microphone = fake_microphone(tmp_path / "caller.wav")
    args = [
        *CHROMIUM_ARGS,
        "--use-fake-ui-for-media-stream",  # the microphone permission prompt says yes
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ]
    async with live_server(database_url) as server:
        await server.services.speech.start()
        pool = server.services.pool
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=_chromium(), args=args)
            try:
                context = await browser.new_context(
                    base_url=server.base_url, viewport={"width": 420, "height": 780}
                )
                page = await context.new_page()
                await page.goto("/chat")
                await page.click("#call")
                await expect(page.locator("#call-state")).to_have_text(
                    "On a call with support", timeout=20_000
                )
                await expect(page.locator("#call")).to_have_attribute("aria-pressed", "true")
                call_id = None
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline:
                    rows = await pool.fetch(
                        """SELECT c.call_sid, m.sender, m.body FROM calls c
                           JOIN messages m ON m.conversation_id = c.conversation_id
                           WHERE c.called = 'webrtc' AND c.ended_at IS NULL ORDER BY m.seq"""
                    )
                    senders = [r["sender"] for r in rows]
                    if (
                        "customer" in senders
                        and senders[-1] == "bot"
                        and senders.index("customer") < len(senders) - 1
                    ):
                        call_id = rows[0]["call_sid"]
                        said = " ".join(r["body"].lower() for r in rows if r["sender"] == "customer")
                        break
                    await asyncio.sleep(0.2)
                assert call_id is not None, "the caller was not answered within 40 s"
                assert any(word in said for word in ("hour", "open", "time")), said
                # live captions of both sides in the conversation view
                messages = page.locator("#messages")
                await expect(messages).to_contain_text("Thanks for calling", timeout=5_000)
                await expect(page.locator("#messages .from-customer")).not_to_have_count(0, timeout=5_000)
                bot_lines = [r["body"] for r in rows if r["sender"] == "bot"]
                await expect(messages).to_contain_text(bot_lines[-1][:40], timeout=5_000)
                await _shot(page, "10-browser-call.png")

                await page.click("#hangup")
                await expect(page.locator("#call-state")).to_have_text("Call ended.")
                deadline = time.monotonic() + 10
                while await pool.fetchval("SELECT ended_at FROM calls WHERE call_sid = $1", call_id) is None:
                    assert time.monotonic() < deadline, "the server did not end the call"
                    await asyncio.sleep(0.1)
                assert (
                    await pool.fetchval("SELECT end_reason FROM calls WHERE call_sid = $1", call_id)
                    == "hangup"
                )
            finally:
                await browser.close()
