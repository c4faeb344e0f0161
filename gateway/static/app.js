// The operator page: live events with a pattern filter, active streams, events/s, and a request form.
// Everything goes through nexus-client.js over the gateway's WebSocket. On load the page replays the last
// HISTORY events (/api/head says where the history stands; the subscription starts a little before it);
// /api/streams fills in what was running before the page opened, /api/handlers the handlers with their request
// examples (the form starts filled with one that succeeds), /api/metrics their rates and run times.
(function () {
  "use strict";

  const MAX_ROWS = 500;
  const HISTORY = 50; // events replayed on load
  const MAX_LOG_LINES = 200; // lines the request log keeps
  const RATE_WINDOW_S = 5;
  const SPARK_BARS = 30;
  const TERMINAL = new Set(["success", "failed", "timeout", "cancelled"]);
  const KNOWN_STATES = new Set(["requested", "started", "stream", "heartbeat", ...TERMINAL]);

  const $ = (id) => document.getElementById(id);
  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const stateOf = (type) => type.slice(type.lastIndexOf(":") + 1);
  const baseOf = (type) => type.slice(0, type.lastIndexOf(":"));
  const short = (id) => (id ? id.slice(0, 8) : "");
  const badge = (state) => el("span", "badge state-" + (KNOWN_STATES.has(state) ? state : "other"), state);
  const compact = (value) => {
    const text = JSON.stringify(value);
    return text.length > 240 ? text.slice(0, 240) + "…" : text;
  };
  const timeOf = (timestamp) => {
    const date = timestamp ? new Date(timestamp) : new Date();
    return date.toLocaleTimeString([], { hour12: false }) + "." + String(date.getMilliseconds()).padStart(3, "0");
  };
  const age = (seconds) => {
    if (seconds < 60) return seconds.toFixed(1) + "s";
    const m = Math.floor(seconds / 60);
    return m < 60 ? `${m}m ${Math.floor(seconds % 60)}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
  };

  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  // With authentication on, open the page as /?token=<JWT> (and &pattern=<yours> when the token may not read >):
  // the token is kept for this tab only and taken out of the address bar.
  const params = new URLSearchParams(location.search);
  const token = params.get("token") || sessionStorage.getItem("nexus-token") || undefined;
  if (params.has("token")) {
    if (token) sessionStorage.setItem("nexus-token", token);
    params.delete("token");
    history.replaceState(null, "", location.pathname + (params.size ? `?${params}` : "") + location.hash);
  }
  const api = (path) => fetch(path, { cache: "no-store", headers: token ? { Authorization: `Bearer ${token}` } : {} });
  let pattern = params.get("pattern") || ">";
  $("filter").value = pattern;
  const client = new NexusClient(`${scheme}//${location.host}/ws`, { patterns: [pattern], token });
  window.nexus = client; // handy from the devtools console

  // --- status -------------------------------------------------------------------------------------------

  client.on("status", ({ state, code, reason }) => {
    const status = $("status");
    if (state === "open") {
      status.dataset.state = "connected";
      $("status-text").textContent = "connected";
    } else if (state === "connecting") {
      status.dataset.state = "connecting";
      $("status-text").textContent = "connecting";
    } else {
      status.dataset.state = "offline";
      $("status-text").textContent = code === 1008 ? "refused" : "reconnecting";
      if (code === 1008) showNotice(`The server refused this connection: ${reason || "authentication"}.`);
      if (code === 4008) showNotice("The page fell behind the event rate; it reconnected and resumed where it was.");
    }
  });
  client.on("connection", (frame) => setEpoch(frame.epoch));
  let historyHead = 0; // events up to this offset were replayed on load, not received live
  let loadingHistory = false;
  client.on("gap", ({ epoch }) => {
    setEpoch(epoch);
    if (loadingHistory) return; // the history holds fewer events than asked for: nothing was missed
    showNotice("Some events could not be replayed after the reconnection (the server's history no longer " +
      "holds them); the table continues live.");
  });
  client.on("subscribed", () => { loadingHistory = false; });
  client.on("error", (frame) => showNotice(`${frame.code}: ${frame.message}`));

  function setEpoch(epoch) {
    $("epoch").textContent = "epoch " + (epoch || "–");
    $("epoch").title = epoch || "";
  }

  let noticeTimer = null;
  function showNotice(text) {
    const notice = $("notice");
    notice.textContent = text;
    notice.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { notice.hidden = true; }, 12000);
  }

  // --- events table and rate ----------------------------------------------------------------------------

  const tbody = $("events").querySelector("tbody");
  let total = 0;
  const arrivals = []; // arrival times (ms) inside the rate window
  const perSecond = new Array(SPARK_BARS).fill(0);
  let currentSecond = Math.floor(Date.now() / 1000);

  client.on("event", (event) => {
    const replayed = event.offset > 0 && event.offset <= historyHead;
    total += 1;
    if (!replayed) {
      arrivals.push(Date.now());
      perSecond[perSecond.length - 1] += 1;
    }
    trackStream(event);
    if (event.offset > 0) $("offset").textContent = String(event.offset);
    if (!$("pause").checked) addRow(event, replayed);
    scheduleRender();
  });

  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      flushRows();
      if (streamsChanged) renderStreams(); // counts and ages follow once a second (and the rate twice)
    });
  }

  function rowVisible(row) {
    const heartbeat = row.dataset.state === "heartbeat";
    return NexusClient.matchPattern(pattern, row.dataset.type) && (!heartbeat || $("show-heartbeats").checked);
  }

  function addRow(event, replayed) {
    const state = stateOf(event.type);
    const row = el("tr", replayed ? "replayed" : "fresh");
    row.dataset.type = event.type;
    row.dataset.state = state;
    row.dataset.offset = String(event.offset);
    const correlation = (event.metadata && event.metadata.correlation_id) || "";
    row.append(
      el("td", "time", timeOf(event.timestamp)),
      el("td", "offset", event.offset ? String(event.offset) : "–"),
      el("td", "type", baseOf(event.type)),
    );
    const stateCell = el("td", "state");
    stateCell.append(badge(state));
    const corrCell = el("td", "corr", short(correlation));
    corrCell.title = correlation;
    const payloadCell = el("td", "payload", compact(event.payload));
    payloadCell.title = JSON.stringify(event.payload, null, 2);
    row.append(stateCell, corrCell, payloadCell);
    row.hidden = !rowVisible(row);
    pendingRows.push(row);
    if (pendingRows.length > MAX_ROWS) pendingRows.shift();
  }

  // Rows are added once per animation frame, newest first, however many events arrived in between.
  const pendingRows = [];
  function flushRows() {
    if (!pendingRows.length) return;
    tbody.prepend(...pendingRows.splice(0).reverse());
    while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(tbody.rows.length - 1);
    $("events-empty").hidden = tbody.querySelector("tr:not([hidden])") !== null;
  }

  function refilter() {
    for (const row of tbody.rows) row.hidden = !rowVisible(row);
    $("empty-pattern").textContent = pattern;
    $("events-empty").hidden = tbody.querySelector("tr:not([hidden])") !== null;
  }

  $("filter-form").addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const input = $("filter");
    const next = input.value.trim() || ">";
    if (next === pattern) return;
    input.classList.remove("invalid");
    try {
      await client.subscribe([next]);
    } catch (err) {
      input.classList.add("invalid");
      showNotice(`Pattern refused: ${err.message}`);
      return;
    }
    const previous = pattern;
    pattern = next;
    if (previous !== next) client.unsubscribe([previous]).catch(() => {});
    refilter();
  });
  $("show-heartbeats").addEventListener("change", refilter);
  $("clear").addEventListener("click", () => {
    pendingRows.length = 0;
    tbody.replaceChildren();
    refilter();
  });

  function renderRate() {
    const now = Date.now();
    while (arrivals.length && arrivals[0] < now - RATE_WINDOW_S * 1000) arrivals.shift();
    const rate = arrivals.length / RATE_WINDOW_S;
    $("rate").textContent = rate >= 100 ? String(Math.round(rate)) : rate.toFixed(1);
    $("total").textContent = String(total);
    const second = Math.floor(now / 1000);
    while (currentSecond < second) {
      perSecond.shift();
      perSecond.push(0);
      currentSecond += 1;
    }
    const spark = $("spark");
    const peak = Math.max(1, ...perSecond);
    if (spark.children.length !== SPARK_BARS) {
      spark.replaceChildren(...perSecond.map(() => el("span")));
    }
    perSecond.forEach((count, i) => {
      spark.children[i].style.height = Math.round((count / peak) * 34) + "px";
    });
  }

  // --- active streams -----------------------------------------------------------------------------------

  const streams = new Map(); // correlation_id -> {type, count, startedAt (ms), state}
  let streamsChanged = false; // a stream started or ended since the table was drawn

  function trackStream(event) {
    const correlation = event.metadata && event.metadata.correlation_id;
    if (!correlation) return;
    const state = stateOf(event.type);
    let entry = streams.get(correlation);
    if (state === "started") {
      streams.set(correlation, { type: baseOf(event.type), count: 0, startedAt: Date.parse(event.timestamp) || Date.now() });
      streamsChanged = true;
      return;
    }
    if (!entry) {
      if (state !== "stream" && state !== "heartbeat") return;
      entry = { type: baseOf(event.type), count: 0, startedAt: Date.now() };
      streams.set(correlation, entry);
      streamsChanged = true;
    }
    if (state === "stream") entry.count += 1;
    else if (state === "heartbeat" && typeof event.payload.stream_count === "number") {
      entry.count = Math.max(entry.count, event.payload.stream_count);
    } else if (TERMINAL.has(state)) {
      streams.delete(correlation);
      streamsChanged = true;
    }
  }

  async function refreshStreams() {
    try {
      const response = await api("/api/streams");
      if (!response.ok) return;
      const live = await response.json();
      const seen = new Set();
      for (const info of live) {
        if (info.state === "requested") continue; // queued, not started yet
        seen.add(info.correlation_id);
        const entry = streams.get(info.correlation_id);
        const startedAt = Date.now() - (info.age_s || 0) * 1000;
        if (entry) entry.count = Math.max(entry.count, info.stream_count || 0);
        else streams.set(info.correlation_id, { type: baseOf(info.event_type), count: info.stream_count || 0, startedAt });
      }
      for (const [correlation, entry] of streams) {
        if (!seen.has(correlation) && Date.now() - entry.startedAt > 10000) streams.delete(correlation);
      }
    } catch (err) {
      // The listing is a convenience: the table keeps following events.
    }
  }

  function renderStreams() {
    streamsChanged = false;
    const body = $("streams").querySelector("tbody");
    const now = Date.now();
    const rows = [...streams.entries()]
      .sort((a, b) => a[1].startedAt - b[1].startedAt)
      .map(([correlation, entry]) => {
        const row = el("tr");
        row.dataset.correlation = correlation;
        const type = el("td", "type", entry.type);
        type.title = entry.type;
        const corr = el("td", "corr", short(correlation));
        corr.title = correlation;
        row.append(type, corr, el("td", "count", String(entry.count)), el("td", "age", age(Math.max(0, (now - entry.startedAt) / 1000))));
        return row;
      });
    body.replaceChildren(...rows);
    $("streams-empty").hidden = rows.length > 0;
    $("active-count").textContent = String(rows.length);
  }

  // --- handlers (/api/handlers: what the server drives; /api/metrics: how each did in the last minute) -------

  let handlerList = []; // /api/handlers, with request examples where declared
  const where = (handler) => {
    const location = handler.location || "in-process";
    return handler.workers ? `${location} · ${handler.workers} worker${handler.workers === 1 ? "" : "s"}` : location;
  };

  function ms(value) {
    return value >= 100 ? `${Math.round(value)} ms` : `${Number(value).toFixed(1)} ms`;
  }

  let metrics = null;
  async function refreshHandlers() {
    try {
      const response = await api("/api/metrics");
      if (response.ok) metrics = await response.json(); // else metrics off, or only for admins
    } catch (err) {
      // The view is a convenience: it tries again on the next tick.
    }
    renderHandlers();
  }

  function renderHandlers() {
    const stats = (metrics && metrics.handlers) || {};
    const active = (metrics && metrics.streams_by_handler) || {};
    const known = new Map(handlerList.map((handler) => [handler.name, handler]));
    const names = new Set([...known.keys(), ...Object.keys(stats), ...Object.keys(active)]);
    const rows = [...names].sort().map((name) => {
      const h = stats[name] || { requests_per_s: 0, failure_rate: 0, p50_ms: 0, p99_ms: 0 };
      const row = el("tr");
      row.dataset.handler = name;
      const cell = el("td", "type", name);
      const info = known.get(name);
      cell.title = info ? `${name}\n${info.event_type} (${info.streaming ? "streaming" : "plain"})` : name;
      const runs = el("td", "runs", info ? where(info) : "");
      runs.title = runs.textContent;
      const numbers = metrics
        ? [String(h.requests_per_s), `${Math.round(h.failure_rate * 100)}%`, ms(h.p50_ms), ms(h.p99_ms), String(active[name] || 0)]
        : ["–", "–", "–", "–", "–"];
      const classes = ["rate", "failed", "p50", "p99", "active"];
      row.append(cell, ...numbers.map((text, i) => el("td", classes[i], text)), runs);
      return row;
    });
    $("handlers").querySelector("tbody").replaceChildren(...rows);
    $("handlers-empty").hidden = rows.length > 0;
    $("slow-consumers").textContent = String((metrics && metrics.slow_consumer_disconnects) || 0);
  }

  // --- the request form ---------------------------------------------------------------------------------

  // The log shows the latest request's lifecycle only (earlier streams go on in Active streams), its last
  // MAX_LOG_LINES lines, in a box of bounded height that follows the newest line.
  const log = $("request-log");
  let current = null; // the request the Cancel button cancels, while it runs
  let logged = null; // the request the log shows

  function logLine(request, className, node) {
    if (request !== logged) return null;
    const item = el("li", className);
    item.append(...node);
    log.append(item);
    while (log.children.length > MAX_LOG_LINES) log.firstElementChild.remove();
    log.scrollTop = log.scrollHeight;
    return item;
  }

  function parsePayload() {
    const area = $("request-payload");
    const text = area.value.trim() || "{}";
    try {
      const value = JSON.parse(text);
      if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("the payload must be a JSON object");
      area.classList.remove("invalid");
      $("payload-error").textContent = "";
      return value;
    } catch (err) {
      area.classList.add("invalid");
      $("payload-error").textContent = err.message;
      return null;
    }
  }
  $("request-payload").addEventListener("input", parsePayload);

  $("request-form").addEventListener("submit", (submit) => {
    submit.preventDefault();
    const type = $("request-type").value.trim();
    const payload = parsePayload();
    if (!type || payload === null) return;
    log.replaceChildren();
    const request = client.request(type, payload, {
      onEvent: (event) => {
        const state = stateOf(event.type);
        if (state === "heartbeat" && !$("show-heartbeats").checked) return;
        const item = logLine(request, "", [badge(state), el("span", "detail", compact(event.payload))]);
        if (item) item.dataset.state = state;
      },
    });
    current = logged = request;
    $("request-cancel").disabled = false;
    logLine(request, "info", [el("span", "detail", `sending ${type} (event_id ${short(request.eventId)}…)`)]);
    request.published.then(
      (frame) => {
        const note = frame.duplicate ? " (a repeat: the original's lifecycle follows)" : "";
        logLine(request, "info", [el("span", "detail", `published at offset ${frame.offset}${note}`)]);
      },
      (err) => logLine(request, "error", [el("span", "detail", `${err.code || "error"}: ${err.message}`)]),
    );
    request.done.then(
      () => {},
      () => {},
    ).finally(() => {
      if (current === request) {
        current = null;
        $("request-cancel").disabled = true;
      }
    });
  });

  $("request-cancel").addEventListener("click", () => {
    if (current) current.cancel("cancelled from the page");
  });

  // A handler's request type: declared (takes), or its own type at v1 (any version) / its pinned version.
  function requestTypeOf(handler) {
    if (handler.takes && handler.takes.event_type) return handler.takes.event_type;
    const parts = String(handler.event_type).split(":");
    return parts.length === 3 ? `${handler.event_type}:requested` : `${handler.event_type}:v1:requested`;
  }
  const exampleText = (handler) => JSON.stringify((handler.takes && handler.takes.example) || {}, null, 2);
  let filledWith = null; // the payload text the form was last filled with (unchanged: the user has not typed)

  function payloadUntouched() {
    const text = $("request-payload").value.trim();
    return text === "" || text === "{}" || text === (filledWith || "").trim();
  }

  function chooseHandler(handler, { force = false } = {}) {
    $("request-handler").value = handler ? handler.name : "";
    if (!handler) return;
    $("request-type").value = requestTypeOf(handler);
    if (force || payloadUntouched()) {
      filledWith = exampleText(handler);
      $("request-payload").value = filledWith;
      parsePayload();
    }
  }

  $("request-handler").addEventListener("change", () => {
    const handler = handlerList.find((h) => h.name === $("request-handler").value);
    chooseHandler(handler, { force: true });
  });
  $("request-type").addEventListener("input", () => {
    // A type typed (or picked from the suggestions) that a handler serves selects that handler.
    const type = $("request-type").value.trim();
    const handler = handlerList.find((h) => requestTypeOf(h) === type);
    $("request-handler").value = handler ? handler.name : "";
    if (handler && payloadUntouched()) chooseHandler(handler);
  });

  async function loadHandlers() {
    try {
      const response = await api("/api/handlers");
      if (!response.ok) return;
      handlerList = await response.json();
    } catch (err) {
      return; // No suggestions: the field still takes any event type.
    }
    // Handlers with a declared example first: their first Send succeeds as it stands.
    const ordered = [...handlerList].sort((a, b) => Number(Boolean(b.takes)) - Number(Boolean(a.takes)) ||
      requestTypeOf(a).localeCompare(requestTypeOf(b)));
    $("handler-types").replaceChildren(...ordered.map((handler) => {
      const option = el("option");
      option.value = requestTypeOf(handler);
      option.label = handler.streaming ? "streaming" : "plain";
      return option;
    }));
    $("request-handler").replaceChildren(
      el("option", "", "any event type"),
      ...ordered.map((handler) => {
        const option = el("option", "", `${requestTypeOf(handler)} (${handler.streaming ? "streaming" : "plain"})`);
        option.value = handler.name;
        return option;
      }),
    );
    $("request-handler").firstChild.value = "";
    if (!$("request-type").value && ordered.length) chooseHandler(ordered[0]);
    renderHandlers();
  }

  // The AsyncAPI document needs the token too when authentication is on: fetched, then shown from memory.
  $("asyncapi-link").addEventListener("click", async (click) => {
    if (!token) return;
    click.preventDefault();
    const response = await api("/asyncapi.json");
    if (!response.ok) return showNotice(`The event catalogue could not be read (${response.status}).`);
    const url = URL.createObjectURL(new Blob([await response.text()], { type: "application/json" }));
    window.open(url, "_blank", "noopener");
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  });

  // Replay the last HISTORY events: subscribe a little before the head the server holds (same epoch).
  async function startFromHistory() {
    try {
      const response = await api("/api/head");
      if (response.ok) {
        const head = await response.json();
        historyHead = head.head_offset;
        loadingHistory = true;
        client.replayFrom(Math.max(0, head.head_offset - HISTORY), head.epoch);
      }
    } catch (err) {
      // Live only: the table fills as events arrive.
    }
    client.connect();
  }

  // --- start ----------------------------------------------------------------------------------------------

  startFromHistory();
  loadHandlers();
  refreshStreams();
  setInterval(renderRate, 500);
  setInterval(renderStreams, 1000);
  setInterval(refreshStreams, 5000);
  refreshHandlers();
  setInterval(refreshHandlers, 2000);
  renderRate();
  renderStreams();
})();
