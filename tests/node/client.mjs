// A Nexus client in Node, built from protos/ alone: it subscribes with a pattern, emits events and reads
// them back. Usage: node tests/node/client.mjs HOST:PORT
//
// Prints one JSON line per result on stdout:
//   {"kind":"metadata","epoch":...,"head_offset":...}     the subscription is live
//   {"kind":"emitted","event_type":...,"offset":...,...}  one per EmitEvent that was stored
//   {"kind":"error","event_type":...,"code":3,...}       one per EmitEvent the server refused
//   {"kind":"received","event_type":...,"offset":...,"payload":...}
// Exits 0 when every step went as planned, 1 otherwise (with the reason on stderr), within 20 s.

import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const OVERALL_TIMEOUT_MS = 20_000;
const PATTERN = "demo:*:v1:*";
const EMITS = [
  ["demo:ping:v1:happened", { n: 1 }],
  ["other:ping:v1:happened", { n: 2 }],
  // Every kind a Struct value can hold, to show they all survive the round trip.
  ["demo:pong:v1:happened", { n: 3, half: 0.5, text: "héllo", ok: true, none: null, list: [1, "two"], nested: { k: "v" } }],
];
const MALFORMED = ["Demo:x", "Demo:ping:v1:happened"];

const here = path.dirname(fileURLToPath(import.meta.url));
const protosDir = path.resolve(here, "..", "..", "protos");

function out(record) {
  process.stdout.write(JSON.stringify(record) + "\n");
}

function fail(message) {
  process.stderr.write(`client.mjs: ${message}\n`);
  process.exit(1);
}

// google.protobuf.Struct <-> plain JSON, in proto-loader's object form. The well-known types come from
// protobufjs's bundled descriptors, whose field names stay camelCase even with keepCase: {numberValue: 1}.
function toValue(value) {
  if (value === null || value === undefined) return { nullValue: "NULL_VALUE" };
  if (typeof value === "number") return { numberValue: value };
  if (typeof value === "string") return { stringValue: value };
  if (typeof value === "boolean") return { boolValue: value };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  return { structValue: toStruct(value) };
}

function toStruct(object) {
  const fields = {};
  for (const [key, value] of Object.entries(object)) fields[key] = toValue(value);
  return { fields };
}

function fromValue(value) {
  switch (value.kind) {
    case "numberValue":
      return value.numberValue;
    case "stringValue":
      return value.stringValue;
    case "boolValue":
      return value.boolValue;
    case "structValue":
      return fromStruct(value.structValue);
    case "listValue":
      return (value.listValue.values || []).map(fromValue);
    default:
      return null;
  }
}

function fromStruct(struct) {
  const result = {};
  for (const [key, value] of Object.entries((struct && struct.fields) || {})) result[key] = fromValue(value);
  return result;
}

function emit(client, eventType, payload) {
  return new Promise((resolve, reject) => {
    client.EmitEvent(
      { event_type: eventType, payload: toStruct(payload), metadata: { client: "node" } },
      { deadline: Date.now() + 10_000 },
      (error, response) => (error ? reject(error) : resolve(response)),
    );
  });
}

async function main() {
  const address = process.argv[2];
  if (!address) fail("usage: node tests/node/client.mjs HOST:PORT");

  const definition = protoLoader.loadSync("nexus/v1/nexus.proto", {
    includeDirs: [protosDir],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const nexus = grpc.loadPackageDefinition(definition).nexus.v1;
  const client = new nexus.NexusService(address, grpc.credentials.createInsecure());

  const received = [];
  let finished = false;
  let onReceived = () => {};
  let onStreamError = () => {};

  const call = client.SubscribeEvents({ event_types: [PATTERN] });
  call.on("data", (event) => {
    received.push(event);
    onReceived();
  });
  call.on("error", (error) => {
    if (finished && error.code === grpc.status.CANCELLED) return;
    onStreamError(error);
  });
  const streamFailed = new Promise((_, reject) => {
    onStreamError = (error) => reject(new Error(`SubscribeEvents failed: ${error.code} ${error.details}`));
  });
  streamFailed.catch(() => {}); // raced below; keeps an early failure from counting as unhandled

  // The initial metadata says the subscription is live: only then is it safe to emit.
  const metadata = await Promise.race([
    new Promise((resolve) => call.once("metadata", resolve)),
    streamFailed,
  ]);
  const epoch = metadata.get("nexus-epoch")[0];
  const headOffset = metadata.get("nexus-head-offset")[0];
  if (!epoch) throw new Error("the initial metadata has no nexus-epoch");
  out({ kind: "metadata", epoch: String(epoch), head_offset: Number(headOffset) });

  let lastOffset = 0;
  for (const [eventType, payload] of EMITS) {
    const stored = await emit(client, eventType, payload);
    lastOffset = Number(stored.offset);
    out({
      kind: "emitted",
      event_type: stored.event_type,
      event_id: stored.event_id,
      offset: Number(stored.offset),
      epoch: stored.epoch,
      success: stored.success,
      message: stored.message,
      payload: fromStruct(stored.payload),
    });
  }

  for (const eventType of MALFORMED) {
    try {
      await emit(client, eventType, { n: 0 });
    } catch (error) {
      if (typeof error.code !== "number") throw error;
      out({ kind: "error", event_type: eventType, code: error.code, details: error.details });
      continue;
    }
    throw new Error(`the server stored the malformed event type ${JSON.stringify(eventType)}`);
  }

  // Events arrive in offset order, so once the last emitted offset is in, everything matching before it is too.
  const caughtUp = () => received.some((event) => Number(event.offset) >= lastOffset);
  if (!caughtUp()) {
    await Promise.race([
      new Promise((resolve) => {
        onReceived = () => {
          if (caughtUp()) resolve();
        };
      }),
      streamFailed,
    ]);
  }
  for (const event of received) {
    out({
      kind: "received",
      event_type: event.event_type,
      event_id: event.event_id,
      offset: Number(event.offset),
      epoch: event.epoch,
      payload: fromStruct(event.payload),
      metadata: event.metadata,
    });
  }

  finished = true;
  call.cancel();
  client.close();
}

const timer = setTimeout(() => fail(`gave up after ${OVERALL_TIMEOUT_MS / 1000} s`), OVERALL_TIMEOUT_MS);
main().then(
  () => {
    clearTimeout(timer);
    process.exit(0);
  },
  (error) => fail(error && error.stack ? error.stack : String(error)),
);
