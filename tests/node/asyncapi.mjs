// Validates an AsyncAPI document with the AsyncAPI project's own parser (@asyncapi/parser).
//
//   node tests/node/asyncapi.mjs document.json
//
// Prints one JSON line per diagnostic ({severity, code, message, path}; severity 0 error, 1 warning, 2 info,
// 3 hint) and exits 1 when any has severity error or the document could not be parsed, else 0.
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const SEVERITY_ERROR = 0;

const path = process.argv[2];
if (!path) {
  console.error("usage: node asyncapi.mjs DOCUMENT.json");
  process.exit(2);
}
const text = await readFile(path, "utf8");
const parser = new Parser();
const { document, diagnostics } = await parser.parse(text, { source: path });
for (const d of diagnostics) {
  console.log(JSON.stringify({ severity: d.severity, code: d.code, message: d.message, path: d.path }));
}
const errors = diagnostics.filter((d) => d.severity === SEVERITY_ERROR);
if (document === undefined || errors.length > 0) {
  console.error(`${errors.length} error(s)${document === undefined ? "; the document could not be parsed" : ""}`);
  process.exit(1);
}
console.error(`valid AsyncAPI ${document.version()}: ${document.allMessages().length} messages, ` +
  `${document.allOperations().length} operations`);
