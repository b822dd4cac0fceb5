// The visionloop dashboard: polls /v1/dashboard every 2 s and renders four tables; the economy
// panel reads one project's plots every 30 s. Plain JS, no dependencies. The token lives in
// sessionStorage (this tab only); values from the server are inserted as text, never as HTML.
// The economy's plots are SVG the gateway draws itself (svg.py escapes every value): they are
// parsed as XML and imported as nodes, and the page's CSP runs no script they might hold.
"use strict";

(function () {
  const POLL_MS = 2000;
  const KEY = "visionloop.dashboard.token";
  const API = "v1/dashboard";
  const ECONOMY_MS = 30000;
  const $ = (selector) => document.querySelector(selector);
  let timer = null;
  let previous = {};
  let economyProject = null;
  let economyAt = 0;

  function takeTokenFromUrl() {
    const url = new URL(window.location.href);
    const token = url.searchParams.get("token");
    if (token) {
      sessionStorage.setItem(KEY, token);
      url.searchParams.delete("token");
      // Out of the address bar and the history, so it is not shared by copying the URL.
      window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
  }

  function cell(text, className) {
    const td = document.createElement("td");
    if (text instanceof Node) td.appendChild(text); else td.textContent = text === null || text === undefined ? "–" : String(text);
    if (className) td.className = className;
    return td;
  }

  function badge(text, kind) {
    const span = document.createElement("span");
    span.className = "badge " + String(kind || text).replace(/[^a-z0-9_-]+/gi, "-");
    span.textContent = text;
    return span;
  }

  function badges(items) {
    const frag = document.createDocumentFragment();
    for (const [text, kind] of items) frag.appendChild(badge(text, kind));
    return frag;
  }

  function num(value, digits) {
    if (value === null || value === undefined) return "–";
    return digits === undefined ? Number(value).toLocaleString("en-US") : Number(value).toFixed(digits);
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.round(seconds);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    const pad = (n) => String(n).padStart(2, "0");
    const day = d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate());
    const time = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
    return new Date().toDateString() === d.toDateString() ? time : day + " " + time.slice(0, 5);
  }

  function withBar(text, value, max) {
    const frag = document.createDocumentFragment();
    frag.appendChild(document.createTextNode(text));
    if (max > 0 && value > 0) {
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = Math.max(2, Math.round(60 * value / max)) + "px";
      frag.appendChild(bar);
    }
    return frag;
  }

  // Fill one panel's first table; `key` names a row so a changed number flashes.
  function fill(panelId, rows, key, cells) {
    const panel = document.getElementById(panelId);
    const body = panel.querySelector("table tbody");
    const fresh = document.createDocumentFragment();
    const seen = {};
    for (const row of rows) {
      const tr = document.createElement("tr");
      const id = panelId + ":" + key(row);
      tr.dataset.key = key(row);
      const tds = cells(row);
      tds.forEach((td, i) => {
        const before = previous[id] && previous[id][i];
        if (before !== undefined && before !== td.textContent) td.classList.add("changed");
        tr.appendChild(td);
      });
      seen[id] = tds.map((td) => td.textContent);
      fresh.appendChild(tr);
    }
    body.replaceChildren(fresh);
    Object.assign(previous, seen);
    panel.classList.toggle("has-rows", rows.length > 0);
  }

  function render(data) {
    const maxRate = Math.max(0, ...data.services.map((s) => s.handled_per_s || 0));
    fill("services", data.services, (s) => s.service + "/" + s.instance, (s) => [
      cell(s.service), cell(s.instance), cell(badge(s.state)), cell(duration(s.seen_s_ago) + " ago", "n"),
      cell(duration(s.uptime_s), "n"), cell(num(s.handled), "n"),
      cell(withBar(num(s.handled_per_s, 1), s.handled_per_s || 0, maxRate), "n"),
      cell(num(s.dead_lettered), "n"), cell(num(s.lag), "n"),
    ]);
    const lagBody = $("#lags tbody");
    lagBody.replaceChildren(...data.lags.map((g) => {
      const tr = document.createElement("tr");
      [cell(g.service), cell(g.group), cell(g.topic), cell(num(g.committed), "n"), cell(num(g.end), "n"), cell(num(g.lag), "n")]
        .forEach((td) => tr.appendChild(td));
      return tr;
    }));
    $("#lag-note").textContent = data.lag_error ? "(not read: " + data.lag_error + ")"
      : data.lag_read_at ? "(read " + when(data.lag_read_at) + ")" : "(reading…)";

    fill("queue", data.queue, (q) => q.project + "/" + q.kind, (q) => [
      cell(q.project), cell(badge(q.kind)), cell(num(q.verifying), "n"), cell(num(q.queued), "n"),
      cell(num(q.leased), "n"), cell(num(q.submitted), "n"), cell(num(q.total), "n"),
      cell(Object.entries(q.reasons || {}).map(([r, n]) => r + " " + n).join(", ") || "–"),
    ]);

    fill("models", data.models, (m) => m.model_id + "@" + m.version + "/" + m.target, (m) => [
      cell(m.model_id), cell(m.version, "n"), cell(m.target), cell(m.precision),
      cell(m.aliases.length ? badges(m.aliases.map((a) => [a, a])) : "–"),
      cell(num(m.map50_95, 3), "n"), cell(num(m.map50, 3), "n"), cell(when(m.registered_at)),
    ]);

    fill("releases", data.releases, (r) => r.release_id, (r) => {
      const states = Object.entries(r.devices).sort();
      return [
        cell(r.release_id), cell(r.fleet + " (" + r.kind + ")"), cell(r.model_id + " v" + r.model_version),
        cell(badge(r.status)), cell(r.stage_index + " · " + num(r.stage_percent, 0) + " %", "n"),
        cell(states.length ? badges(states.map(([state, n]) => [n + " " + state.replace("_", " "), state])) : "no reports"),
        cell(when(r.updated_at)),
      ];
    });
    setProjects(data.projects || []);
    $("#updated").textContent = "updated " + when(data.generated_at) + " · refreshes every " + POLL_MS / 1000 + " s";
  }

  // The project chooser of the economy panel; the plots are read again every ECONOMY_MS.
  function setProjects(projects) {
    const select = $("#economy-project");
    if ([...select.options].map((o) => o.value).join("\n") !== projects.join("\n")) {
      select.replaceChildren(...projects.map((p) => {
        const option = document.createElement("option");
        option.value = p;
        option.textContent = p;
        return option;
      }));
      if (projects.includes(economyProject)) select.value = economyProject;
    }
    $("#economy").classList.toggle("has-rows", projects.length > 0);
    if (projects.length && (select.value !== economyProject || Date.now() - economyAt > ECONOMY_MS)) loadEconomy(select.value);
  }

  async function loadEconomy(project) {
    economyProject = project;
    economyAt = Date.now();
    const note = $("#economy-note");
    try {
      const url = "v1/projects/" + encodeURIComponent(project) + "/economy/plots";
      const answer = await fetch(url, { headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY) }, cache: "no-store" });
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      const data = await answer.json();
      if (data.project !== economyProject) return;  // another project was chosen meanwhile
      const figures = [];
      for (const [name, text] of Object.entries(data.plots)) {
        const doc = new DOMParser().parseFromString(text, "image/svg+xml");
        if (doc.documentElement.nodeName !== "svg" || doc.querySelector("parsererror")) continue;
        const figure = document.createElement("figure");
        figure.dataset.plot = name;
        figure.appendChild(document.importNode(doc.documentElement, true));
        figures.push(figure);
      }
      $("#economy-plots").replaceChildren(...figures);
      note.textContent = "read " + when(data.generated_at) + " · hover a point for its numbers · refreshes every " + ECONOMY_MS / 1000 + " s";
    } catch (error) {
      note.textContent = "not read: " + error.message;
    }
  }

  function showLogin(message) {
    $("#panels").hidden = true;
    $("#forget").hidden = true;
    $("#login").hidden = false;
    $("#login-error").textContent = message || "";
    setLive("idle", "waiting for a token");
  }

  function setLive(state, text) {
    const live = $("#live");
    live.dataset.state = state;
    live.textContent = text;
  }

  async function poll() {
    clearTimeout(timer);
    const token = sessionStorage.getItem(KEY);
    if (!token) { showLogin(); return; }
    try {
      const answer = await fetch(API, { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
      if (answer.status === 401 || answer.status === 403) {
        const refusal = await answer.json().catch(() => ({}));
        sessionStorage.removeItem(KEY);
        showLogin(refusal.message || "the token was refused");
        return;
      }
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      const data = await answer.json();
      $("#login").hidden = true;
      $("#panels").hidden = false;
      $("#forget").hidden = false;
      render(data);
      setLive("ok", "live");
    } catch (error) {
      setLive("error", "not updating: " + error.message);
    }
    timer = setTimeout(poll, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    takeTokenFromUrl();
    $("#login").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("#token").value.trim();
      if (!token) return;
      sessionStorage.setItem(KEY, token);
      $("#token").value = "";
      poll();
    });
    $("#economy-project").addEventListener("change", (event) => loadEconomy(event.target.value));
    $("#forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      clearTimeout(timer);
      showLogin();
    });
    poll();
  });
})();
