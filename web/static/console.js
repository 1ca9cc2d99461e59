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
