// The agent softphone: take voice handoffs in the browser (server side: app/softphone.py).
// Inlined into the console page in place of its "shared: softphone.js" marker (web/shared_page_parts.py).
// The page holds the markup (console.html's section#softphone: the #softphone-on checkbox,
// #softphone-status, #softphone-controls and the #softphone-audio element) and hands every event
// of its console socket to closeloopSoftphone.onEvent (one socket per page). Offers of kind
// "voice" ring here; the page's own offer card asks closeloopSoftphone.ringing(id) and lets the
// softphone accept or decline. Once the call is bridged (or ends) the softphone dispatches a
// "softphone" event on window ({status, conversation_id}) for the page to follow.
// Everything shown is set with textContent.
(() => {
  "use strict";
  if (window.closeloopSoftphone) return;
  const byId = (id) => document.getElementById(id);
  const state = { csrf: null, ring: null, call: null, pc: null, mic: null, muted: false, held: false, busy: false, bridged: false };
  let ui = null, ringer = null;

  function button(text, onClick, cls) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = cls || "btn";
    b.textContent = text;
    b.addEventListener("click", async () => {
      if (state.busy) return;
      state.busy = true;
      for (const other of ui.controls.querySelectorAll("button")) other.disabled = true;
      try { await onClick(); } catch (e) { say(e.message || String(e)); } finally {
        state.busy = false;
        redraw();
      }
    });
    return b;
  }
  function say(text) { ui.status.textContent = text; }
  function stage(name) { ui.box.dataset.state = name; }

  async function csrf() {
    if (!state.csrf) {
      const me = await fetch("/api/me", { credentials: "same-origin" });
      if (!me.ok) throw new Error("You were signed out: sign in again to take calls.");
      state.csrf = (await me.json()).csrf_token;
    }
    return state.csrf;
  }
  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": await csrf() },
      body: JSON.stringify(body || {}),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = new Error((data.error && data.error.message) || `The request failed (${response.status}). Try again.`);
      error.status = response.status;
      throw error;
    }
    return data;
  }
  function tell(status, conversationId) {
    window.dispatchEvent(new CustomEvent("softphone", { detail: { status, conversation_id: conversationId } }));
  }

  // ---- the ring tone: two short beeps every 2 s (WebAudio, unlocked by ticking the checkbox) ------
  function ringTone(on) {
    if (ringer) { clearInterval(ringer.timer); ringer = null; }
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!on || !Context) return;
    const context = state.tones || (state.tones = new Context());
    const beep = () => {
      if (context.state !== "running") return;
      for (const at of [0, 0.25]) {
        const osc = context.createOscillator(), gain = context.createGain();
        osc.frequency.value = 440; gain.gain.value = 0.08;
        osc.connect(gain).connect(context.destination);
        osc.start(context.currentTime + at); osc.stop(context.currentTime + at + 0.18);
      }
    };
    beep();
    ringer = { timer: setInterval(beep, 2000) };
  }

  // ---- what the controls show -----------------------------------------------------------------------
  function redraw() {
    const items = [];
    if (state.call) {
      const id = state.call.assignment_id;
      const mute = button(state.muted ? "Unmute" : "Mute", async () => {
        const s = await post(`/webrtc/agent/${id}/mute`, { on: !state.muted });
        state.muted = s.muted;
        if (state.mic) state.mic.getTracks().forEach((t) => { t.enabled = !s.muted; });
        say(s.muted ? "Muted: the caller does not hear you." : "On the call with the customer.");
      });
      const hold = button(state.held ? "Resume" : "Hold", async () => {
        const s = await post(`/webrtc/agent/${id}/hold`, { on: !state.held });
        state.held = s.held;
        say(s.held ? "On hold: neither of you hears the other." : "On the call with the customer.");
      });
      mute.setAttribute("aria-pressed", String(state.muted));
      hold.setAttribute("aria-pressed", String(state.held));
      // mute and hold need the bridge: during the briefing only the agent is on the line
      mute.disabled = hold.disabled = !state.bridged || state.busy;
      const hangup = button("Hang up", async () => {
        await post(`/webrtc/agent/${id}/hangup`);
        hungUp("Call ended. The ticket stays yours to wrap up.");
      }, "btn danger");
      const back = button("Hand back to AI", async () => {
        await post(`/webrtc/agent/${id}/hand-back`);
        hungUp("Handed back to the assistant.");
      });
      hangup.disabled = back.disabled = state.busy;
      items.push(mute, hold, hangup, back);
    } else if (state.ring) {
      const yes = button("Accept call", accept, "btn primary");
      const no = button("Decline", decline);
      yes.disabled = no.disabled = state.busy;
      items.push(yes, no);
    }
    ui.controls.replaceChildren(...items);
  }
  function idle(text) {
    state.ring = null;
    ringTone(false);
    stage(ui.toggle.checked ? "ready" : "off");
    say(text || (ui.toggle.checked ? "Ready: voice calls ring here." : "Off: voice calls ring your phone, if you have one."));
    redraw();
  }

  // ---- ringing --------------------------------------------------------------------------------------
  function ring(offer) {
    if (state.call) return; // busy: the server rings someone else when this one times out
    state.ring = offer;
    stage("ringing");
    say(`Incoming call${offer.ticket ? ` · ticket ${offer.ticket}` : ""} · ${offer.queue} queue`);
    ringTone(true);
    redraw();
  }
  async function decline() {
    const offer = state.ring;
    if (!offer) return;
    idle("Declined: the call goes to the next agent.");
    await post(`/api/desk/offers/${offer.assignment_id}/decline`);
  }
  async function accept() {
    const offer = state.ring;
    if (!offer) return;
    ringTone(false);
    say("Allow the microphone to take the call…");
    let mic;
    try {
      mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
    } catch (e) {
      throw new Error(e && e.name === "NotAllowedError"
        ? "The microphone is blocked: allow it for this site (address bar), then accept again."
        : "No microphone was found: connect a headset, then accept again.");
    }
    let pc = null;
    try {
      const config = await fetch("/webrtc/config", { credentials: "same-origin" }).then((r) => r.json());
      pc = new RTCPeerConnection({ iceServers: config.iceServers || [] });
      mic.getTracks().forEach((t) => pc.addTrack(t, mic));
      pc.ontrack = (e) => { ui.audio.srcObject = e.streams[0] || new MediaStream([e.track]); };
      pc.onconnectionstatechange = () => {
        if (state.pc === pc && ["failed", "closed"].includes(pc.connectionState)) hungUp("The call's audio was lost; the assistant has the caller again.");
      };
      await pc.setLocalDescription(await pc.createOffer());
      await new Promise((resolve) => {
        if (pc.iceGatheringState === "complete") return resolve();
        pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
        setTimeout(resolve, 3000); // gather what there is; loopback needs none
      });
      // the server accepts the offer as it opens the leg (no separate accept: no race)
      const answer = await post("/webrtc/agent/offer", { assignment_id: offer.assignment_id, type: "offer", sdp: pc.localDescription.sdp });
      await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    } catch (e) {
      if (pc) pc.close();
      mic.getTracks().forEach((t) => t.stop());
      if (e.status === 404 || e.status === 409) { idle(`The call is no longer yours: ${e.message}`); return; }
      throw e;
    }
    Object.assign(state, { pc, mic, call: offer, ring: null, muted: false, held: false, bridged: false });
    stage("briefing");
    say("Connected · listen to the ticket summary; the caller joins next.");
  }

  // ---- on a call ----------------------------------------------------------------------------------
  function hungUp(text) {
    const call = state.call;
    if (state.pc) { try { state.pc.close(); } catch (_) { /* closed already */ } }
    if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
    Object.assign(state, { pc: null, mic: null, call: null, bridged: false, muted: false, held: false });
    ui.audio.srcObject = null;
    idle(text);
    if (call) tell("ended", call.conversation_id);
  }

  // ---- the console's events -------------------------------------------------------------------------
  function onEvent(event) {
    if (!ui || !event) return;
    if (event.type === "offer" && event.kind === "voice") return ring(event);
    const id = event.assignment_id;
    if (state.ring && id === state.ring.assignment_id && (event.type === "voice" || event.type === "assignment")) {
      if (["withdrawn", "declined", "expired"].includes(event.status)) {
        idle(event.reason === "caller_left" ? "The caller hung up before you answered." : "Missed: the call went to someone else.");
      }
    }
    if (state.call && id === state.call.assignment_id && event.type === "voice") {
      if (event.status === "bridged") {
        state.bridged = true;
        stage("bridged");
        say("On the call with the customer.");
        redraw();
        tell("bridged", state.call.conversation_id);
      }
      if (event.status === "ended") {
        const why = { caller_left: "The caller hung up.", agent_leg_lost: "The call's audio was lost; the assistant has the caller again." };
        hungUp(why[event.reason] || "Call ended.");
      }
    }
  }

  async function start() {
    ui = {
      box: byId("softphone"), toggle: byId("softphone-on"), status: byId("softphone-status"),
      controls: byId("softphone-controls"), audio: byId("softphone-audio"),
    };
    if (!ui.box) { ui = null; return; }
    ui.toggle.addEventListener("change", async () => {
      const wanted = ui.toggle.checked;
      // this click is a user gesture: the ring tone may play later
      try { ringTone(false); if (!state.tones && window.AudioContext) state.tones = new AudioContext(); } catch (_) { /* silent ring */ }
      try {
        const s = await post("/api/softphone", { on: wanted });
        ui.toggle.checked = s.softphone;
        idle();
      } catch (e) {
        ui.toggle.checked = !wanted;
        say(e.message);
      }
    });
    try {
      const s = await fetch("/api/softphone", { credentials: "same-origin" }).then((r) => r.json());
      ui.toggle.checked = !!s.softphone;
    } catch (_) { /* shown as off */ }
    if (!state.call && !state.ring) idle();
  }

  window.closeloopSoftphone = {
    state,
    onEvent,
    ringing: (assignmentId) => !!state.ring && state.ring.assignment_id === assignmentId,
    // the page's offer card answers through the softphone's own buttons (one path, one guard)
    accept: () => { const b = ui && ui.controls.querySelector("button.primary"); if (b) b.click(); },
    decline: () => { const b = ui && ui.controls.querySelector("button:not(.primary)"); if (b) b.click(); },
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
