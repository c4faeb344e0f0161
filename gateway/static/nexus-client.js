/**
 * nexus-client.js: a small browser client for the Nexus WebSocket gateway (protocol nexus.v1).
 *
 *   const nexus = new NexusClient("ws://127.0.0.1:8080/ws", { patterns: ["demo:>"] });
 *   nexus.on("event", (event) => console.log(event.type, event.payload));
 *   nexus.connect();
 *
 *   const req = nexus.request("demo:stream_countdown:v1:requested", { n: 3 }, {
 *     onEvent: (event) => console.log(event.type),        // started, stream..., heartbeat..., success
 *   });
 *   const terminal = await req.done;                        // the success/failed/timeout/cancelled event
 *   req.cancel();                                           // cancels the stream while it runs
 *
 * Reconnects by itself (backoff with jitter) and resumes: after a cut it subscribes again with the last
 * offset it received and its epoch, so every matching event it missed arrives once, in order (a client cut off
 * before any event arrived resumes after the head it went live at). When the
 * server cannot replay the gap (another epoch, or history no longer holds it) it says `recovered: false`:
 * the client emits "gap" and continues live from the head. Requests still running when the connection
 * dropped are sent again with the same event_id once reconnected: the server recognises the repeat and
 * replays that request's lifecycle (usually ending in `cancelled`, reason "requester disconnected", since a
 * closed socket cancels its streams), so `done` always settles.
 *
 * Events: "status" ({state: "connecting"|"open"|"closed", code?, reason?, attempt?}), "connection" (the
 * server's first frame), "subscribed", "event" (every event frame, once), "gap" ({head_offset, epoch}),
 * "error" (error frames not tied to a call of yours). Works in browsers and in any runtime with a WebSocket.
 */
(function (root) {
  "use strict";

  const SUBPROTOCOL = "nexus.v1";
  const TERMINAL = new Set(["success", "failed", "timeout", "cancelled"]);
  const NO_RETRY_CODES = new Set([1008]); // authentication refused: retrying will not help

  function randomId() {
    const bytes = new Uint8Array(16);
    (root.crypto || globalThis.crypto).getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  /** `metadata` with `traceparent` added (when given), or undefined when there is nothing to send. */
  function withTrace(metadata, traceparent) {
    if (!traceparent) return metadata;
    return Object.assign({}, metadata || {}, { traceparent });
  }

  function stateOf(type) {
    const i = type.lastIndexOf(":");
    return i < 0 ? type : type.slice(i + 1);
  }

  /**
   * Whether an event type matches a pattern: `*` matches one token, a final `>` the rest (one or more).
   */
  function matchPattern(pattern, type) {
    const p = pattern.split(":");
    const t = type.split(":");
    for (let i = 0; i < p.length; i++) {
      if (p[i] === ">") return t.length > i;
      if (i >= t.length) return false;
      if (p[i] !== "*" && p[i] !== t[i]) return false;
    }
    return p.length === t.length;
  }

  class NexusError extends Error {
    constructor(frame) {
      super(frame.message || frame.code);
      this.name = "NexusError";
      this.code = frame.code;
      this.ref = frame.ref;
    }
  }

  class NexusClient {
    /**
     * @param {string} url ws:// or wss:// URL of the gateway's /ws endpoint.
     * @param {object} [options]
     * @param {string[]} [options.patterns] patterns to follow from the first connection on.
     * @param {string} [options.token] sent as a Sec-WebSocket-Protocol entry next to nexus.v1.
     * @param {number} [options.sinceOffset] resume from this offset on the first connection (with options.epoch).
     * @param {string} [options.epoch]
     * @param {boolean} [options.reconnect=true]
     * @param {number} [options.minDelay=250] first reconnection delay (ms); doubles up to maxDelay.
     * @param {number} [options.maxDelay=5000]
     * @param {number} [options.pingInterval=20000] app-level ping period (ms); a silent connection is dropped.
     * @param {function} [options.WebSocket] a WebSocket constructor (default: the global one).
     */
    constructor(url, options = {}) {
      this.url = url;
      this.options = Object.assign(
        { reconnect: true, minDelay: 250, maxDelay: 5000, pingInterval: 20000 },
        options,
      );
      this.patterns = new Set(options.patterns || []);
      this.lastOffset = options.sinceOffset || 0;
      this.epoch = options.epoch || "";
      this._replay = false; // the next subscription replays from lastOffset even when it is 0 (replayFrom)
      this._positioned = false; // lastOffset + epoch name a place in a history, even at offset 0
      this._liveStart = null; // the ref of a live first subscription whose answer positions the client
      this.recovered = null;
      this.connectionId = null;
      this.state = "closed";
      this.ws = null;
      this._listeners = new Map();
      this._pending = new Map(); // ref -> {resolve, reject, frame}
      this._requests = new Map(); // event_id -> request record
      this._queue = []; // frames waiting for a connection
      this._attempt = 0;
      this._timer = null;
      this._pinger = null;
      this._lastHeard = 0;
      this._closedByUser = false;
    }

    /** Listen: "status", "connection", "subscribed", "event", "gap", "error". Returns an unsubscribe function. */
    on(name, fn) {
      if (!this._listeners.has(name)) this._listeners.set(name, new Set());
      this._listeners.get(name).add(fn);
      return () => this._listeners.get(name).delete(fn);
    }

    _emit(name, value) {
      for (const fn of this._listeners.get(name) || []) {
        try {
          fn(value);
        } catch (err) {
          setTimeout(() => { throw err; });
        }
      }
    }

    _status(state, extra = {}) {
      this.state = state;
      this._emit("status", Object.assign({ state }, extra));
    }

    /**
     * Before connect(): make the first subscription replay every matching event stored after `offset` of `epoch`
     * (0: all the server's history holds), then go on live. A page shows recent history this way:
     * `nexus.replayFrom(Math.max(0, head - 50), epoch)` with the head and epoch from the gateway's /api/head.
     * When the history no longer holds the start, the client emits "gap" and goes on live.
     */
    replayFrom(offset, epoch) {
      this.lastOffset = Math.max(0, offset);
      this.epoch = epoch || this.epoch;
      this._replay = true;
    }

    /** Open the connection (and keep it open until close()). */
    connect() {
      this._closedByUser = false;
      if (this.ws && (this.ws.readyState === 0 || this.ws.readyState === 1)) return;
      const Socket = this.options.WebSocket || root.WebSocket;
      const protocols = this.options.token ? [SUBPROTOCOL, this.options.token] : [SUBPROTOCOL];
      this._status("connecting", { attempt: this._attempt });
      const ws = new Socket(this.url, protocols);
      this.ws = ws;
      ws.onopen = () => {
        this._attempt = 0;
        this._lastHeard = Date.now();
        this._startPinging();
        this._status("open");
        this._resume();
      };
      ws.onmessage = (message) => {
        this._lastHeard = Date.now();
        let frame;
        try {
          frame = JSON.parse(message.data);
        } catch (err) {
          return;
        }
        this._receive(frame);
      };
      ws.onclose = (event) => {
        if (this.ws !== ws) return;
        this.ws = null;
        this._stopPinging();
        this._failPending(new NexusError({ code: "disconnected", message: `connection closed (${event.code})` }));
        this._status("closed", { code: event.code, reason: event.reason });
        if (this._closedByUser || !this.options.reconnect || NO_RETRY_CODES.has(event.code)) return;
        this._scheduleReconnect(event.code === 4008 ? 0 : undefined);
      };
      ws.onerror = () => {}; // a close event always follows
    }

    /** Close for good (no reconnection). */
    close(code = 1000, reason = "") {
      this._closedByUser = true;
      clearTimeout(this._timer);
      this._stopPinging();
      if (this.ws) this.ws.close(code, reason);
    }

    _scheduleReconnect(delay) {
      const { minDelay, maxDelay } = this.options;
      const base = Math.min(maxDelay, minDelay * 2 ** this._attempt);
      const wait = delay === undefined ? base * (0.5 + Math.random() * 0.5) : delay;
      this._attempt += 1;
      clearTimeout(this._timer);
      this._timer = setTimeout(() => this.connect(), wait);
    }

    _startPinging() {
      const every = this.options.pingInterval;
      if (!every) return;
      this._pinger = setInterval(() => {
        if (Date.now() - this._lastHeard > 2 * every) {
          if (this.ws) this.ws.close(4000, "no answer from the server");
          return;
        }
        this._send({ type: "ping" });
      }, every);
    }

    _stopPinging() {
      clearInterval(this._pinger);
      this._pinger = null;
    }

    _send(frame) {
      if (this.ws && this.ws.readyState === 1) {
        this.ws.send(JSON.stringify(frame));
        return true;
      }
      return false;
    }

    _call(frame, ref) {
      return new Promise((resolve, reject) => {
        this._pending.set(ref, { resolve, reject, frame });
        if (!this._send(frame)) this._queue.push(frame);
      });
    }

    _failPending(error) {
      // Calls sent on the lost connection: publishes of requests are sent again on reconnection (see _resume);
      // everything else fails.
      for (const [ref, call] of this._pending) {
        if (this._requests.has(ref)) continue;
        this._pending.delete(ref);
        call.reject(error);
      }
    }

    /** On (re)connection: subscribe (resuming), then repeat the requests whose lifecycle did not end. */
    _resume() {
      if (this.patterns.size) {
        const frame = { type: "subscribe", event_types: [...this.patterns], ref: "resume-" + randomId() };
        if (this.lastOffset > 0 || this._replay || this._positioned) {
          frame.since_offset = this.lastOffset;
          if (this.epoch) frame.epoch = this.epoch;
        } else {
          // A live start: its answer's head_offset is where a reconnection resumes from, even if nothing arrives.
          this._liveStart = frame.ref;
        }
        this._send(frame);
      }
      for (const request of this._requests.values()) {
        if (!request.terminal) this._send(request.frame);
      }
      const queued = this._queue;
      this._queue = [];
      for (const frame of queued) {
        if (!(frame.event_id && this._requests.has(frame.event_id))) this._send(frame);
      }
    }

    _receive(frame) {
      switch (frame.type) {
        case "connection":
          this.connectionId = frame.connection_id;
          if (!this.epoch) this.epoch = frame.epoch;
          this._emit("connection", frame);
          return;
        case "subscribed":
          if (frame.ref && frame.ref === this._liveStart) {
            // Live after head_offset of this epoch: cut off before anything arrived, the client still resumes
            // from there (since_offset 0 with the epoch, on an empty history) instead of going live again.
            this._liveStart = null;
            if (frame.head_offset > this.lastOffset) this.lastOffset = frame.head_offset;
            this.epoch = frame.epoch;
            this._positioned = true;
          }
          if (frame.recovered === false) {
            // The gap cannot be replayed: continue live from the head, and say so.
            this.lastOffset = Math.max(frame.head_offset, 0);
            this.epoch = frame.epoch;
            this._emit("gap", { head_offset: frame.head_offset, epoch: frame.epoch });
          } else if (!this.epoch) {
            this.epoch = frame.epoch;
          }
          if (frame.recovered !== undefined) {
            this.recovered = frame.recovered;
            this._positioned = true;
          }
          this._replay = false;
          this._settle(frame.ref, frame);
          this._emit("subscribed", frame);
          return;
        case "unsubscribed":
        case "pong":
          this._settle(frame.ref, frame);
          return;
        case "published":
          this._settle(frame.event_id, frame);
          return;
        case "error":
          if (frame.ref && this._pending.has(frame.ref)) {
            const call = this._pending.get(frame.ref);
            this._pending.delete(frame.ref);
            const request = this._requests.get(frame.ref);
            if (request) this._finishRequest(request, null, new NexusError(frame));
            call.reject(new NexusError(frame));
          } else {
            this._emit("error", frame);
          }
          return;
        default:
          this._event(frame);
      }
    }

    _settle(ref, frame) {
      if (!ref) return;
      const call = this._pending.get(ref);
      if (call) {
        this._pending.delete(ref);
        call.resolve(frame);
      }
    }

    _event(event) {
      const correlation = event.metadata && event.metadata.correlation_id;
      const request = correlation ? this._requests.get(correlation) : undefined;
      if (event.offset > 0 && event.epoch && this.epoch && event.epoch !== this.epoch) {
        this.epoch = event.epoch; // a new history: offsets restart
        this.lastOffset = 0;
      }
      const fresh = !(event.offset > 0 && event.offset <= this.lastOffset);
      if (event.offset > this.lastOffset) this.lastOffset = event.offset;
      if (request) {
        // A request's own lifecycle: delivered once to it, even when replayed after a reconnection.
        if (event.offset > 0 && event.offset <= request.lastOffset) return;
        if (event.offset > 0) request.lastOffset = event.offset;
        if (request.onEvent) request.onEvent(event);
        if (TERMINAL.has(stateOf(event.type))) {
          this._finishRequest(request, event, null);
        }
      }
      if (fresh) this._emit("event", event);
    }

    _finishRequest(request, terminal, error) {
      request.terminal = terminal || true;
      this._requests.delete(request.eventId);
      if (error) request.reject(error);
      else request.resolve(terminal);
    }

    /** Follow more patterns (answered by a "subscribed" frame). */
    subscribe(patterns) {
      const list = [].concat(patterns);
      list.forEach((p) => this.patterns.add(p));
      const ref = "sub-" + randomId();
      return this._call({ type: "subscribe", event_types: list, ref }, ref);
    }

    /** Stop following patterns. */
    unsubscribe(patterns) {
      const list = [].concat(patterns);
      list.forEach((p) => this.patterns.delete(p));
      const ref = "unsub-" + randomId();
      return this._call({ type: "unsubscribe", event_types: list, ref }, ref);
    }

    /**
     * Publish any event; resolves with the "published" frame ({event_id, offset, duplicate}).
     * `traceparent` (a W3C trace context header, e.g. from the page's own tracer) joins the event to that trace.
     */
    publish(type, payload = {}, { eventId, metadata, traceparent } = {}) {
      const id = eventId || randomId();
      const frame = { type, event_id: id, payload };
      const meta = withTrace(metadata, traceparent);
      if (meta) frame.metadata = meta;
      return this._call(frame, id);
    }

    /**
     * Send a request (a `...:requested` event) and follow its lifecycle. With `traceparent`, the server's spans
     * (and the `traceparent` of the lifecycle events) continue that trace.
     * Returns {eventId, published: Promise<frame>, done: Promise<terminal event>, cancel(reason?)}.
     */
    request(type, payload = {}, { eventId, metadata, traceparent, onEvent } = {}) {
      const id = eventId || randomId();
      const frame = { type, event_id: id, payload };
      const meta = withTrace(metadata, traceparent);
      if (meta) frame.metadata = meta;
      const record = { eventId: id, frame, onEvent, lastOffset: 0, terminal: null };
      const done = new Promise((resolve, reject) => {
        record.resolve = resolve;
        record.reject = reject;
      });
      this._requests.set(id, record);
      const published = this._call(frame, id);
      published.catch(() => {});
      done.catch(() => {});
      return {
        eventId: id,
        published,
        done,
        cancel: (reason) => this.cancel(id, reason),
      };
    }

    /** Cancel a stream this connection started. */
    cancel(correlationId, reason) {
      const frame = { type: "cancel", correlation_id: correlationId, ref: "cancel-" + randomId() };
      if (reason) frame.reason = reason;
      return this._send(frame);
    }

    /** App-level ping; resolves with the pong. */
    ping() {
      const ref = "ping-" + randomId();
      return this._call({ type: "ping", ref }, ref);
    }
  }

  NexusClient.matchPattern = matchPattern;
  NexusClient.NexusError = NexusError;
  root.NexusClient = NexusClient;
  if (typeof module !== "undefined" && module.exports) module.exports = NexusClient;
})(typeof window !== "undefined" ? window : globalThis);
