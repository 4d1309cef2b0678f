// What both status pages share (the agent's page.js, the ingest's ingest.js): building
// elements, formatting times, and the poll loop with its "live / reconnecting" header.
// Read-only (GET only); every text goes in through textContent, never as HTML.
"use strict";

window.EdgePage = (() => {
  const FETCH_TIMEOUT_MS = 5000;
  const MAX_RETRY_MS = 5000;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key.startsWith("data-")) node.setAttribute(key, String(value));
      else if (key === "title") node.title = String(value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clock(epoch) {
    if (epoch === null || epoch === undefined) return "–";
    return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
  }

  function stamp(epoch) {
    if (epoch === null || epoch === undefined) return "–";
    const date = new Date(epoch * 1000);
    return `${date.toLocaleDateString()} ${clock(epoch)}`;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    let rest = Math.round(seconds);
    const parts = [];
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]]) {
      if (rest >= size || (unit === "s" && parts.length === 0)) {
        parts.push(`${Math.floor(rest / size)}${unit}`);
        rest %= size;
      }
      if (parts.length === 2) break;
    }
    return parts.join(" ");
  }

  function percent(value) {
    return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)} %`;
  }

  function fact(list, label, value, id) {
    list.append(el("div", {}, el("dt", { text: label }), el("dd", { text: value, "data-fact": id })));
  }

  function setLink(state, text) {
    const link = $("link");
    link.dataset.state = state;
    link.textContent = text;
    const banner = $("banner");
    banner.hidden = state === "live";
    if (state !== "live") banner.textContent = text;
  }

  // Fetch `path` (with ?filter= from the input `filterId`, when it has text) every refresh_s
  // of the document and draw it with `render`; `peer` names the program in the header
  // ("the agent", "the ingest"). Returns `refreshSoon(ms)`: ask again after ms.
  function poll({ path, filterId, peer, render }) {
    let refreshMs = 1000;
    let failures = 0;
    let lastGood = null;
    let timer = null;

    async function tick() {
      const controller = new AbortController();
      const abortTimer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
      try {
        const url = new URL(path, location.origin);  // never the credentials of location
        const needle = filterId ? $(filterId).value.trim() : "";
        if (needle) url.searchParams.set("filter", needle);
        const response = await fetch(url, { cache: "no-store", signal: controller.signal, credentials: "same-origin" });
        if (response.status === 401) {
          setLink("denied", `${peer} asks for credentials: reload the page`);
          failures += 1;
        } else if (response.status === 503) {
          setLink("reconnecting", `${peer} is starting…`);
          failures += 1;
        } else if (!response.ok) {
          throw new Error(`HTTP ${response.status}`);
        } else {
          const doc = await response.json();
          refreshMs = Math.round(doc.refresh_s * 1000);
          failures = 0;
          lastGood = doc;
          render(doc);
          setLink("live", `live, every ${duration(doc.refresh_s)}`);
        }
      } catch (error) {
        failures += 1;
        const since = lastGood ? ` (last data ${clock(lastGood.now)})` : "";
        setLink("reconnecting", `reconnecting to ${peer}…${since}`);
      } finally {
        clearTimeout(abortTimer);
      }
      const wait = failures ? Math.min(MAX_RETRY_MS, refreshMs * 2 ** Math.min(failures - 1, 4)) : refreshMs;
      schedule(wait);
    }

    function schedule(wait) {
      clearTimeout(timer);
      // A tab in the background asks for nothing: it costs the server nothing.
      timer = setTimeout(() => (document.hidden ? null : tick()), wait);
    }

    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) schedule(0);
    });
    tick();
    return schedule;
  }

  return { $, el, clock, stamp, duration, percent, fact, poll };
})();
