/** The repo's shared test vectors (testdata/ at the repository root). */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, resolve } from "node:path";

/** clients/ts, from dist-test/... or test/... alike. */
export const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const TESTDATA = process.env["RECGW_TESTDATA"] ?? resolve(PACKAGE_ROOT, "../../testdata");

export function loadJson<T>(name: string): T {
  return JSON.parse(readFileSync(resolve(TESTDATA, name), "utf8")) as T;
}

export type Pattern =
  | { pattern: "ascii"; text: string }
  | { pattern: "fill"; byte: number; length: number }
  | { pattern: "ramp"; length: number };

/** The bytes a pattern describes (see testdata/generate.py). */
export function materialize(spec: Pattern): Uint8Array {
  switch (spec.pattern) {
    case "ascii":
      return new TextEncoder().encode(spec.text);
    case "fill":
      return new Uint8Array(spec.length).fill(spec.byte);
    case "ramp": {
      const out = new Uint8Array(spec.length);
      for (let i = 0; i < spec.length; i++) out[i] = (i * 7 + 3) % 251;
      return out;
    }
  }
}

export function ramp(length: number): Uint8Array {
  return materialize({ pattern: "ramp", length });
}
