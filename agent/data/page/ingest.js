// edge-agent ingest status page: reads /api/page every refresh_s seconds and draws the ingest
// and its gateways (the poll loop and the helpers are common.js). Every text goes in through
// textContent, never as HTML: a gateway's id is whatever a client published under.
"use strict";

(() => {
  const { $, el, clock, stamp, duration, fact, poll } = window.EdgePage;

  const ago = (doc, epoch) => (epoch === null ? "–" : `${duration(Math.max(0, doc.now - epoch))} ago`);
  const yes = (flag, good, bad) => (flag ? good : bad);

  function renderOverview(doc) {
    const o = doc.overview;
    $("title").textContent = `edge-agent ingest ${o.version}`;
    const verdict = $("verdict");
    verdict.textContent = o.verdict;
    verdict.className = `badge ${o.verdict}`;
    const facts = el("dl", { id: "overview-facts", class: "facts" });
    fact(facts, "Version", o.version, "version");
    fact(facts, "Up for", duration(o.uptime_s), "uptime");
    fact(facts, "Database", yes(o.database_up, "up", "down"), "database");
    fact(facts, "Broker", `${o.broker} (${yes(o.mqtt_connected, "connected", "not connected")})`, "broker");
    fact(facts, "Subscription", `${o.topic} (${yes(o.subscribed, "granted", "not granted")})`, "subscription");
    fact(facts, "Queue", `${o.queued} of ${o.queue_size} messages`, "queue");
    fact(facts, "Messages received", String(o.messages), "messages");
    fact(facts, "Batches committed", String(o.batches_committed), "committed");
    fact(facts, "Rows stored / duplicates", `${o.rows_inserted} / ${o.rows_duplicate}`, "rows");
    fact(facts, "Malformed", `${o.malformed} (${o.uncovered} uncovered, ${o.out_of_window} out of window)`, "malformed");
    fact(facts, "Acks sent / unsent", `${o.acks_published} / ${o.acks_unsent}`, "acks");
    fact(facts, "Dropped from a full queue", String(o.overflow_dropped), "overflow");
    $("overview-facts").replaceWith(facts);
    const reasons = el("ul", { id: "reasons", class: "reasons" });
    for (const reason of o.reasons) reasons.append(el("li", { text: reason }));
    $("reasons").replaceWith(reasons);
  }

  function cell(text, role, title) {
    return el("td", { class: "num", text, "data-role": role, title: title || null });
  }

  function renderGateways(doc) {
    const body = el("tbody", { id: "gateway-rows" });
    for (const g of doc.gateways) {
      const newest = g.streams.length ? g.streams[0] : null;
      const older = g.streams_total > 1 ? ` (+${g.streams_total - 1} older streams)` : "";
      const above = newest && newest.ranges_above
        ? `up to ${newest.highest_committed} (${newest.ranges_above} ranges)`
        : "–";
      const gaps = g.gap_events
        ? `${g.gap_events} (${g.gap_seqs} seqs, last ${stamp(g.last_gap)})`
        : "0";
      const row = el("tr", { "data-gateway": g.gateway, class: g.malformed ? "bad" : "" },
        el("td", { class: "value", text: g.gateway, title: newest ? `stream ${newest.stream}${older}` : null }),
        cell(ago(doc, g.last_message), "last-batch"),
        cell(ago(doc, g.last_commit), "last-commit"),
        cell(newest ? String(newest.acked_seq) + older : "–", "acked"),
        cell(above, "above", "committed, not yet acknowledged: a seq below is missing"),
        cell(newest && newest.ack_sent !== null ? String(newest.ack_sent) : "–", "ack-sent",
          g.last_ack === null ? null : `at ${clock(g.last_ack)}`),
        cell(String(g.malformed), "malformed"),
        cell(gaps, "gaps"));
      body.append(row);
    }
    $("gateway-rows").replaceWith(body);
    let note = doc.gateways.length ? "" : "No gateway seen yet.";
    if (doc.database_read) note = `Stored figures missing: ${doc.database_read}`;
    else if (doc.more) note = `The first ${doc.gateways.length} gateways shown (${doc.gateways_stored} stored match): type in the filter to find the others.`;
    $("gateways-note").textContent = note;
  }

  function render(doc) {
    renderOverview(doc);
    renderGateways(doc);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const refreshSoon = poll({ path: "/api/page", filterId: "filter", peer: "the ingest", render });
    $("filter").addEventListener("input", () => refreshSoon(250));
  });
})();
