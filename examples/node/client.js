#!/usr/bin/env node
"use strict";
// A small jizhi client in Node.js: ping, info and score, speaking the wire protocol of
// docs/protocol.md with nothing but `zeromq` and `@msgpack/msgpack`. README.md here says how to run it.
//
// 64-bit ids: user and item ids are uint64 and most are above 2^53, where a JavaScript Number
// cannot hold every integer. Every id here is a BigInt, from the command line (BigInt("...")) or
// the trace (a BigUint64Array) to the wire (msgpack uint64, raw little-endian frames) and back.

const zmq = require("zeromq");
const { encode, decode } = require("@msgpack/msgpack");
const { readNpz } = require("./npz");

// BigInt <-> msgpack int64/uint64, both ways (without it a uint64 decodes to a rounded Number).
const MSGPACK = { useBigInt64: true };

const EXIT = { OK: 0, ERROR_REPLY: 1, USAGE: 2, TIMEOUT: 3, FAILED: 4 };

const USAGE = `usage: node client.js [--endpoint URL] [--timeout-ms MS] [--json] COMMAND [OPTIONS]

commands:
  ping                                  is the server there?
  info                                  its state (ready, pipelines, versions)
  score --user ID --items ID,ID,...     score candidates for a user, print the top-k
        [--recall S,S,...]              recall scores, one per item (optional)
  score --trace FILE.npz --index Q      the same with request Q of a trace (jizhictl demo trace)

options:
  --endpoint URL     jizhid's frontend (default tcp://127.0.0.1:5555)
  --timeout-ms MS    how long to wait for the reply (default 5000)
  --json             print the reply as one JSON line (ids as decimal strings)
  --top-k K          items to return (default 10)
  --pipeline NAME    pipeline (default: the server's first)
  --deadline-ms MS   the server's budget for the request (default: its own)
  --context JSON     the model's context fields, e.g. '{"hour": 14}'
  --features JSON    the user's own features over the profiles', e.g. '{"dense": [0.1, ...], "u_tags": [3, 7]}'

exit codes: 0 ok, 1 error reply (its code is printed), 2 bad usage, 3 no reply in time, 4 other failure`;

class UsageError extends Error {}

function jsonMap(option, text) {
  let v;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new UsageError(`${option}: not JSON (${err.message})`);
  }
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw new UsageError(`${option}: a JSON object, {"field": value}`);
  return v;
}
class TimeoutError extends Error {}

// -- the protocol ---------------------------------------------------------------------------------

// Send one request (a msgpack header, then one raw frame per array it lists); return the reply
// as {header, arrays: {name: Array}}. A new REQ socket per request: a REQ socket that timed out
// cannot send again (close it and open another: "Lazy Pirate").
async function call(endpoint, timeoutMs, header, frames = []) {
  const sock = new zmq.Request({ linger: 0, receiveTimeout: timeoutMs, sendTimeout: timeoutMs });
  try {
    sock.connect(endpoint);
    await sock.send([Buffer.from(encode(header, MSGPACK)), ...frames]);
    let reply;
    try {
      reply = await sock.receive();
    } catch (err) {
      if (err.code === "EAGAIN") throw new TimeoutError(`no reply from ${endpoint} within ${timeoutMs} ms`);
      throw err;
    }
    return decodeReply(reply);
  } finally {
    sock.close();
  }
}

function decodeReply(frames) {
  const header = decode(frames[0], MSGPACK);
  const arrays = {};
  (header.arrays || []).forEach((spec, i) => {
    const frame = frames[i + 1];
    const n = Number(spec.shape[0]);
    const size = { uint64: 8, float32: 4 }[spec.dtype];
    if (!frame || frame.length !== n * size) throw new Error(`reply array ${spec.name} is malformed`);
    arrays[spec.name] = Array.from({ length: n }, (_, j) =>
      spec.dtype === "uint64" ? frame.readBigUInt64LE(8 * j) : frame.readFloatLE(4 * j));
  });
  return { header, arrays };
}

// Arrays travel as raw little-endian bytes, never as msgpack.
function uint64Frame(ids) {
  const b = Buffer.alloc(8 * ids.length);
  ids.forEach((id, i) => b.writeBigUInt64LE(BigInt.asUintN(64, id), 8 * i));
  return b;
}

function float32Frame(values) {
  const b = Buffer.alloc(4 * values.length);
  values.forEach((x, i) => b.writeFloatLE(x, 4 * i));
  return b;
}

function scoreRequest({ user, items, recall, topK, pipeline, deadlineMs, context, features }) {
  const header = {
    v: 1, op: "score", id: 1, user, top_k: topK,
    arrays: [{ name: "item_ids", dtype: "uint64", shape: [items.length] }],
  };
  const frames = [uint64Frame(items)];
  if (recall) {
    header.arrays.push({ name: "recall_scores", dtype: "float32", shape: [recall.length] });
    frames.push(float32Frame(recall));
  }
  if (pipeline) header.pipeline = pipeline;
  if (deadlineMs) header.deadline_ms = deadlineMs;
  // The request's own features (docs/protocol.md): {field: raw value or [values]}, and "dense": [numbers].
  // JSON numbers: raw values must stay below 2^53 here (a BigInt for larger ones).
  if (context) header.context = context;
  if (features) header.features = features;
  return [header, frames];
}

// -- the command line -----------------------------------------------------------------------------

function parseArgs(argv) {
  const opts = { endpoint: "tcp://127.0.0.1:5555", timeoutMs: 5000, json: false, topK: 10 };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${a} needs a value`);
      return argv[++i];
    };
    switch (a) {
      case "--endpoint": opts.endpoint = value(); break;
      case "--timeout-ms": opts.timeoutMs = positiveInt(a, value()); break;
      case "--json": opts.json = true; break;
      case "--user": opts.user = uint64(a, value()); break;
      case "--items": opts.items = value().split(",").map((s) => uint64("--items", s)); break;
      case "--recall": opts.recall = value().split(",").map(Number); break;
      case "--trace": opts.trace = value(); break;
      case "--index": opts.index = positiveInt(a, value(), 0); break;
      case "--top-k": opts.topK = positiveInt(a, value()); break;
      case "--pipeline": opts.pipeline = value(); break;
      case "--deadline-ms": opts.deadlineMs = positiveInt(a, value()); break;
      case "--context": opts.context = jsonMap(a, value()); break;
      case "--features": opts.features = jsonMap(a, value()); break;
      case "-h": case "--help": opts.help = true; break;
      default:
        if (a.startsWith("-")) throw new UsageError(`unknown option ${a}`);
        rest.push(a);
    }
  }
  if (rest.length !== 1 && !opts.help) throw new UsageError("give one command: ping, info or score");
  opts.command = rest[0];
  return opts;
}

function uint64(option, s) {
  // BigInt("..."), never Number("..."): 7148993717383184012 as a Number is 7148993717383184384.
  if (!/^\d+$/.test(s.trim()) || BigInt(s.trim()) >= 2n ** 64n) {
    throw new UsageError(`${option}: ${JSON.stringify(s)} is not an unsigned 64-bit integer`);
  }
  return BigInt(s.trim());
}

function positiveInt(option, s, min = 1) {
  const n = Number(s);
  if (!Number.isSafeInteger(n) || n < min) throw new UsageError(`${option}: ${JSON.stringify(s)} is not an integer >= ${min}`);
  return n;
}

// The request Q of a trace: users[Q], items[offsets[Q]:offsets[Q+1]] (docs/formats.md, "Trace").
function traceRequest(path, q) {
  const t = readNpz(path);
  if (!t.users || !t.offsets || !t.items) throw new UsageError(`${path} is not a trace (users, offsets, items)`);
  if (q >= t.users.length) throw new UsageError(`--index ${q}: the trace has ${t.users.length} requests`);
  const a = Number(t.offsets[q]), b = Number(t.offsets[q + 1]);
  const recall = t.recall_scores ? Array.from(t.recall_scores.subarray(a, b)) : undefined;
  return { user: t.users[q], items: Array.from(t.items.subarray(a, b)), recall };
}

// JSON with BigInts as decimal strings (JSON.stringify refuses BigInt).
const toJson = (x) => JSON.stringify(x, (_, v) => (typeof v === "bigint" ? v.toString() : v));

async function main(argv) {
  const opts = parseArgs(argv);
  if (opts.help) {
    console.log(USAGE);
    return EXIT.OK;
  }
  let header, frames = [];
  if (opts.command === "ping" || opts.command === "info") {
    header = { v: 1, op: opts.command, id: 1 };
  } else if (opts.command === "score") {
    let req;
    if (opts.trace !== undefined) {
      if (opts.index === undefined) throw new UsageError("--trace needs --index");
      req = traceRequest(opts.trace, opts.index);
    } else {
      if (opts.user === undefined || !opts.items) throw new UsageError("score needs --user and --items (or --trace)");
      if (opts.recall && opts.recall.length !== opts.items.length) throw new UsageError("--recall needs one score per item");
      req = { user: opts.user, items: opts.items, recall: opts.recall };
    }
    [header, frames] = scoreRequest({ ...req, topK: opts.topK, pipeline: opts.pipeline, deadlineMs: opts.deadlineMs,
      context: opts.context, features: opts.features });
  } else {
    throw new UsageError(`unknown command ${JSON.stringify(opts.command)}`);
  }

  const reply = await call(opts.endpoint, opts.timeoutMs, header, frames);
  const h = reply.header;
  if (opts.json) {
    console.log(toJson({ ...h, ...reply.arrays }));
  } else if (h.status !== "ok") {
    const retry = h.retry_after_ms !== undefined ? ` (retry after ${h.retry_after_ms} ms)` : "";
    console.log(`error ${h.code}: ${h.message}${retry}`);
  } else if (opts.command === "ping") {
    console.log(`pong from ${opts.endpoint}`);
  } else if (opts.command === "info") {
    console.log(`ready: ${h.ready}, draining: ${h.draining}, default pipeline: ${h.default_pipeline}`);
    for (const [name, p] of Object.entries(h.pipelines)) {
      console.log(`  ${name}: model ${p.model} version ${p.version}, ready ${p.ready}, ${p.in_flight} in flight`);
    }
  } else {
    const { item_ids: ids, scores } = reply.arrays;
    console.log(`${ids.length} of ${frames[0].length / 8} candidates, model versions ${toJson(h.model_versions)}, ` +
      `${h.unknown_items} unknown items, ${(h.timings_us.total / 1000).toFixed(1)} ms`);
    ids.forEach((id, i) => console.log(`${String(i + 1).padStart(4)}  ${String(id).padStart(20)}  ${scores[i].toFixed(6)}`));
  }
  return h.status === "ok" ? EXIT.OK : EXIT.ERROR_REPLY;
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => { process.exitCode = code; },
    (err) => {
      if (err instanceof UsageError) {
        console.error(`client.js: ${err.message}\n\n${USAGE}`);
        process.exitCode = EXIT.USAGE;
      } else if (err instanceof TimeoutError) {
        console.error(`client.js: ${err.message}`);
        process.exitCode = EXIT.TIMEOUT;
      } else {
        console.error(`client.js: ${err.stack || err}`);
        process.exitCode = EXIT.FAILED;
      }
    });
}

module.exports = { call, decodeReply, scoreRequest, uint64Frame, float32Frame, MSGPACK };
