// The agent softphone: take voice handoffs in the browser (server side: app/softphone.py).
// Self-contained: it builds its own small panel, opens its own console socket for the
// "offer" events of kind "voice", and talks to the server with the session's CSRF token.
// Everything shown is set with textContent. Inlined into the console page with the marker
//   /* shared: softphone.js, inlined when the page is served */
(() => {
  "use strict";
  if (window.closeloopSoftphone) return;
  const state = { csrf: null, ring: null, call: null, pc: null, mic: null, muted: false, held: false, ws: null };

  const panel = document.createElement("section");
  panel.setAttribute("aria-label", "Softphone");
  panel.style.cssText = "position:fixed;right:1rem;bottom:1rem;z-index:50;background:#fff;border:1px solid #ccd;" +
    "border-radius:.5rem;padding:.75rem;box-shadow:0 2px 10px rgba(0,0,0,.15);font:14px system-ui,sans-serif;min-width:16rem";
  const title = document.createElement("strong");
  title.textContent = "Softphone";
  const status = document.createElement("p");
  status.setAttribute("role", "status");
  status.setAttribute("aria-live", "polite");
  status.style.margin = ".4rem 0";
  const toggleLabel = document.createElement("label");
  const toggle = document.createElement("input");
  toggle.type = "checkbox";
  toggleLabel.append(toggle, " Take calls in the browser");
  const buttons = document.createElement("div");
  buttons.style.cssText = "display:flex;flex-wrap:wrap;gap:.4rem;margin-top:.4rem";
  const audio = document.createElement("audio");
  audio.autoplay = true;
  panel.append(title, status, toggleLabel, buttons, audio);

  function button(text, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.addEventListener("click", () => onClick().catch((e) => say(e.message || String(e))));
    return b;
  }
  function say(text) { status.textContent = text; }
  function show(...items) { buttons.replaceChildren(...items); }

  async function csrf() {
    if (!state.csrf) {
      const me = await fetch("/api/me", { credentials: "same-origin" });
      if (!me.ok) throw new Error("Sign in again to take calls.");
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
    if (!response.ok) throw new Error((data.error && data.error.message) || `Request failed (${response.status})`);
    return data;
  }

  // ---- ringing --------------------------------------------------------------------------------
  function ring(offer) {
    if (state.call) return; // busy on a call: the server rings someone else when this one times out
    state.ring = offer;
    say(`Incoming call${offer.ticket ? ` · ticket ${offer.ticket}` : ""} · ${offer.queue}`);
    show(button("Accept", accept), button("Decline", decline));
    try { navigator.vibrate && navigator.vibrate(200); } catch (_) { /* not on desktops */ }
  }
  function idle(text) {
    state.ring = null;
    say(text || (toggle.checked ? "Ready for calls." : "Calls ring your phone."));
    show();
  }
  async function decline() {
    const offer = state.ring;
    if (!offer) return;
    idle("Declined.");
    await post(`/api/desk/offers/${offer.assignment_id}/decline`);
  }
  async function accept() {
    const offer = state.ring;
    if (!offer) return;
    say("Allow the microphone…");
    const mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
    state.mic = mic;
    await post(`/api/desk/offers/${offer.assignment_id}/accept`);
    const config = await fetch("/webrtc/config", { credentials: "same-origin" }).then((r) => r.json());
    const pc = new RTCPeerConnection({ iceServers: config.iceServers || [] });
    state.pc = pc;
    mic.getTracks().forEach((t) => pc.addTrack(t, mic));
    pc.ontrack = (e) => { audio.srcObject = e.streams[0] || new MediaStream([e.track]); };
    pc.onconnectionstatechange = () => {
      if (["failed", "closed"].includes(pc.connectionState)) hungUp("The call's audio was lost.");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
      setTimeout(resolve, 3000); // gather what there is; loopback needs none
    });
    const answer = await post("/webrtc/agent/offer", {
      assignment_id: offer.assignment_id, type: "offer", sdp: pc.localDescription.sdp,
    });
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    state.call = offer;
    state.ring = null;
    state.muted = state.held = false;
    say("Connecting · listen to the summary…");
    controls();
  }

  // ---- on a call ------------------------------------------------------------------------------
  function controls() {
    const id = state.call.assignment_id;
    const mute = button(state.muted ? "Unmute" : "Mute", async () => {
      const s = await post(`/webrtc/agent/${id}/mute`, { on: !state.muted });
      state.muted = s.muted;
      state.mic && state.mic.getTracks().forEach((t) => { t.enabled = !s.muted; });
      controls();
    });
    const hold = button(state.held ? "Resume" : "Hold", async () => {
      const s = await post(`/webrtc/agent/${id}/hold`, { on: !state.held });
      state.held = s.held;
      controls();
    });
    const hangup = button("Hang up", async () => { await post(`/webrtc/agent/${id}/hangup`); hungUp("Call ended."); });
    const back = button("Hand back to AI", async () => { await post(`/webrtc/agent/${id}/hand-back`); hungUp("Handed back to the assistant."); });
    mute.setAttribute("aria-pressed", String(state.muted));
    hold.setAttribute("aria-pressed", String(state.held));
    hangup.style.color = "#b00020";
    show(mute, hold, hangup, back);
  }
  function hungUp(text) {
    if (state.pc) { try { state.pc.close(); } catch (_) { /* closed already */ } }
    if (state.mic) state.mic.getTracks().forEach((t) => t.stop());
    state.pc = state.mic = state.call = null;
    audio.srcObject = null;
    idle(text);
  }

  // ---- the console's events -------------------------------------------------------------------
  function onEvent(event) {
    if (event.type === "offer" && event.kind === "voice") return ring(event);
    const id = event.assignment_id;
    if (state.ring && id === state.ring.assignment_id && (event.type === "voice" || event.type === "assignment")) {
      if (event.status === "withdrawn" || event.status === "declined" || event.status === "expired") idle("The call went to someone else.");
    }
    if (state.call && id === state.call.assignment_id && event.type === "voice") {
      if (event.status === "bridged") say("On the call.");
      if (event.status === "ended") hungUp(event.reason === "caller_left" ? "The caller hung up." : "Call ended.");
    }
  }
  function listen(delay) {
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/console/ws`);
    state.ws = ws;
    ws.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (_) { /* not for us */ } };
    ws.onclose = () => setTimeout(() => listen(Math.min((delay || 1000) * 2, 30000)), delay || 1000);
  }

  toggle.addEventListener("change", async () => {
    try {
      const s = await post("/api/softphone", { on: toggle.checked });
      toggle.checked = s.softphone;
      idle();
    } catch (e) {
      toggle.checked = !toggle.checked;
      say(e.message);
    }
  });

  async function start() {
    document.body.append(panel);
    try {
      const s = await fetch("/api/softphone", { credentials: "same-origin" }).then((r) => r.json());
      toggle.checked = !!s.softphone;
    } catch (_) { /* shown as off */ }
    idle();
    listen(1000);
  }
  window.closeloopSoftphone = { state };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
