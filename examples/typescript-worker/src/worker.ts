// A Nexus worker library for Node, built from protos/ alone: it connects to a server over
// nexus.v1.WorkerService/HandleEvents, registers its handlers and answers the requests the server gives it
// (docs/workers.md). One Worker keeps one call open for as long as it runs and opens a new one, after a
// jittered backoff, whenever the server goes away.
//
//   const worker = new Worker({ server: "127.0.0.1:50051", handlers: [myHandler] });
//   process.on("SIGTERM", () => void worker.stop());
//   await worker.run();    // resolves once stopped; rejects with RegistrationRefused
//
// What the worker sends for each request:
//
//   request ─▶ started ─▶ chunk* ─▶ result           (the handler returned)
//                                └▶ error            (it threw: HandlerError's type, else "handler_error")
//   cancel  ─▶ (the handler's signal aborts) ─▶ cancelled, once the handler has settled
//   stop()  ─▶ drain, the running requests finish (a grace period at most), then the call is closed
//
// A stream's chunks never exceed its credit: StreamSender.send waits for `credit` messages. A request whose
// call is lost (or that the server refused) gets nothing more on any call: the server ends it `worker_lost`.

import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
export type JsonObject = { [key: string]: JsonValue };

/** The `requested` event a handler runs for. */
export interface RequestEvent {
  readonly eventId: string;
  readonly eventType: string;
  readonly payload: JsonObject;
  readonly metadata: Readonly<Record<string, string>>;
  readonly offset: string;
  readonly epoch: string;
}

/** What a handler gets besides the event. */
export interface RequestContext {
  readonly event: RequestEvent;
  /** Aborted when the server cancels the request (its reason is `signal.reason`), the call is lost or the
   * worker stops; a handler that waits should give up then. */
  readonly signal: AbortSignal;
  /** Seconds the request may run once started, as the server counts; 0 when it has no limit. */
  readonly timeoutS: number;
  log(event: string, fields?: Record<string, unknown>): void;
}

/** A streaming handler's way out: chunks in order, within the stream's credit. */
export interface StreamSender {
  /** Sends one chunk (a JSON object), waiting for credit first; rejects with Cancelled once the request was
   * cancelled or its call lost. */
  send(chunk: JsonObject): Promise<void>;
}

interface HandlerDeclaration {
  /** `service:action` (every version) or `service:action:vN`. */
  readonly eventType: string;
  /** A name for the server's logs and listings. */
  readonly name?: string;
  /** A payload field: requests with the same value run one at a time, in offset order. */
  readonly orderingKey?: string;
  /** Seconds a request may run once started: 0 (or absent) for the server's default, negative for no limit. */
  readonly streamTimeoutS?: number;
  /** The stream's chunk credit: 0 (or absent) for the server's default. */
  readonly bufferSize?: number;
  /** Requests this worker runs at once for this handler: 0 (or absent) for 1. */
  readonly maxInFlight?: number;
}

export interface PlainHandler extends HandlerDeclaration {
  readonly streaming?: false;
  /** The result payload (`success`); throw to fail the request. */
  handle(ctx: RequestContext): Promise<JsonObject | undefined> | JsonObject | undefined;
}

export interface StreamingHandler extends HandlerDeclaration {
  readonly streaming: true;
  /** Send chunks through `stream`; returning ends the request with `success`, throwing with `failed`. */
  handleStream(ctx: RequestContext, stream: StreamSender): Promise<void>;
}

export type Handler = PlainHandler | StreamingHandler;

/** Thrown by a handler to fail a request with a given error type. */
export class HandlerError extends Error {
  constructor(
    message: string,
    readonly type: "handler_error" | "invalid_payload" = "handler_error",
  ) {
    super(message);
    this.name = "HandlerError";
  }
}

/** What StreamSender.send rejects with once its request is over for this worker. */
export class Cancelled extends Error {
  constructor(readonly reason: string) {
    super(`cancelled: ${reason}`);
    this.name = "Cancelled";
  }
}

/** The server refused the registration (a bad declaration, a token that may not serve a type, a type served
 * otherwise): retrying would not help. */
export class RegistrationRefused extends Error {
  constructor(
    readonly code: grpc.status,
    readonly details: string,
  ) {
    super(`${grpc.status[code] ?? code}: ${details}`);
    this.name = "RegistrationRefused";
  }
}

export type Logger = (level: "info" | "warning" | "error", event: string, fields: Record<string, unknown>) => void;

/** One JSON object per line on stderr. */
export const jsonLogger: Logger = (level, event, fields) => {
  process.stderr.write(JSON.stringify({ timestamp: new Date().toISOString(), level, event, ...fields }) + "\n");
};

export interface BackoffPolicy {
  /** Seconds before the first retry after a failure. */
  readonly initialDelayS: number;
  /** The longest wait between two attempts. */
  readonly maxDelayS: number;
  /** Each consecutive failure multiplies the delay by this. */
  readonly multiplier: number;
  /** Each delay is shortened by a random share of at most this fraction of itself. */
  readonly jitter: number;
}

export const DEFAULT_BACKOFF: BackoffPolicy = { initialDelayS: 0.1, maxDelayS: 10, multiplier: 2, jitter: 0.2 };

/** Reconnect delays: jittered, growing per consecutive failure, reset once a call proved healthy. */
export class Backoff {
  private failures = 0;

  constructor(
    private readonly policy: BackoffPolicy = DEFAULT_BACKOFF,
    private readonly random: () => number = Math.random,
  ) {
    const { initialDelayS, maxDelayS, multiplier, jitter } = policy;
    if (!(initialDelayS >= 0 && maxDelayS >= initialDelayS && Number.isFinite(maxDelayS))) {
      throw new RangeError(`backoff delays must satisfy 0 <= initial (${initialDelayS}) <= max (${maxDelayS})`);
    }
    if (!(multiplier >= 1 && Number.isFinite(multiplier)) || !(jitter >= 0 && jitter <= 1)) {
      throw new RangeError(`backoff multiplier must be >= 1 and jitter in [0, 1], got ${multiplier}, ${jitter}`);
    }
  }

  /** Seconds to wait before the next attempt, after a failed one. */
  next(): number {
    const { initialDelayS, maxDelayS, multiplier, jitter } = this.policy;
    const delay = Math.min(maxDelayS, initialDelayS * multiplier ** this.failures);
    this.failures += 1;
    return delay * (1 - this.random() * jitter);
  }

  /** The call proved healthy: the next failure waits the initial delay again. */
  reset(): void {
    this.failures = 0;
  }
}

export interface WorkerOptions {
  /** host:port of a Nexus server. */
  readonly server: string;
  readonly handlers: readonly Handler[];
  /** Sent as `authorization: Bearer <token>` when the server requires authentication. */
  readonly token?: string;
  /** Connect over TLS (verified against the system's roots, or `caFile`). */
  readonly tls?: boolean;
  /** PEM CA certificates to verify the server with (implies TLS). */
  readonly caFile?: string;
  /** A name for the server's logs and listings (default host:pid). */
  readonly workerName?: string;
  /** The directory holding nexus/v1/nexus.proto (default: the repository's protos/). */
  readonly protosDir?: string;
  readonly backoff?: BackoffPolicy;
  /** Seconds stop() lets running requests finish before it lets go of them (default 10). */
  readonly stopGraceS?: number;
  /** Seconds to wait for `registered` before the call counts as failed (default 10). */
  readonly registerTimeoutS?: number;
  readonly log?: Logger;
}

// --- the protocol's messages as @grpc/proto-loader gives them (keepCase, oneofs, longs as strings) ---------

interface EventMessage {
  event_type: string;
  event_id: string;
  metadata: Record<string, string>;
  offset: string;
  epoch: string;
  payload_json: Buffer;
}

interface ServerMessage {
  body?: "registered" | "request" | "cancel" | "credit" | "ping" | "refused";
  registered?: { worker_id: string; ping_interval_s: number; worker_timeout_s: number };
  request?: { event: EventMessage | null; credit: number; timeout_s: number };
  cancel?: { correlation_id: string; reason: string };
  credit?: { correlation_id: string; chunks: number };
  ping?: { nonce: string };
  refused?: { correlation_id: string; code: string; message: string };
}

type WorkerMessage =
  | {
      register: {
        worker_name: string;
        handlers: {
          event_type: string;
          streaming: boolean;
          ordering_key: string;
          stream_timeout_s: number;
          buffer_size: number;
          max_in_flight: number;
          name: string;
        }[];
      };
    }
  | { started: { correlation_id: string } }
  | { chunk: { correlation_id: string; payloads_json: Buffer[] } }
  | { result: { correlation_id: string; payload_json: Buffer } }
  | { error: { correlation_id: string; type: string; message: string } }
  | { cancelled: { correlation_id: string } }
  | { pong: { nonce: string } }
  | { drain: Record<string, never> };

type Call = grpc.ClientDuplexStream<WorkerMessage, ServerMessage>;

/** Refusals of the registration that no retry can change. */
const FATAL_CODES = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.PERMISSION_DENIED,
  grpc.status.UNAUTHENTICATED,
  grpc.status.ALREADY_EXISTS,
  grpc.status.UNIMPLEMENTED,
]);

const DEFAULT_PROTOS_DIR = path.resolve(__dirname, "..", "..", "..", "protos");
const EVENT_TYPE = /^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*(:v[1-9][0-9]*)?$/;

function loadWorkerService(protosDir: string): grpc.ServiceClientConstructor {
  if (!fs.existsSync(path.join(protosDir, "nexus", "v1", "nexus.proto"))) {
    throw new Error(`no nexus/v1/nexus.proto under ${protosDir}: point protosDir at the repository's protos/`);
  }
  const definition = protoLoader.loadSync("nexus/v1/nexus.proto", {
    includeDirs: [protosDir],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const nexus = grpc.loadPackageDefinition(definition)["nexus"] as grpc.GrpcObject;
  const v1 = nexus["v1"] as grpc.GrpcObject;
  return v1["WorkerService"] as grpc.ServiceClientConstructor;
}

function channelCredentials(options: WorkerOptions): grpc.ChannelCredentials {
  if (options.caFile !== undefined) return grpc.credentials.createSsl(fs.readFileSync(options.caFile));
  if (options.tls) return grpc.credentials.createSsl();
  return grpc.credentials.createInsecure();
}

function isJsonObject(value: unknown): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Checks the declarations a worker would send, so a mistake is reported before any connection. */
export function checkHandlers(handlers: readonly Handler[]): void {
  if (handlers.length === 0) throw new RangeError("a worker needs at least one handler");
  const seen = new Set<string>();
  for (const handler of handlers) {
    const where = `handler ${JSON.stringify(handler.eventType)}`;
    if (!EVENT_TYPE.test(handler.eventType)) {
      throw new RangeError(`${where}: eventType must be service:action or service:action:vN (lowercase)`);
    }
    if (seen.has(handler.eventType)) throw new RangeError(`${where} is declared twice`);
    seen.add(handler.eventType);
    for (const field of ["bufferSize", "maxInFlight"] as const) {
      const value = handler[field];
      if (value !== undefined && !(Number.isInteger(value) && value >= 0 && value <= 0xffffffff)) {
        throw new RangeError(`${where}: ${field} must be a whole number >= 0, got ${value}`);
      }
    }
    if (handler.streamTimeoutS !== undefined && !Number.isFinite(handler.streamTimeoutS)) {
      throw new RangeError(`${where}: streamTimeoutS must be a finite number of seconds`);
    }
  }
}

/** The handler serving a `requested` event type: a versioned declaration before an unversioned one. */
function handlerFor(handlers: readonly Handler[], eventType: string): Handler | undefined {
  const [service, action, version] = eventType.split(":");
  const versioned = `${service}:${action}:${version}`;
  const unversioned = `${service}:${action}`;
  return handlers.find((h) => h.eventType === versioned) ?? handlers.find((h) => h.eventType === unversioned);
}

/** One request this worker runs. */
class Running {
  readonly controller = new AbortController();
  /** The server cancelled it: answer `cancelled` once the handler settled. */
  cancelReason: string | undefined;
  /** Nothing more may be sent for it (its call is gone, or the server refused it). */
  gone = false;
  private credit: number;
  private wakeUps: (() => void)[] = [];
  private tail: Promise<void> = Promise.resolve();

  constructor(
    readonly id: string,
    credit: number,
    private readonly write: (message: WorkerMessage) => Promise<void>,
  ) {
    this.credit = credit;
    this.controller.signal.addEventListener("abort", () => this.wake());
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  addCredit(chunks: number): void {
    this.credit += chunks;
    this.wake();
  }

  abort(reason: string): void {
    if (!this.controller.signal.aborted) this.controller.abort(new Cancelled(reason));
  }

  /** Chunks leave in the order send() was called, each once credit allows it. */
  send(chunk: JsonObject): Promise<void> {
    const sent = this.tail.then(() => this.sendNow(chunk));
    this.tail = sent.catch(() => undefined);
    return sent;
  }

  private async sendNow(chunk: JsonObject): Promise<void> {
    if (!isJsonObject(chunk)) throw new TypeError(`a chunk must be a JSON object, got ${JSON.stringify(chunk)}`);
    const data = Buffer.from(JSON.stringify(chunk));
    while (this.credit <= 0 && !this.signal.aborted) {
      await new Promise<void>((resolve) => this.wakeUps.push(resolve));
    }
    this.signal.throwIfAborted();
    this.credit -= 1;
    await this.write({ chunk: { correlation_id: this.id, payloads_json: [data] } });
  }

  private wake(): void {
    const wakeUps = this.wakeUps;
    this.wakeUps = [];
    for (const wake of wakeUps) wake();
  }
}

/** One HandleEvents call: from `register` to the end of the call. */
class Connection {
  readonly running = new Map<string, Running>();
  /** Requests given while stopping: never started, so the server gives them to another worker. */
  readonly left = new Set<string>();
  registered = false;
  /** The server sent something after `registered`: the call is healthy. */
  proven = false;
  closed = false;
  private lastHeard = Date.now();
  private silenceLimitMs: number;
  private readonly watchdog: NodeJS.Timeout;

  constructor(
    readonly call: Call,
    registerTimeoutS: number,
    private readonly onSilent: () => void,
  ) {
    this.silenceLimitMs = registerTimeoutS * 1000;
    this.watchdog = setInterval(() => {
      if (Date.now() - this.lastHeard <= this.silenceLimitMs) return;
      clearInterval(this.watchdog);
      this.onSilent();
    }, 100);
    this.watchdog.unref();
  }

  heard(): void {
    this.lastHeard = Date.now();
  }

  accepted(pingIntervalS: number, workerTimeoutS: number): void {
    this.registered = true;
    // The server pings every ping interval: silence well past that means the call is dead.
    this.silenceLimitMs = Math.max(workerTimeoutS, 3 * pingIntervalS, 1) * 1000;
  }

  /** Writes one message; resolves once the call can take more (at once when it is over: nothing is sent). */
  write(message: WorkerMessage): Promise<void> {
    if (this.closed) return Promise.resolve();
    return new Promise((resolve) => {
      if (this.call.write(message)) {
        resolve();
        return;
      }
      const done = (): void => {
        this.call.off("drain", done);
        this.call.off("status", done);
        resolve();
      };
      this.call.on("drain", done);
      this.call.on("status", done);
    });
  }

  /** No more writes: the call ended or is being ended. */
  close(): void {
    this.closed = true;
    clearInterval(this.watchdog);
  }
}

/** A worker: serves `handlers` for the server at `server` until stop(). */
export class Worker {
  private readonly method: grpc.MethodDefinition<WorkerMessage, ServerMessage>;
  private readonly credentials: grpc.ChannelCredentials;
  private readonly backoff: Backoff;
  private readonly log: Logger;
  private readonly workerName: string;
  private client: grpc.Client | undefined;
  private connection: Connection | undefined;
  private stopping = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private settle: { resolve: () => void; reject: (error: Error) => void } | undefined;
  private drained: (() => void) | undefined;
  private stopped: Promise<void> | undefined;

  constructor(private readonly options: WorkerOptions) {
    checkHandlers(options.handlers);
    const grace = options.stopGraceS ?? 10;
    if (!(grace >= 0 && Number.isFinite(grace))) throw new RangeError(`stopGraceS must be >= 0, got ${grace}`);
    const method = loadWorkerService(options.protosDir ?? DEFAULT_PROTOS_DIR).service["HandleEvents"];
    if (method === undefined) throw new Error("nexus.proto has no WorkerService.HandleEvents");
    this.method = method;
    this.credentials = channelCredentials(options);
    this.backoff = new Backoff(options.backoff ?? DEFAULT_BACKOFF);
    this.log = options.log ?? jsonLogger;
    this.workerName = options.workerName ?? `${os.hostname()}:${process.pid}`;
  }

  /** Connects and serves until stop(); rejects with RegistrationRefused when the server refuses the handlers. */
  run(): Promise<void> {
    if (this.settle !== undefined) throw new Error("a worker runs once");
    return new Promise<void>((resolve, reject) => {
      this.settle = { resolve, reject };
      const backoff = this.options.backoff ?? DEFAULT_BACKOFF;
      this.client = new grpc.Client(this.options.server, this.credentials, {
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.max_receive_message_length": -1,
        // The channel's own reconnection backoff (1 s to 120 s by default) within the worker's, so a server
        // that comes back is found by the next attempt.
        "grpc.initial_reconnect_backoff_ms": Math.max(1, Math.round(backoff.initialDelayS * 1000)),
        "grpc.max_reconnect_backoff_ms": Math.max(1, Math.round(backoff.maxDelayS * 1000)),
      });
      this.connect();
    });
  }

  /** Sends `drain` (no more requests), lets the running ones finish for up to `graceS` seconds, then ends the
   * call (requests still running then end `worker_lost` on the server). */
  stop(graceS: number = this.options.stopGraceS ?? 10): Promise<void> {
    this.stopped ??= this.shutDown(graceS);
    return this.stopped;
  }

  private async shutDown(graceS: number): Promise<void> {
    this.stopping = true;
    clearTimeout(this.retryTimer);
    const connection = this.connection;
    // No more requests for this worker; the ones given meanwhile are left unstarted and go to another worker.
    if (connection?.registered) void connection.write({ drain: {} });
    if (connection !== undefined && connection.running.size > 0) {
      this.log("info", "worker_stopping", { running: connection.running.size, grace_s: graceS });
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, graceS * 1000);
        this.drained = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    if (this.connection !== undefined) {
      const call = this.connection.call;
      const ended = new Promise<void>((resolve) => call.once("status", () => resolve()));
      this.connection.close();
      call.end();
      // The server ends the call once it read the half-close; don't wait for it for ever.
      await Promise.race([ended, new Promise((resolve) => setTimeout(resolve, 1000).unref())]);
      call.cancel();
    }
    this.finish();
  }

  private finish(error?: Error): void {
    this.client?.close();
    clearTimeout(this.retryTimer);
    const settle = this.settle;
    if (settle === undefined) return;
    if (error === undefined) {
      this.log("info", "worker_stopped", {});
      settle.resolve();
    } else {
      settle.reject(error);
    }
  }

  private connect(): void {
    if (this.stopping || this.client === undefined) return;
    const metadata = new grpc.Metadata();
    if (this.options.token) metadata.set("authorization", `Bearer ${this.options.token}`);
    const { path: methodPath, requestSerialize, responseDeserialize } = this.method;
    const call: Call = this.client.makeBidiStreamRequest(methodPath, requestSerialize, responseDeserialize, metadata);
    const connection = new Connection(call, this.options.registerTimeoutS ?? 10, () => {
      this.log("warning", "server_silent", {});
      call.cancel();
    });
    this.connection = connection;
    call.on("data", (message: ServerMessage) => this.receive(connection, message));
    call.on("error", () => undefined); // the status event below says how the call ended
    call.on("status", (status: grpc.StatusObject) => this.ended(connection, status));
    void connection.write({
      register: {
        worker_name: this.workerName,
        handlers: this.options.handlers.map((h) => ({
          event_type: h.eventType,
          streaming: h.streaming === true,
          ordering_key: h.orderingKey ?? "",
          stream_timeout_s: h.streamTimeoutS ?? 0,
          buffer_size: h.bufferSize ?? 0,
          max_in_flight: h.maxInFlight ?? 0,
          name: h.name ?? "",
        })),
      },
    });
  }

  private receive(connection: Connection, message: ServerMessage): void {
    if (connection.closed) return;
    connection.heard();
    if (connection.registered && !connection.proven) {
      connection.proven = true;
      this.backoff.reset();
    }
    switch (message.body) {
      case "registered": {
        const { worker_id, ping_interval_s, worker_timeout_s } = message.registered!;
        connection.accepted(ping_interval_s, worker_timeout_s);
        this.log("info", "registered", {
          worker_id,
          worker_name: this.workerName,
          server: this.options.server,
          event_types: this.options.handlers.map((h) => h.eventType),
          ping_interval_s,
          worker_timeout_s,
        });
        return;
      }
      case "request":
        this.start(connection, message.request!);
        return;
      case "cancel": {
        const { correlation_id, reason } = message.cancel!;
        this.log("info", "cancel", { correlation_id, reason });
        const running = connection.running.get(correlation_id);
        if (running !== undefined) {
          running.cancelReason = reason;
          running.abort(reason);
        } else if (connection.left.delete(correlation_id)) {
          void connection.write({ cancelled: { correlation_id } });
        }
        return;
      }
      case "credit": {
        const { correlation_id, chunks } = message.credit!;
        connection.running.get(correlation_id)?.addCredit(chunks);
        return;
      }
      case "ping":
        void connection.write({ pong: { nonce: message.ping!.nonce } });
        return;
      case "refused": {
        const { correlation_id, code, message: text } = message.refused!;
        this.log("warning", "refused", { correlation_id, code, message: text });
        const running = connection.running.get(correlation_id);
        if (running !== undefined && code !== "protocol") {
          // The server ended this request (over credit, a bad payload) or no longer knows it.
          running.gone = true;
          running.abort(`refused: ${code}`);
        }
        return;
      }
      default:
        this.log("warning", "unknown_message", { body: message.body ?? null });
    }
  }

  private start(connection: Connection, request: NonNullable<ServerMessage["request"]>): void {
    const event = request.event;
    if (event === null) {
      this.log("warning", "request_without_event", {});
      return;
    }
    const id = event.event_id;
    if (this.stopping) {
      connection.left.add(id);
      this.log("info", "request_left", { correlation_id: id, event_type: event.event_type });
      return;
    }
    if (connection.running.has(id)) return;
    const handler = handlerFor(this.options.handlers, event.event_type);
    const running = new Running(id, request.credit, (message) => connection.write(message));
    connection.running.set(id, running);
    this.log("info", "request_started", { correlation_id: id, event_type: event.event_type });
    void this.runHandler(connection, running, handler, event, request.timeout_s);
  }

  private async runHandler(
    connection: Connection,
    running: Running,
    handler: Handler | undefined,
    event: EventMessage,
    timeoutS: number,
  ): Promise<void> {
    const id = running.id;
    let outcome: WorkerMessage;
    try {
      if (handler === undefined) throw new HandlerError(`this worker serves no ${event.event_type}`);
      const payload = parsePayload(event.payload_json);
      void connection.write({ started: { correlation_id: id } });
      const ctx: RequestContext = {
        event: {
          eventId: id,
          eventType: event.event_type,
          payload,
          metadata: event.metadata,
          offset: event.offset,
          epoch: event.epoch,
        },
        signal: running.signal,
        timeoutS,
        log: (name, fields = {}) => this.log("info", name, { correlation_id: id, ...fields }),
      };
      if (handler.streaming === true) {
        await handler.handleStream(ctx, { send: (chunk) => running.send(chunk) });
        outcome = { result: { correlation_id: id, payload_json: Buffer.alloc(0) } };
      } else {
        const result = (await handler.handle(ctx)) ?? {};
        if (!isJsonObject(result)) {
          throw new HandlerError(`the handler returned ${JSON.stringify(result)}, not a JSON object`);
        }
        outcome = { result: { correlation_id: id, payload_json: Buffer.from(JSON.stringify(result)) } };
      }
    } catch (error) {
      const type = error instanceof HandlerError ? error.type : "handler_error";
      outcome = { error: { correlation_id: id, type, message: describe(error) } };
    }
    connection.running.delete(id);
    if (running.cancelReason !== undefined) outcome = { cancelled: { correlation_id: id } };
    if (!running.gone) {
      if ("error" in outcome) this.log("warning", "request_failed", { ...outcome.error });
      await connection.write(outcome);
    }
    if (connection.running.size === 0) this.drained?.();
  }

  private ended(connection: Connection, status: grpc.StatusObject): void {
    connection.close();
    for (const running of connection.running.values()) {
      running.gone = true;
      running.abort("the call to the server ended");
    }
    connection.running.clear();
    if (this.connection === connection) this.connection = undefined;
    this.drained?.();
    if (this.stopping) return;
    if (!connection.registered && FATAL_CODES.has(status.code)) {
      this.log("error", "registration_refused", { code: grpc.status[status.code], details: status.details });
      this.stopping = true;
      this.finish(new RegistrationRefused(status.code, status.details));
      return;
    }
    const delay = this.backoff.next();
    this.log("warning", "reconnecting", {
      code: grpc.status[status.code] ?? status.code,
      details: status.details,
      delay_s: Math.round(delay * 1000) / 1000,
    });
    this.retryTimer = setTimeout(() => this.connect(), delay * 1000);
  }
}

function parsePayload(bytes: Buffer): JsonObject {
  if (bytes.length === 0) return {};
  let value: unknown;
  try {
    value = JSON.parse(bytes.toString("utf8"));
  } catch (error) {
    throw new HandlerError(`the payload is not JSON: ${describe(error)}`, "invalid_payload");
  }
  if (!isJsonObject(value)) throw new HandlerError("the payload is not a JSON object", "invalid_payload");
  return value;
}
