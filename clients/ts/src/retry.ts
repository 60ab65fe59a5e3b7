/**
 * What an upload does after a failed stream (the shared retry table,
 * testdata/retry_table.json, mirrored here and checked against it by the unit
 * tests), and how long it waits first.
 */
import type { RecgwError, StatusCode } from "./errors.js";

/** "resume": back off, ask GetUploadStatus, continue from the committed size. "fail": final. */
export type RetryAction = "resume" | "fail";

interface RetryRule {
  code: StatusCode | "*";
  reason: string;
  action: RetryAction;
}

/** The rules, matched in order on code and reason; "*" matches anything, also no reason. */
export const RETRY_RULES: readonly RetryRule[] = [
  { code: "UNAVAILABLE", reason: "*", action: "resume" },
  { code: "DEADLINE_EXCEEDED", reason: "*", action: "resume" },
  { code: "INTERNAL", reason: "*", action: "resume" },
  { code: "UNKNOWN", reason: "*", action: "resume" },
  { code: "ABORTED", reason: "ANOTHER_WRITER", action: "resume" },
  { code: "OUT_OF_RANGE", reason: "OFFSET_MISMATCH", action: "resume" },
  { code: "DATA_LOSS", reason: "CHUNK_CHECKSUM_MISMATCH", action: "resume" },
  { code: "RESOURCE_EXHAUSTED", reason: "TENANT_LIMIT_EXCEEDED", action: "resume" },
  { code: "RESOURCE_EXHAUSTED", reason: "RATE_LIMITED", action: "resume" },
  { code: "RESOURCE_EXHAUSTED", reason: "SPOOL_EXHAUSTED", action: "resume" },
  { code: "*", reason: "*", action: "fail" },
];

/** The action for a status code and ErrorInfo reason ("" when there was none). */
export function retryAction(code: StatusCode, reason: string): RetryAction {
  for (const rule of RETRY_RULES) {
    if ((rule.code === "*" || rule.code === code) && (rule.reason === "*" || rule.reason === reason)) {
      return rule.action;
    }
  }
  return "fail";
}

/** Whether an upload resumes after `error`. */
export function isRetryable(error: RecgwError): boolean {
  return retryAction(error.code, error.reason) === "resume";
}

/** Exponential backoff with jitter; times in milliseconds. */
export interface BackoffPolicy {
  initialMs: number;
  multiplier: number;
  maxMs: number;
  /** Fraction by which each wait varies either way, 0 to 1. */
  jitter: number;
}

export const DEFAULT_BACKOFF: Readonly<BackoffPolicy> = Object.freeze({
  initialMs: 200,
  multiplier: 2,
  maxMs: 10_000,
  jitter: 0.2,
});

/** Default time without progress (no newly committed byte) after which an upload gives up. */
export const DEFAULT_OUTAGE_TOLERANCE_MS = 300_000;

/**
 * Milliseconds to wait before the `retry`-th consecutive retry (1-based):
 * initial * multiplier^(retry-1), at most max, varied by +-jitter.
 */
export function backoffMs(
  policy: BackoffPolicy,
  retry: number,
  random: () => number = Math.random,
): number {
  const exponent = Math.max(retry - 1, 0);
  const base = Math.min(policy.maxMs, policy.initialMs * Math.pow(policy.multiplier, exponent));
  const spread = base * policy.jitter * (2 * random() - 1);
  return Math.max(0, Math.min(policy.maxMs, base + spread));
}
