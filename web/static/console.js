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
