// The example worker: serves demo:stream_ticks (a stream) and demo:shout (a plain handler) for a Nexus server.
//
//   node examples/typescript-worker/build/main.js [--server HOST:PORT] [--token JWT] [--max-in-flight N]
//       [--stream-timeout S] [--buffer-size N] [--name NAME] [--tls] [--ca-file FILE] [--stop-grace S]
//       [--protos DIR]
//
// Options also read environment variables (NEXUS_SERVER, NEXUS_TOKEN, NEXUS_WORKER_MAX_IN_FLIGHT,
// NEXUS_WORKER_STREAM_TIMEOUT, NEXUS_WORKER_BUFFER_SIZE, NEXUS_WORKER_NAME, NEXUS_PROTOS); a flag wins. Logs are JSON lines on stderr. SIGTERM or SIGINT
// stops it gracefully (a second one exits at once). Exit codes: 0 stopped, 1 the server refused the handlers,
// 2 a bad option.

import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";

import {
  Cancelled,
  HandlerError,
  jsonLogger,
  RegistrationRefused,
  Worker,
  type JsonObject,
  type PlainHandler,
  type RequestContext,
  type StreamSender,
  type StreamingHandler,
} from "./worker.js";

const USAGE = `usage: main.js [--server HOST:PORT] [--token JWT] [--max-in-flight N] [--stream-timeout SECONDS]
               [--buffer-size N] [--name NAME] [--tls] [--ca-file FILE] [--stop-grace SECONDS] [--protos DIR]`;

/** The most chunks one demo:stream_ticks request may ask for. */
const MAX_TICKS = 100_000;

function wholeNumber(payload: JsonObject, field: string, fallback: number, max: number): number {
  const value = payload[field] ?? fallback;
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > max) {
    throw new HandlerError(`${field} must be a whole number from 0 to ${max}, got ${JSON.stringify(value)}`, "invalid_payload");
  }
  return value;
}

function seconds(payload: JsonObject, field: string, fallback: number): number {
  const value = payload[field] ?? fallback;
  if (typeof value !== "number" || !(value >= 0 && value <= 3600)) {
    throw new HandlerError(`${field} must be a number of seconds from 0 to 3600, got ${JSON.stringify(value)}`, "invalid_payload");
  }
  return value;
}

/** `{"n": 5, "every_s": 0.1}`: sends n chunks `{"tick": i, "of": n}`, every_s seconds apart. */
function streamTicks(maxInFlight: number, streamTimeoutS: number, bufferSize: number): StreamingHandler {
  return {
    eventType: "demo:stream_ticks",
    name: "StreamTicks",
    streaming: true,
    maxInFlight,
    streamTimeoutS,
    bufferSize,
    async handleStream(ctx: RequestContext, stream: StreamSender): Promise<void> {
      const n = wholeNumber(ctx.event.payload, "n", 5, MAX_TICKS);
      const everyS = seconds(ctx.event.payload, "every_s", 0.1);
      for (let tick = 0; tick < n; tick++) {
        if (tick > 0 && everyS > 0) {
          try {
            await sleep(everyS * 1000, undefined, { signal: ctx.signal });
          } catch {
            throw ctx.signal.reason instanceof Cancelled ? ctx.signal.reason : new Cancelled("aborted");
          }
        }
        await stream.send({ tick, of: n });
      }
      ctx.log("ticks_sent", { n });
    },
  };
}

/** `{"text": "hi"}` → `{"text": "HI", "length": 2}`. */
function shout(maxInFlight: number): PlainHandler {
  return {
    eventType: "demo:shout",
    name: "Shout",
    maxInFlight,
    handle(ctx: RequestContext): JsonObject {
      const text = ctx.event.payload["text"];
      if (typeof text !== "string") throw new HandlerError("text must be a string", "invalid_payload");
      return { text: text.toUpperCase(), length: [...text].length };
    },
  };
}

interface Options {
  server: string;
  token: string | undefined;
  maxInFlight: number;
  streamTimeoutS: number;
  bufferSize: number;
  name: string | undefined;
  tls: boolean;
  caFile: string | undefined;
  stopGraceS: number;
  protosDir: string | undefined;
}

class UsageError extends Error {}

function numberOption(name: string, raw: string | undefined, fallback: number, check: (n: number) => boolean, want: string): number {
  if (raw === undefined || raw === "") return fallback;
  const value = Number(raw);
  if (!check(value)) throw new UsageError(`${name} must be ${want}, got ${JSON.stringify(raw)}`);
  return value;
}

function parseOptions(argv: string[], env: NodeJS.ProcessEnv): Options {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        server: { type: "string" },
        token: { type: "string" },
        "max-in-flight": { type: "string" },
        "stream-timeout": { type: "string" },
        "buffer-size": { type: "string" },
        name: { type: "string" },
        tls: { type: "boolean" },
        "ca-file": { type: "string" },
        "stop-grace": { type: "string" },
        protos: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (error) {
    throw new UsageError(error instanceof Error ? error.message : String(error));
  }
  if (values.help) {
    process.stdout.write(USAGE + "\n");
    process.exit(0);
  }
  const server = values.server ?? env["NEXUS_SERVER"] ?? "127.0.0.1:50051";
  if (!/^[^\s:]+:\d+$|^\[[0-9a-fA-F:]+\]:\d+$/.test(server)) {
    throw new UsageError(`--server must be HOST:PORT, got ${JSON.stringify(server)}`);
  }
  return {
    server,
    token: values.token ?? (env["NEXUS_TOKEN"] || undefined),
    maxInFlight: numberOption(
      "--max-in-flight",
      values["max-in-flight"] ?? env["NEXUS_WORKER_MAX_IN_FLIGHT"],
      1,
      (n) => Number.isInteger(n) && n >= 1 && n <= 10_000,
      "a whole number from 1 to 10000",
    ),
    streamTimeoutS: numberOption(
      "--stream-timeout",
      values["stream-timeout"] ?? env["NEXUS_WORKER_STREAM_TIMEOUT"],
      0,
      Number.isFinite,
      "a number of seconds (0: the server's default, negative: no limit)",
    ),
    bufferSize: numberOption(
      "--buffer-size",
      values["buffer-size"] ?? env["NEXUS_WORKER_BUFFER_SIZE"],
      0,
      (n) => Number.isInteger(n) && n >= 0 && n <= 1_000_000,
      "a whole number of chunks from 0 (the server's default) to 1000000",
    ),
    name: values.name ?? (env["NEXUS_WORKER_NAME"] || undefined),
    tls: values.tls === true,
    caFile: values["ca-file"],
    stopGraceS: numberOption("--stop-grace", values["stop-grace"], 10, (n) => n >= 0 && Number.isFinite(n), "a number of seconds >= 0"),
    protosDir: values.protos ?? (env["NEXUS_PROTOS"] || undefined),
  };
}

async function main(): Promise<number> {
  let options: Options;
  try {
    options = parseOptions(process.argv.slice(2), process.env);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    process.stderr.write(`${USAGE}\ntypescript-worker: error: ${error.message}\n`);
    return 2;
  }
  let worker: Worker;
  try {
    worker = new Worker({
      server: options.server,
      handlers: [streamTicks(options.maxInFlight, options.streamTimeoutS, options.bufferSize), shout(options.maxInFlight)],
      stopGraceS: options.stopGraceS,
      tls: options.tls,
      ...(options.token !== undefined && { token: options.token }),
      ...(options.caFile !== undefined && { caFile: options.caFile }),
      ...(options.name !== undefined && { workerName: options.name }),
      ...(options.protosDir !== undefined && { protosDir: options.protosDir }),
    });
  } catch (error) {
    // A proto directory or CA file that cannot be read, a handler declaration that cannot be sent.
    process.stderr.write(`typescript-worker: error: ${error instanceof Error ? error.message : String(error)}\n`);
    return 2;
  }
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals): void => {
    signals += 1;
    if (signals > 1) process.exit(130);
    jsonLogger("info", "signal", { signal });
    void worker.stop();
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
  try {
    await worker.run();
    return 0;
  } catch (error) {
    if (error instanceof RegistrationRefused) {
      process.stderr.write(`typescript-worker: ${error.message}\n`);
      return 1;
    }
    throw error;
  }
}

main().then(
  // Exit now: a handler that ignored its abort signal must not keep a stopped worker alive.
  (code) => process.exit(code),
  (error: unknown) => {
    process.stderr.write(`typescript-worker: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
    process.exitCode = 1;
  },
);
