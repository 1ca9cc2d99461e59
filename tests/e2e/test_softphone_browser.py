"""An agent takes a customer's browser call in the console's softphone, both in Debian's headless
Chromium with fake microphones (two browser processes: each plays its own espeak-ng recording).

The customer calls from /chat and asks for a person; the agent, who ticked "Take calls in the
browser", is rung, accepts, hears the ticket summary before anything of the caller, then the server
relays audio both ways (measured by a WebAudio analyser in each page) while both sides are
transcribed; the agent mutes, holds, then hands the call back and the assistant answers again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from playwright.async_api import Page, async_playwright, expect

from tests.e2e.test_admin_analytics_browser import UNNAMED
from tests.e2e.test_console_browser import CHROMIUM_ARGS, _chromium, _shot, _sign_in
from tests.integration.browser_agent_parts import RATE, speech48k, until
from tests.support import LiveServer, live_server, make_user
from voice.audio import pcm16_to_wav

TIMEOUT = 15_000
QUIET = 0.01  # RMS (full scale 1.0) above which a 20 ms analyser sample counts as sound

# Every peer connection of the page gets an analyser on each track it receives: window.__heard
# collects [epoch ms, rms] every 20 ms (what the person hears, measured in their browser).
METER = """
(() => {
  window.__heard = [];
  const Native = window.RTCPeerConnection;
  window.RTCPeerConnection = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("track", (event) => {
        const context = new AudioContext();
        const analyser = context.createAnalyser();
        analyser.fftSize = 1024;
        context.createMediaStreamSource(new MediaStream([event.track])).connect(analyser);
        const samples = new Float32Array(analyser.fftSize);
        setInterval(() => {
          analyser.getFloatTimeDomainData(samples);
          let sum = 0;
          for (const x of samples) sum += x * x;
          window.__heard.push([Date.now(), Math.sqrt(sum / samples.length)]);
        }, 20);
      });
    }
  };
})();
"""


def wav(path: Path, *parts: str | float) -> Path:
    """A 48 kHz wav of espeak-ng sentences (str) and silences (float seconds)."""
    pcm = [speech48k(p) if isinstance(p, str) else np.zeros(int(p * RATE), np.int16) for p in parts]
    path.write_bytes(pcm16_to_wav(np.concatenate(pcm), RATE))
    return path


def microphone_args(recording: Path, *, loop: bool) -> list[str]:
    return [
        *CHROMIUM_ARGS,
        "--enable-blink-features=ComputedAccessibilityInfo",  # element.computedName, for UNNAMED
        "--use-fake-ui-for-media-stream",  # the microphone permission prompt says yes
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={recording}{'' if loop else '%noloop'}",
        "--autoplay-policy=no-user-gesture-required",
    ]


async def sound_ms(page: Page, since_ms: float, until_ms: float | None = None) -> float:
    """How long the page's person heard sound in the span (epoch ms), by its analyser."""
    heard: list[list[float]] = await page.evaluate("window.__heard")
    return 20.0 * sum(
        1 for at, rms in heard if at >= since_ms and (until_ms is None or at < until_ms) and rms > QUIET
    )


async def now_ms(page: Page) -> float:
    return float(await page.evaluate("Date.now()"))


async def rows(server: LiveServer, conversation_id: int) -> list[dict[str, Any]]:
    found = await server.services.pool.fetch(
        "SELECT seq, sender, kind, body FROM messages WHERE conversation_id = $1 ORDER BY seq",
        conversation_id,
    )
    return [dict(r) for r in found]


async def test_an_agent_takes_a_browser_call_in_the_softphone_briefed_first_bridged_both_ways_then_hands_back(
    database_url: str, tmp_path: Path
) -> None:
    # The caller: the greeting plays, they ask for a person, then (once the hold line and the
    # agent's briefing had time) say the same complaint every ~7 s, for the agent and, after the
    # hand back, for the assistant.
    complaint = ["My desk lamp arrived broken.", 5.5]
    caller_mic = wav(
        tmp_path / "caller.wav", 5.0, "I want to talk to a person.", 16.0, *(complaint * 8), 10.0
    )
    # The agent: another voice, looped (the briefing plays while their microphone is ignored).
    agent_mic = wav(
        tmp_path / "agent.wav",
        0.5,
        "Hello, this is Sam from the support team. How can I help you today?",
        1.5,
    )
    executable = _chromium()
    async with live_server(database_url) as server:
        await server.services.speech.start()
        pool = server.services.pool
        routing = server.services.desk.routing
        agent, password = await make_user(server, "agent")
        # the only available agent of every queue: the test knows who rings
        await pool.execute("UPDATE agents SET presence = 'away' WHERE user_id <> $1", agent.id)
        await routing.set_queues(agent.id, [q.name for q in await routing.queues()])
        await routing.set_capacity(agent.id, 1)
        await routing.set_presence(agent.id, "available")
        async with async_playwright() as p:
            agent_browser = await p.chromium.launch(
                executable_path=executable, args=microphone_args(agent_mic, loop=True)
            )
            customer_browser = await p.chromium.launch(
                executable_path=executable, args=microphone_args(caller_mic, loop=False)
            )
            try:
                console = await _sign_in(agent_browser, server, agent.email, password, "/console")
                await console.context.add_init_script(METER)
                await console.set_viewport_size({"width": 390, "height": 844})
                await console.reload()
                await expect(console.locator("#status")).to_have_text("Live", timeout=TIMEOUT)
                softphone = console.locator("#softphone")
                status = console.locator("#softphone-status")
                await expect(status).to_contain_text("Off")
                # ticked with the keyboard
                await console.focus("#softphone-on")
                await console.keyboard.press("Space")
                await expect(status).to_contain_text("Ready", timeout=TIMEOUT)
                assert await pool.fetchval("SELECT softphone FROM agents WHERE user_id = $1", agent.id)

                customer = await customer_browser.new_context(
                    base_url=server.base_url, viewport={"width": 420, "height": 780}
                )
                await customer.add_init_script(METER)
                chat = await customer.new_page()
                await chat.goto("/chat")
                await chat.click("#call")
                await expect(chat.locator("#call-state")).to_have_text(
                    "On a call with support", timeout=TIMEOUT
                )
                await expect(chat.locator("#messages")).to_contain_text("Thanks for calling", timeout=TIMEOUT)
                conversation_id = await pool.fetchval(
                    "SELECT conversation_id FROM calls WHERE called = 'webrtc' AND ended_at IS NULL"
                )

                # The agent's softphone rings (the console's offer card says so too) and is answered.
                await expect(status).to_contain_text("Incoming call", timeout=40_000)
                await expect(softphone).to_have_attribute("data-state", "ringing")
                await expect(console.locator("#offers .offer")).to_contain_text("ringing in the softphone")
                # the assistant's handoff line was captioned for the caller
                bot_lines = [r["body"] for r in await rows(server, conversation_id) if r["sender"] == "bot"]
                await expect(chat.locator("#messages")).to_contain_text(bot_lines[-1][:30], timeout=TIMEOUT)
                await _shot(console, "20-softphone-ringing-390.png")
                accepted_at = await now_ms(console)
                await softphone.get_by_role("button", name="Accept call").click()
                await expect(softphone).to_have_attribute("data-state", "briefing", timeout=TIMEOUT)

                # The ticket and summary first, agent only; then the caller joins.
                await expect(status).to_have_text("On the call with the customer.", timeout=40_000)
                bridged_at = await now_ms(console)
                briefing_ms = await sound_ms(console, accepted_at, bridged_at)
                assert briefing_ms > 1500, f"the agent heard {briefing_ms} ms before the caller joined"
                transfer = await pool.fetchrow(
                    "SELECT id, ticket_id, agent_id, via FROM transfers WHERE conversation_id = $1",
                    conversation_id,
                )
                assert transfer["via"] == "browser" and transfer["agent_id"] == agent.id
                bridged_seq = max(r["seq"] for r in await rows(server, conversation_id))
                # the console opened the call's conversation and its ticket
                await expect(console.locator("#thread-title")).to_contain_text(
                    f"#{conversation_id}", timeout=TIMEOUT
                )

                # Mute and hold switch, labelled by aria-pressed; nothing overflows at 390 px.
                mute = softphone.get_by_role("button", name="Mute")
                await mute.click()
                await expect(softphone.get_by_role("button", name="Unmute")).to_have_attribute(
                    "aria-pressed", "true"
                )
                await softphone.get_by_role("button", name="Unmute").click()
                await expect(mute).to_have_attribute("aria-pressed", "false", timeout=TIMEOUT)
                await softphone.get_by_role("button", name="Hold").click()
                await expect(status).to_contain_text("On hold", timeout=TIMEOUT)
                await softphone.get_by_role("button", name="Resume").click()
                await expect(softphone.get_by_role("button", name="Hold")).to_have_attribute(
                    "aria-pressed", "false", timeout=TIMEOUT
                )
                resumed_at = await now_ms(console)
                assert await console.evaluate("document.documentElement.scrollWidth") <= 390
                assert await console.evaluate(UNNAMED) == []  # every control announced by name
                await _shot(console, "21-softphone-on-a-call-390.png")

                # Bridged both ways: each browser hears the other's voice, both sides transcribed.
                async def each_hears_the_other() -> bool:
                    return (
                        await sound_ms(console, resumed_at) > 1000 and await sound_ms(chat, resumed_at) > 1000
                    )

                await until("each side heard the other", each_hears_the_other, 30)

                async def both_sides_written() -> bool:
                    after = [r for r in await rows(server, conversation_id) if r["seq"] > bridged_seq]
                    return {"agent", "customer"} <= {r["sender"] for r in after}

                await until("both sides were transcribed", both_sides_written, 30)
                written = [r for r in await rows(server, conversation_id) if r["seq"] > bridged_seq]
                assert not [r for r in written if r["sender"] == "bot"], "the assistant spoke while bridged"
                agent_said = " ".join(r["body"].lower() for r in written if r["sender"] == "agent")
                caller_said = " ".join(r["body"].lower() for r in written if r["sender"] == "customer")
                assert any(w in agent_said for w in ("help", "support", "sam")), agent_said
                assert any(w in caller_said for w in ("lamp", "broken", "desk")), caller_said

                # Hand back, by keyboard: the assistant speaks and answers the caller again.
                await softphone.get_by_role("button", name="Hand back to AI").focus()
                await console.keyboard.press("Enter")
                await expect(status).to_have_text("Handed back to the assistant.", timeout=TIMEOUT)
                back_at = await now_ms(chat)
                handed_seq = max(r["seq"] for r in await rows(server, conversation_id))
                assert (
                    await pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
                    == "ai"
                )

                async def assistant_answered() -> bool:
                    after = [r for r in await rows(server, conversation_id) if r["seq"] > handed_seq]
                    senders = [r["sender"] for r in after]
                    return "customer" in senders and senders[-1] == "bot"

                await until("the assistant answered after the hand back", assistant_answered, 30)
                assert await sound_ms(chat, back_at) > 500, "the caller heard nothing of the assistant"
                steps = [
                    (s["step"], s["outcome"])
                    for s in await pool.fetch(
                        "SELECT step, outcome FROM transfer_steps WHERE transfer_id = $1 ORDER BY id",
                        transfer["id"],
                    )
                ]
                assert ("bridged", "ok") in steps and ("ended", "hand_back") in steps, steps
                await expect(softphone).to_have_attribute("data-state", "ready")
                await chat.click("#hangup")
                await expect(chat.locator("#call-state")).to_have_text("Call ended.")
            finally:
                await customer_browser.close()
                await agent_browser.close()
                await routing.set_presence(agent.id, "away")
                await routing.set_softphone(agent.id, False)
