// edge-agent status page: reads /api/page every refresh_s seconds and draws it (the poll
// loop and the helpers are common.js). Every text goes in through textContent, never as HTML.
"use strict";

(() => {
  const { $, el, clock, stamp, duration, percent, fact, poll } = window.EdgePage;
  const STATE_WORDS = {
    running: "running",
    planned_stop: "planned stop",
    unplanned_stop: "unplanned stop",
    microstop: "microstop",
    unknown: "unknown",
    up: "up",
    down: "down",
    open: "down (breaker open)",
  };

  const hovered = new Map(); // machine -> index of the hovered timeline segment
  const openSagas = new Set(); // saga ids whose steps are shown

  function renderOverview(doc) {
    const o = doc.overview;
    $("gateway").textContent = `${o.gateway} · edge-agent ${o.version}`;
    document.title = `${o.gateway} · edge-agent`;
    const verdict = $("verdict");
    verdict.textContent = o.verdict;
    verdict.className = `badge ${o.verdict}`;
    const facts = el("dl", { id: "overview-facts", class: "facts" });
    fact(facts, "Gateway", o.gateway, "gateway");
    fact(facts, "Version", o.version, "version");
    fact(facts, "Up for", duration(o.uptime_s), "uptime");
    fact(facts, "Broker", `${o.broker} (${o.uplink})`, "uplink");
    if (o.sync === "live-only") {
      fact(facts, "Central store", "live only: samples are not forwarded", "sync");
    } else {
      fact(facts, "Central acknowledged", o.last_ack_age_s === null ? "not yet" : `${duration(o.last_ack_age_s)} ago`, "ack-age");
      fact(facts, "Acked / committed seq", `${o.acked_seq} / ${o.committed_seq}`, "seq");
      fact(facts, "Oldest unacknowledged", o.oldest_unacked_s === null ? "none" : duration(o.oldest_unacked_s), "oldest");
    }
    fact(facts, "Outbox", `${o.outbox_events} events`, "outbox");
    fact(facts, "Gaps (samples dropped, buffer full)", String(o.dropped_total), "gaps");
    $("overview-facts").replaceWith(facts);
    const reasons = el("ul", { id: "reasons", class: "reasons" });
    for (const reason of o.reasons) reasons.append(el("li", { text: reason }));
    if (o.uplink_error && o.uplink !== "up") reasons.append(el("li", { text: `broker: ${o.uplink_error}` }));
    $("reasons").replaceWith(reasons);
  }

  function applyFilter() {
    const needle = $("filter").value.trim().toLowerCase();
    for (const card of document.querySelectorAll("#device-list .card")) {
      const device = card.dataset.device.toLowerCase();
      let shown = 0;
      for (const row of card.querySelectorAll("tr[data-tag]")) {
        const match = !needle || device.includes(needle) || row.dataset.tag.toLowerCase().includes(needle);
        row.classList.toggle("hidden", !match);
        if (match) shown += 1;
      }
      card.classList.toggle("hidden", needle !== "" && shown === 0 && !device.includes(needle));
    }
  }

  function renderDevices(doc) {
    const list = el("div", { id: "device-list", class: "cards" });
    if (doc.devices.length === 0) list.append(el("p", { class: "empty", text: "No devices configured." }));
    for (const d of doc.devices) {
      const card = el("article", { class: "card", "data-device": d.name, "data-state": d.state });
      card.append(
        el("header", {},
          el("h3", { text: d.name }),
          el("span", { class: `badge ${d.state}`, text: STATE_WORDS[d.state] || d.state, "data-role": "state" }),
          el("span", { class: "muted", text: `${d.driver}, since ${clock(d.since)} (${duration(doc.now - d.since)})` })),
      );
      if (d.reason) card.append(el("p", { class: "error", text: d.reason, "data-role": "reason" }));
      card.append(el("p", { class: "muted", text:
        `poll every ${duration(d.poll_interval_s)}, last took ${duration(d.last_poll_s)}; ` +
        `${d.polls} polls, ${d.poll_errors} errors, ${d.skipped_ticks} skipped ticks, ${d.reconnects} reconnects` }));
      const table = el("table", {},
        el("thead", {}, el("tr", {},
          el("th", { text: "Tag" }), el("th", { text: "Value" }), el("th", { text: "Unit" }),
          el("th", { text: "Quality" }),
          el("th", { class: "num", text: "Age" }))));
      const body = el("tbody");
      for (const t of d.tags) {
        body.append(el("tr", { "data-tag": t.name, class: t.quality || "" },
          el("td", { text: t.name + (t.writable ? " ✎" : ""), title: t.writable ? "writable by workflows" : null }),
          el("td", { class: "value", text: t.value === null ? "–" : t.value }),
          el("td", { class: "unit", text: t.unit || "" }),
          el("td", { text: t.quality || "not read yet" }),
          el("td", { class: "num", text: t.ts === null ? "–" : duration(Math.max(0, doc.now - t.ts)) })));
      }
      table.append(body);
      card.append(el("div", { class: "scroll" }, table));
      if (d.tags_matching > d.tags.length) {
        card.append(el("p", { class: "muted", "data-role": "more", text:
          `${d.tags.length} of ${d.tags_matching} tags shown (${d.tags_total} in all): type in the filter to find the others` }));
      }
      list.append(card);
    }
    $("device-list").replaceWith(list);
    applyFilter();
  }

  function segmentText(s) {
    return `${STATE_WORDS[s.state] || s.state}${s.code === null ? "" : ` (code ${JSON.stringify(s.code)})`}: ` +
      `${clock(s.start)}–${clock(s.end)}, ${duration(s.end - s.start)}`;
  }

  function timelineBar(m, doc) {
    const bar = el("div", { class: "bar", "data-role": "timeline", role: "img",
      "aria-label": `${m.name}: ${m.timeline.length} state segments` });
    const info = el("div", { class: "hover-info", "data-role": "hover-info" });
    const start = m.window ? m.window.start : m.timeline.length ? m.timeline[0].start : doc.now;
    const end = m.window ? m.window.end : doc.now;
    const span = Math.max(1e-9, end - start);
    m.timeline.forEach((s, index) => {
      const seg = el("div", { class: `segment ${s.state}`, "data-state": s.state, title: segmentText(s) });
      seg.style.width = `${(100 * (s.end - s.start)) / span}%`;
      seg.addEventListener("mouseenter", () => { hovered.set(m.name, index); info.textContent = segmentText(s); });
      seg.addEventListener("mouseleave", () => { hovered.delete(m.name); info.textContent = ""; });
      bar.append(seg);
    });
    if (m.timeline.length && m.timeline[0].start > start) {
      const gap = el("div", { class: "segment-gap" });
      gap.style.width = `${(100 * (m.timeline[0].start - start)) / span}%`;
      bar.prepend(gap);
    }
    const index = hovered.get(m.name);
    if (index !== undefined && m.timeline[index]) info.textContent = segmentText(m.timeline[index]);
    return [bar, info];
  }

  function oeeTable(m) {
    const table = el("table", { "data-role": "oee" },
      el("thead", {}, el("tr", {},
        ...["Window", "A", "P", "Q", "OEE", "Produced", "Good", "Reject"].map((h, i) =>
          el("th", { class: i ? "num" : null, text: h })))));
    const body = el("tbody");
    const row = (label, r) => el("tr", { "data-window": label },
      el("td", { text: r ? `${label} (${r.window.name})` : label }),
      ...(r ? [percent(r.availability), percent(r.performance), percent(r.quality), percent(r.oee),
        r.produced_quantity, r.good_quantity, r.reject_quantity] : ["–", "–", "–", "–", "–", "–", "–"])
        .map((v) => el("td", { class: "num", text: v })));
    body.append(row("shift", m.shift), row("rolling", m.rolling));
    for (const r of m.finished) body.append(row(`finished ${r.window.start.slice(0, 10)}`, r));
    table.append(body);
    return el("div", { class: "scroll" }, table);
  }

  function renderMachines(doc) {
    const list = el("div", { id: "machine-list", class: "cards" });
    if (doc.machines.length === 0) list.append(el("p", { class: "empty", text: "No machines configured." }));
    for (const m of doc.machines) {
      const state = m.state || "unknown";
      const card = el("article", { class: "card", "data-machine": m.name, "data-state": state });
      card.append(el("header", {},
        el("h3", { text: m.name }),
        el("span", { class: `badge ${state}`, text: STATE_WORDS[state] || state, "data-role": "state" }),
        el("span", { class: "muted", text: m.since === null ? "no state read yet" : `since ${clock(m.since)}${m.code === null ? "" : `, code ${JSON.stringify(m.code)}`}` })));
      card.append(el("p", { class: "muted", text: m.window
        ? `Shift ${m.window.name}, ${clock(m.window.start)}–${clock(m.window.end)}`
        : "Outside a shift: the rolling window" }));
      card.append(...timelineBar(m, doc));
      card.append(el("div", { class: "legend" }, ...["running", "planned_stop", "unplanned_stop", "microstop", "unknown"]
        .map((s) => el("span", { class: s, text: STATE_WORDS[s] }))));
      card.append(oeeTable(m));
      list.append(card);
    }
    $("machine-list").replaceWith(list);
  }

  function show(value) {
    return value === null || value === undefined ? "–" : JSON.stringify(value);
  }

  function renderWorkflows(doc) {
    const w = doc.workflows;
    const alarms = el("ul", { id: "alarms", class: "alarms" });
    if (w.unavailable) alarms.append(el("li", { "data-role": "alarm", text: `Workflows ${w.unavailable}` }));
    for (const a of w.alarms) {
      alarms.append(el("li", { "data-role": "alarm" },
        el("strong", { text: "Needs a person: " }), a.message,
        el("div", { class: "muted", text: `${stamp(a.ts)}${a.workflow ? `, workflow ${a.workflow}` : ""}${a.devices.length ? `, ${a.devices.join(", ")}` : ""}` })));
    }
    $("alarms").replaceWith(alarms);
    const list = el("div", { id: "saga-list" });
    if (w.configured.length === 0) list.append(el("p", { class: "empty", text: "No workflows configured." }));
    else if (w.sagas.length === 0) list.append(el("p", { class: "empty", text: `No commands yet (workflows: ${w.configured.join(", ")}).` }));
    for (const s of w.sagas) {
      const details = el("details", { class: "saga", "data-saga": s.id });
      details.open = openSagas.has(s.id);
      details.addEventListener("toggle", () => (details.open ? openSagas.add(s.id) : openSagas.delete(s.id)));
      details.append(el("summary", {},
        el("strong", { text: s.workflow }),
        el("span", { class: `badge ${s.state}`, text: s.state }),
        el("span", { class: "muted", text: `command ${s.command_id}, ${stamp(s.created)}` }),
        s.detail ? el("span", { class: "muted", text: s.detail }) : null));
      const table = el("table", {}, el("thead", {}, el("tr", {},
        ...["#", "Step", "Tag", "Phase", "Value", "Before", "Read back", "Detail"].map((h) => el("th", { text: h })))));
      const body = el("tbody");
      for (const step of s.steps) {
        body.append(el("tr", { class: step.phase.startsWith("compensat") ? "uncertain" : "" },
          ...[step.idx, step.kind, step.ref || "–", step.phase, show(step.value), show(step.previous),
            show(step.result), step.detail || ""].map((v) => el("td", { text: v }))));
      }
      table.append(body);
      details.append(el("div", { class: "scroll" }, table));
      list.append(details);
    }
    $("saga-list").replaceWith(list);
  }

  function render(doc) {
    renderOverview(doc);
    renderDevices(doc);
    renderMachines(doc);
    renderWorkflows(doc);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const refreshSoon = poll({ path: "/api/page", filterId: "filter", peer: "the agent", render });
    $("filter").addEventListener("input", () => {
      applyFilter();
      refreshSoon(250);  // the agent filters too: tags beyond the first shown come in
    });
  });
})();
