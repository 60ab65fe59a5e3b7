/** The retry table in the client against testdata/retry_table.json, and the backoff. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import type { StatusCode } from "../../dist/errors.js";
import { backoffMs, DEFAULT_BACKOFF, DEFAULT_OUTAGE_TOLERANCE_MS, RETRY_RULES, retryAction } from "../../dist/retry.js";
import { loadJson } from "../testdata.js";

interface Table {
  backoff: { initial_seconds: number; multiplier: number; max_seconds: number; jitter: number; outage_tolerance_seconds: number };
  rules: { code: string; reason: string; action: string }[];
  cases: { code: StatusCode; reason: string; action: string }[];
}

const table = loadJson<Table>("retry_table.json");

describe("retry table", () => {
  for (const item of table.cases) {
    test(`${item.code} ${item.reason || "(no reason)"} -> ${item.action}`, () => {
      assert.equal(retryAction(item.code, item.reason), item.action);
    });
  }

  test("the client's rules are the table's rules, in order", () => {
    assert.deepEqual(
      RETRY_RULES.map((rule) => ({ ...rule })),
      table.rules,
    );
  });

  test("a reason the table does not name falls to the code's rule", () => {
    assert.equal(retryAction("UNAVAILABLE", "SOMETHING_NEW"), "resume");
    assert.equal(retryAction("ABORTED", "SOMETHING_NEW"), "fail");
  });
});

describe("backoff", () => {
  test("defaults are the table's", () => {
    assert.equal(DEFAULT_BACKOFF.initialMs, table.backoff.initial_seconds * 1000);
    assert.equal(DEFAULT_BACKOFF.multiplier, table.backoff.multiplier);
    assert.equal(DEFAULT_BACKOFF.maxMs, table.backoff.max_seconds * 1000);
    assert.equal(DEFAULT_BACKOFF.jitter, table.backoff.jitter);
    assert.equal(DEFAULT_OUTAGE_TOLERANCE_MS, table.backoff.outage_tolerance_seconds * 1000);
  });

  test("exponential from 200 ms, doubling, capped at 10 s, jittered by at most 20 %", () => {
    const expected = [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000];
    expected.forEach((base, index) => {
      const retry = index + 1;
      assert.equal(backoffMs(DEFAULT_BACKOFF, retry, () => 0.5), base);
      assert.ok(Math.abs(backoffMs(DEFAULT_BACKOFF, retry, () => 0) - base * 0.8) < 1e-9);
      assert.equal(backoffMs(DEFAULT_BACKOFF, retry, () => 1), Math.min(10_000, base * 1.2));
    });
  });
});
