"use strict";
// Read the arrays of a numpy .npz file (a trace: docs/formats.md, "Trace") into typed arrays.
//
// An .npz is a zip archive of .npy files, one per array. numpy's savez stores them
// uncompressed; savez_compressed deflates them; both are read here. Only
// little-endian numeric dtypes are decoded ("<u8", "<i8", "<f4", "<f8"); other
// arrays (a recorded trace's `pipelines` strings) are skipped.

const fs = require("fs");
const zlib = require("zlib");

const TYPED = {
  "<u8": BigUint64Array,
  "<i8": BigInt64Array,
  "<f4": Float32Array,
  "<f8": Float64Array,
};

function readNpz(path) {
  const zip = fs.readFileSync(path);
  const out = {};
  for (const entry of centralDirectory(zip)) {
    if (!entry.name.endsWith(".npy")) continue;
    const array = parseNpy(entryData(zip, entry));
    if (array !== null) out[entry.name.slice(0, -4)] = array;
  }
  return out;
}

// The zip's central directory: {name, method, size, localOffset} per member.
function centralDirectory(zip) {
  const EOCD = 0x06054b50;
  let eocd = -1;
  for (let i = zip.length - 22; i >= Math.max(0, zip.length - 22 - 65535); i--) {
    if (zip.readUInt32LE(i) === EOCD) { eocd = i; break; }
  }
  if (eocd < 0) throw new Error("not a zip file (no end of central directory)");
  const count = zip.readUInt16LE(eocd + 10);
  let p = zip.readUInt32LE(eocd + 16);
  if (count === 0xffff || p === 0xffffffff) throw new Error("zip64 archives (over 4 GiB) are not supported");
  const entries = [];
  for (let k = 0; k < count; k++) {
    if (zip.readUInt32LE(p) !== 0x02014b50) throw new Error("corrupt zip central directory");
    const method = zip.readUInt16LE(p + 10);
    let size = zip.readUInt32LE(p + 20);
    let localOffset = zip.readUInt32LE(p + 42);
    const nameLen = zip.readUInt16LE(p + 28), extraLen = zip.readUInt16LE(p + 30), commentLen = zip.readUInt16LE(p + 32);
    const name = zip.toString("utf8", p + 46, p + 46 + nameLen);
    // zip64 extra field (id 1): the 64-bit values of the fields set to 0xffffffff, in this order.
    const uncompressed = zip.readUInt32LE(p + 24);
    for (let e = p + 46 + nameLen; e < p + 46 + nameLen + extraLen; ) {
      const id = zip.readUInt16LE(e), len = zip.readUInt16LE(e + 2);
      if (id === 1) {
        let q = e + 4;
        if (uncompressed === 0xffffffff) q += 8;
        if (size === 0xffffffff) { size = Number(zip.readBigUInt64LE(q)); q += 8; }
        if (localOffset === 0xffffffff) { localOffset = Number(zip.readBigUInt64LE(q)); }
      }
      e += 4 + len;
    }
    entries.push({ name, method, size, localOffset });
    p += 46 + nameLen + extraLen + commentLen;
  }
  return entries;
}

function entryData(zip, entry) {
  const h = entry.localOffset;
  if (zip.readUInt32LE(h) !== 0x04034b50) throw new Error(`corrupt zip member ${entry.name}`);
  const start = h + 30 + zip.readUInt16LE(h + 26) + zip.readUInt16LE(h + 28);
  const data = zip.subarray(start, start + entry.size);
  if (entry.method === 0) return data;
  if (entry.method === 8) return zlib.inflateRawSync(data);
  throw new Error(`zip member ${entry.name}: compression method ${entry.method} is not supported`);
}

// One .npy: a magic string, a header (a Python dict literal) and the raw array bytes.
function parseNpy(buf) {
  if (buf.toString("latin1", 0, 6) !== "\x93NUMPY") throw new Error("not an .npy member");
  const major = buf[6];
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = (major === 1 ? 10 : 12) + headerLen;
  const header = buf.toString("latin1", major === 1 ? 10 : 12, start);
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").filter((s) => s.trim()).map(Number);
  const Typed = TYPED[descr];
  if (!Typed || (fortran && shape.length > 1)) return null;
  const n = shape.reduce((a, b) => a * b, 1);
  // Copy into a fresh (aligned) buffer: a typed array cannot view unaligned bytes.
  const bytes = new Uint8Array(n * Typed.BYTES_PER_ELEMENT);
  bytes.set(buf.subarray(start, start + bytes.length));
  const array = new Typed(bytes.buffer);
  return shape.length === 0 ? array[0] : array;
}

module.exports = { readNpz };
