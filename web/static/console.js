"use strict";
// Helpers shared by the console pages (inlined by web/shared_page_parts.py). Everything from
// the server is rendered with createElement/textContent, never parsed as HTML: transcripts are
// typed by customers.
const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}
const when = (iso) => iso ? new Date(iso).toLocaleString() : "";

// One navigation on every staff page (the <nav id="staff-nav"> of its header): the pages the
// signed-in person's role may use, the current one marked.
const STAFF_PAGES = [
  ["/console", "Console", ["agent", "supervisor", "admin"]],
  ["/supervisor", "Supervisor", ["supervisor", "admin"]],
  ["/analytics", "Analytics", ["supervisor", "admin"]],
  ["/admin", "Admin", ["admin"]],
];
async function staffNav() {
  const nav = document.getElementById("staff-nav");
  if (!nav) return;
  let role = null;
  try {
    const response = await fetch("/api/me", { credentials: "same-origin" });
    if (!response.ok) return;
    role = (await response.json()).user.role;
  } catch (e) {
    return;
  }
  for (const [href, label, roles] of STAFF_PAGES) {
    if (!roles.includes(role)) continue;
    const link = el("a", "nav-link", label);
    link.href = href;
    if (location.pathname === href || location.pathname.startsWith(href + "/")) link.setAttribute("aria-current", "page");
    nav.append(link);
  }
}
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", staffNav);
else staffNav();

// A time element for an ISO timestamp: the local time (the date too when not today), the full
// local date and time on hover and for assistive technology.
function timeTag(iso, cls) {
  const at = iso ? new Date(iso) : new Date();
  const today = new Date().toDateString() === at.toDateString();
  const node = el("time", cls || "stamp", today
    ? at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : at.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" }));
  node.dateTime = at.toISOString();
  node.title = at.toLocaleString([], { dateStyle: "full", timeStyle: "medium" });
  return node;
}

// "45 s", "3 min 05 s", "2 h 07 min": a duration a person reads at a glance.
function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}
