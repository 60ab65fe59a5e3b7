/**
 * CRC32C (Castagnoli) and SHA-256 of an upload.
 *
 * CRC32C comes from `@node-rs/crc32` (native, SIMD); a table-driven pure
 * TypeScript implementation is used only when the native module cannot load
 * (an unsupported platform), so checksums never stop an upload.
 */
import { createHash, type Hash } from "node:crypto";
import { createRequire } from "node:module";

type NativeCrc32c = (input: Buffer, initialState?: number) => number;

const CASTAGNOLI_REFLECTED = 0x82f63b78;

function makeTables(): Uint32Array[] {
  const tables: Uint32Array[] = [];
  const first = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ CASTAGNOLI_REFLECTED : c >>> 1;
    first[n] = c >>> 0;
  }
  tables.push(first);
  for (let t = 1; t < 8; t++) {
    const previous = tables[t - 1]!;
    const table = new Uint32Array(256);
    for (let n = 0; n < 256; n++) table[n] = (previous[n]! >>> 8) ^ first[previous[n]! & 0xff]!;
    tables.push(table);
  }
  return tables;
}

let tables: Uint32Array[] | undefined;

/** Pure CRC32C (slicing by 8), continued from `previous`; the fallback of {@link crc32c}. */
export function crc32cPure(data: Uint8Array, previous = 0): number {
  const t = (tables ??= makeTables());
  const [t0, t1, t2, t3, t4, t5, t6, t7] = t as [
    Uint32Array, Uint32Array, Uint32Array, Uint32Array,
    Uint32Array, Uint32Array, Uint32Array, Uint32Array,
  ];
  let crc = ~previous >>> 0;
  let i = 0;
  const end8 = data.length - (data.length % 8);
  for (; i < end8; i += 8) {
    const a = (crc ^ (data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24))) >>> 0;
    crc =
      t7[a & 0xff]! ^ t6[(a >>> 8) & 0xff]! ^ t5[(a >>> 16) & 0xff]! ^ t4[a >>> 24]! ^
      t3[data[i + 4]!]! ^ t2[data[i + 5]!]! ^ t1[data[i + 6]!]! ^ t0[data[i + 7]!]!;
  }
  for (; i < data.length; i++) crc = t0[(crc ^ data[i]!) & 0xff]! ^ (crc >>> 8);
  return ~crc >>> 0;
}

function loadNative(): NativeCrc32c | undefined {
  try {
    const module = createRequire(import.meta.url)("@node-rs/crc32") as { crc32c?: NativeCrc32c };
    return typeof module.crc32c === "function" ? module.crc32c : undefined;
  } catch {
    return undefined;
  }
}

const native = loadNative();

/** Which CRC32C implementation is in use: "native" (`@node-rs/crc32`) or "pure". */
export const crc32cImplementation: "native" | "pure" = native ? "native" : "pure";

function asBuffer(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

/** CRC32C of `data`, continued from `previous` (the CRC32C of the bytes before it). */
export function crc32c(data: Uint8Array, previous = 0): number {
  if (native === undefined) return crc32cPure(data, previous);
  return native(asBuffer(data), previous) >>> 0;
}

/** `a` times `b` modulo the CRC32C polynomial (reflected; zlib's multmodp). */
function multModP(a: number, b: number): number {
  let m = 0x80000000;
  let p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) === 0) break;
    }
    m >>>= 1;
    b = b & 1 ? (b >>> 1) ^ CASTAGNOLI_REFLECTED : b >>> 1;
  }
  return p >>> 0;
}

let powers: Uint32Array | undefined;

/** x^(2^k) modulo the polynomial, k = 0..31. */
function makePowers(): Uint32Array {
  const table = new Uint32Array(32);
  let p = 0x40000000; // x^1
  table[0] = p;
  for (let k = 1; k < 32; k++) table[k] = p = multModP(p, p);
  return table;
}

/**
 * The CRC32C of A followed by B from the CRC32C of A, that of B and B's length
 * (zlib's crc32_combine): a few dozen multiplications instead of a second pass
 * over B's bytes.
 */
export function crc32cCombine(crcA: number, crcB: number, lengthB: number): number {
  const table = (powers ??= makePowers());
  let p = 0x80000000; // x^0: multiply by x^(8 * lengthB)
  let n = lengthB;
  for (let k = 3; n > 0; k++, n = Math.floor(n / 2)) {
    if (n % 2 === 1) p = multModP(table[k & 31]!, p);
  }
  return (multModP(p, crcA >>> 0) ^ crcB) >>> 0;
}

/** Checksums of a whole object, as the gateway reports and verifies them. */
export interface ObjectChecksums {
  /** CRC32C (Castagnoli) of all bytes, when known. */
  crc32c?: number;
  /** SHA-256 of all bytes (32 bytes), when known. */
  sha256?: Uint8Array;
}

/** CRC32C and SHA-256 of the bytes fed to it, in order; each byte is fed once. */
export class Checksummer {
  private crc = 0;
  private readonly hash: Hash = createHash("sha256");
  private digest: Uint8Array | undefined;

  /** Feeds `data`; `dataCrc`, when given, is its CRC32C (computed for its message already). */
  update(data: Uint8Array, dataCrc?: number): void {
    if (this.digest !== undefined) throw new Error("Checksummer: update after result");
    if (data.length === 0) return;
    this.crc = dataCrc === undefined ? crc32c(data, this.crc) : crc32cCombine(this.crc, dataCrc, data.length);
    this.hash.update(data);
  }

  /** The checksums of everything fed so far; no more updates afterwards. */
  result(): Required<ObjectChecksums> {
    this.digest ??= new Uint8Array(this.hash.digest());
    return { crc32c: this.crc, sha256: this.digest };
  }
}
