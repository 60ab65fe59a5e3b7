/**
 * RecgwError: the one error type of the client, a gRPC status with the gateway's
 * structured reason (google.rpc.ErrorInfo, domain "recgw.v1").
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** Canonical gRPC status code names, as used by the retry table and every recgw client. */
export type StatusCode =
  | "OK"
  | "CANCELLED"
  | "UNKNOWN"
  | "INVALID_ARGUMENT"
  | "DEADLINE_EXCEEDED"
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "PERMISSION_DENIED"
  | "RESOURCE_EXHAUSTED"
  | "FAILED_PRECONDITION"
  | "ABORTED"
  | "OUT_OF_RANGE"
  | "UNIMPLEMENTED"
  | "INTERNAL"
  | "UNAVAILABLE"
  | "DATA_LOSS"
  | "UNAUTHENTICATED";

const CODE_NAMES: readonly StatusCode[] = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
];

/** The ErrorInfo domain of the gateway's reasons. */
export const ERROR_DOMAIN = "recgw.v1";

const REDACTED = "[REDACTED]";
// Shorter values could match ordinary words of a message.
const MIN_REDACT_LENGTH = 8;

/** Replaces each secret (of at least 8 characters) in `text` by "[REDACTED]". */
export function redact(text: string, secrets: readonly string[]): string {
  let out = text;
  for (const secret of secrets) {
    if (secret.length >= MIN_REDACT_LENGTH) out = out.split(secret).join(REDACTED);
  }
  return out;
}

export interface RecgwErrorInit {
  reason?: string;
  metadata?: Record<string, string>;
  uploadId?: string;
  attempts?: number;
}

/**
 * A call failed: `code` is the gRPC status (canonical name, e.g. "UNAVAILABLE"),
 * `message` the gateway's explanation (for people; it may change), `reason` the
 * ErrorReason name without its `ERROR_REASON_` prefix (e.g. "OFFSET_MISMATCH";
 * "" when the status carried none, e.g. a connection failure), `metadata` the
 * ErrorInfo facts such as `committed_size`. Decide on `code` and `reason`, never
 * on `message`. `uploadId` names the upload an upload error is about, so it can
 * be inspected, resumed or aborted later; `attempts` counts the streams an
 * upload opened before it gave up.
 */
export class RecgwError extends Error {
  override readonly name = "RecgwError";
  readonly code: StatusCode;
  readonly grpcCode: number;
  readonly reason: string;
  readonly metadata: Readonly<Record<string, string>>;
  uploadId: string | undefined;
  attempts: number;

  constructor(code: StatusCode, message: string, init: RecgwErrorInit = {}) {
    super(message);
    this.code = code;
    this.grpcCode = Math.max(0, CODE_NAMES.indexOf(code));
    this.reason = init.reason ?? "";
    this.metadata = Object.freeze({ ...(init.metadata ?? {}) });
    this.uploadId = init.uploadId ?? this.metadata["upload_id"];
    this.attempts = init.attempts ?? 1;
  }

  /** "CODE (REASON): message", as printed. */
  override toString(): string {
    const reason = this.reason ? ` (${this.reason})` : "";
    return `${this.name}: ${this.code}${reason}: ${this.message}`;
  }

  /** An integer from `metadata` (e.g. `committed_size`), or undefined. */
  metadataInt(key: string): number | undefined {
    const value = this.metadata[key];
    if (value === undefined || !/^\d+$/.test(value)) return undefined;
    return Number(value);
  }
}

/** The canonical name of a Connect code (the gRPC status numbers). */
export function statusCodeName(code: Code | number): StatusCode {
  return CODE_NAMES[code] ?? "UNKNOWN";
}

/**
 * Whether a status without the gateway's ErrorInfo came from the local transport
 * rather than from the gateway. gRPC core reports a lost connection as
 * UNAVAILABLE; Connect maps Node's socket errors otherwise (ECONNRESET and a
 * destroyed stream to ABORTED, other errors to INTERNAL, and Node's RST_STREAM
 * CANCEL for every stream of a dead connection to CANCELLED), and these carry
 * the Node error as their cause. A caller's own cancellation is reported as its
 * AbortSignal's reason before this is asked.
 */
function isConnectionFailure(error: ConnectError): boolean {
  if (error.code === Code.Canceled) return true;
  const cause = error.cause as { code?: unknown } | undefined;
  return typeof cause === "object" && cause !== null && typeof cause.code === "string";
}

/**
 * A RecgwError for anything a call threw: a ConnectError's status and ErrorInfo
 * (the first with domain recgw.v1), or UNKNOWN for anything else. Any of
 * `secrets` in the message is redacted.
 */
export function toRecgwError(
  error: unknown,
  secrets: readonly string[] = [],
  uploadId?: string,
): RecgwError {
  if (error instanceof RecgwError) return error;
  const connect = ConnectError.from(error);
  let reason = "";
  let metadata: Record<string, string> = {};
  for (const info of connect.findDetails(ErrorInfoSchema)) {
    if (info.domain === ERROR_DOMAIN) {
      reason = info.reason;
      metadata = { ...info.metadata };
      break;
    }
  }
  let code = statusCodeName(connect.code);
  let message = redact(connect.rawMessage, secrets);
  if (reason === "" && code !== "UNAVAILABLE" && isConnectionFailure(connect)) {
    code = "UNAVAILABLE";
    message = `connection lost (${message})`;
  }
  return new RecgwError(code, message, {
    reason,
    metadata,
    uploadId: metadata["upload_id"] ?? uploadId,
  });
}

export { Code };
