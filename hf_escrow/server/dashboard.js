// The dashboard's only script. Every value from the server is set as text (textContent,
// attributes of elements built here), never parsed as HTML: a buyer chooses meta.model and
// descriptions, and they must stay text in the seller's page. The API key lives in this
// closure only: never in web storage or a cookie, so reloading the page asks for it again.
(() => {
  "use strict";
  const SVG = "http://www.w3.org/2000/svg";
  const STATUSES = new Set(["active", "released", "cancelled", "expired", "awaiting_verification"]);
  const REFRESH_MS = 5000;
  const $ = (id) => document.getElementById(id);
  // Integer micro-USDC as "1.500000" by moving the point in its digits: exact, no float scale.
  const usdc = (micro) => {
    const n = Math.round(Number(micro) || 0), digits = String(Math.abs(n)).padStart(7, "0");
    return `${n < 0 ? "-" : ""}${digits.slice(0, -6)}.${digits.slice(-6)}`;
  };
  let apiKey = null;
  let timer = null;

  async function api(path) {
    const answer = await fetch(path, { headers: { Authorization: "Bearer " + apiKey }, cache: "no-store",
                                       credentials: "omit" });
    const body = await answer.json();
    if (!answer.ok) throw new Error(String(body.message || answer.statusText));
    return body;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = String(text);
    if (className) td.className = className;
    return td;
  }

  function bars(root, rows) {
    root.replaceChildren();
    const max = Math.max(1, ...rows.map((r) => Number(r.paid_micro) || 0));
    rows.forEach((r, i) => {
      const width = Math.round(400 * (Number(r.paid_micro) || 0) / max);
      const tokens = (Number(r.tokens_in) || 0) + (Number(r.tokens_out) || 0);
      root.append(svg("text", { x: 0, y: 22 + i * 26 }, String(r.model || "(none)").slice(0, 22)),
                  svg("rect", { x: 170, y: 10 + i * 26, width, height: 16, fill: "#0969da" }),
                  svg("text", { x: 176 + width, y: 22 + i * 26 }, `${usdc(r.paid_micro)} · ${tokens} tok`));
    });
    if (!rows.length) root.append(svg("text", { x: 0, y: 20 }, "no spend yet"));
  }

  function line(root, escrows) {
    root.replaceChildren();
    const points = escrows.filter((e) => e.role === "buyer").sort((a, b) => a.created_at_ms - b.created_at_ms);
    if (!points.length) { root.append(svg("text", { x: 0, y: 20 }, "no spend yet")); return; }
    let total = 0;
    const series = points.map((e) => [Number(e.created_at_ms), (total += Number(e.paid_micro) || 0)]);
    const t0 = series[0][0], t1 = Math.max(series[series.length - 1][0], t0 + 1), top = Math.max(1, total);
    const xy = series.map(([t, v]) => [50 + 640 * (t - t0) / (t1 - t0), 160 - 140 * v / top]);
    root.append(svg("line", { x1: 50, y1: 160, x2: 700, y2: 160, stroke: "#d0d7de" }),
                svg("polyline", { fill: "none", stroke: "#1a7f37", "stroke-width": 2,
                                  points: xy.map((p) => p.join(",")).join(" ") }),
                ...xy.map(([cx, cy]) => svg("circle", { cx, cy, r: 3, fill: "#1a7f37" })),
                svg("text", { x: 0, y: 24 }, usdc(total)), svg("text", { x: 0, y: 160 }, "0"),
                svg("text", { x: 50, y: 176 }, new Date(t0).toLocaleTimeString()),
                svg("text", { x: 620, y: 176 }, new Date(t1).toLocaleTimeString()));
  }

  function row(e) {
    const tr = document.createElement("tr");
    const status = String(e.status);
    tr.append(cell(e.id), cell(status, STATUSES.has(status) ? "status-" + status : ""), cell(e.role),
              cell(e.model || ""), cell(usdc(e.amount_micro), "num"), cell(usdc(e.paid_micro), "num"),
              cell(usdc(e.refunded_micro), "num"), cell(usdc(e.remaining_micro), "num"),
              cell(`${Number(e.tokens_in) || 0}/${Number(e.tokens_out) || 0}`, "num"),
              cell(new Date(Number(e.expires_at_ms)).toLocaleString()));
    return tr;
  }

  async function refresh() {
    try {
      const [me, escrows, analytics] = await Promise.all([api("/api/me"), api("/api/escrow?limit=200"),
                                                          api("/api/analytics")]);
      $("error").textContent = "";
      $("main").hidden = false;
      $("agent").textContent = String(me.agent_id);
      $("balance").textContent = usdc(me.balance_micro);
      $("open").textContent = String(me.escrows_open);
      $("fees").textContent = usdc(analytics.earnings.reduce((s, r) => s + (Number(r.fees_micro) || 0), 0));
      $("referral").textContent = usdc(analytics.referral_earned_micro);
      escrows.forEach((e) => { e.role = e.buyer === me.agent_id ? "buyer" : "seller"; });
      bars($("per-model"), analytics.spend);
      line($("over-time"), escrows);
      $("escrows").replaceChildren(...escrows.map(row));
    } catch (error) {
      $("error").textContent = String(error.message);
    }
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = $("key").value.trim();
    $("key").value = "";  // kept in this closure only, not in the page
    refresh();
    clearInterval(timer);
    timer = setInterval(refresh, REFRESH_MS);  // live status, one request set every 5 s at most
  });
})();
