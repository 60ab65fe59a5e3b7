/**
 * A streaming upload that resumes by itself.
 *
 * - The client chooses the upload id (uuid4) so it is known, and handed to
 *   `onUploadId`, before any byte could be lost.
 * - The gateway makes bytes durable a part at a time (GetUploadStatus reports
 *   that `committed_size`); what it received beyond is lost when a stream
 *   breaks. So every byte from the committed size on is retained, and a failed
 *   stream (per the retry table) is followed by a backoff, a status query and a
 *   new stream whose first message repeats `start` at the committed size and
 *   which re-sends the retained bytes from there. The source is read once; each
 *   byte enters the whole-object checksums once, when it is read.
 * - Retries stop after `outageToleranceMs` without a newly committed byte.
 * - Memory: at most `retainLimit` bytes are retained; once half of it is held
 *   the committed size is polled to trim it, and at the limit reading pauses
 *   (backpressure to the source) until the gateway commits more.
 */
import { randomUUID } from "node:crypto";
import type { Client } from "@connectrpc/connect";
import { Checksummer, crc32c, type ObjectChecksums } from "./checksums.js";
import { RecgwError, toRecgwError } from "./errors.js";
import {
  dataRequest,
  DEFAULT_CHUNK_SIZE,
  FrameReader,
  MAX_CHUNK_SIZE,
  MiB,
  startMessage,
  startRequest,
} from "./framing.js";
import {
  type UploadRequest,
  type UploadResponse,
  type UploadService,
  type UploadStart as UploadStartMessage,
} from "./gen/recgw/v1/upload_pb.js";
import { RetainedBuffer } from "./retained.js";
import {
  type BackoffPolicy,
  backoffMs,
  DEFAULT_BACKOFF,
  DEFAULT_OUTAGE_TOLERANCE_MS,
  isRetryable,
} from "./retry.js";
import { openSource, skipPrefix, type OpenedSource, type UploadSource } from "./sources.js";
import { uploadResult, uploadStatus, type UploadResult, type UploadStatus } from "./types.js";

/** The response header that carries the upload id. */
export const UPLOAD_ID_HEADER = "x-recgw-upload-id";
/** Default bound on the bytes kept for re-sending. */
export const DEFAULT_RETAIN_LIMIT = 64 * MiB;
/** Default silence of the source after which an empty (or partial) message keeps the stream alive. */
export const DEFAULT_HEARTBEAT_MS = 2_000;
const DEFAULT_STALL_MS = 10_000;
const POLL_INITIAL_MS = 50;
const POLL_MAX_MS = 1_000;

/** What the upload creates. */
export interface UploadStart {
  tenantId: string;
  /** Object name relative to the tenant's prefix, e.g. `2026/11/28/call-42.webm`. */
  objectName: string;
  /** Default `application/octet-stream`. */
  contentType?: string;
  /** Stored as `x-amz-meta-*`. */
  metadata?: Record<string, string>;
  /** Total size, if known; defaults to the size of a Uint8Array or file source. */
  expectedSize?: number;
  /**
   * The upload id (a UUID). Default: a new uuid4. Naming an existing upload
   * resumes it: from a seekable source (Uint8Array, `{ path }`) the client asks
   * GetUploadStatus and continues at the committed size; a live source must
   * then start at the committed size, see `sourceOffset`.
   */
  uploadId?: string;
}

/** How far an upload got: bytes the gateway committed, bytes sent, total if known. */
export interface UploadProgress {
  committed: number;
  sent: number;
  total: number | undefined;
}

/** Passed to `onRetry` before a new stream opens. */
export interface RetryEvent {
  /** Number of the stream about to open (2 or more). */
  attempt: number;
  /** What ended the previous stream. */
  error: RecgwError;
  /** Offset the new stream starts at (the committed size). */
  resumeAt: number;
}

export interface UploadOptions {
  /** Cancels the upload locally (the upload stays open on the gateway for resuming). */
  signal?: AbortSignal;
  /** Called once with the upload id before the first stream opens, and again if the gateway names another. */
  onUploadId?: (uploadId: string) => void;
  /** Called after each message is sent and when the committed size grows. */
  onProgress?: (progress: UploadProgress) => void;
  /** Called before each resumed stream. */
  onRetry?: (event: RetryEvent) => void;
  /** Bytes kept for re-sending, at most; default 64 MiB. */
  retainLimit?: number;
  /** Give up after this long without a newly committed byte; default 300 000 ms. */
  outageToleranceMs?: number;
  /** Bytes of data per message; default 1 MiB, at most 4 MiB. */
  chunkSize?: number;
  /** Per-message CRC32C and whole-object CRC32C + SHA-256; default true. */
  checksums?: boolean;
  /**
   * For resuming an existing upload from a live source: the object offset of the
   * source's first byte. The upload continues at the committed size (which must
   * be at least this; bytes before it are skipped). The whole-object checksums
   * are then not sent (the client never saw the first bytes); per-message CRC32C still is.
   */
  sourceOffset?: number;
  /** Silence of the source after which a message is sent anyway; default 2000 ms. */
  heartbeatMs?: number;
  /** Backoff between retries; default 200 ms doubling to 10 s, +-20 %. */
  backoff?: Partial<BackoffPolicy>;
  /**
   * At the retain limit, how long the gateway may hold every byte sent without
   * committing any before the upload fails (its parts are larger than the limit
   * allows); default 10 000 ms.
   */
  stallTimeoutMs?: number;
}

/** What an upload needs of the client. */
export interface UploadDeps {
  service: Client<typeof UploadService>;
  secrets: readonly string[];
  timeoutMs: number;
}

type Resolved = Required<Omit<UploadOptions, "signal" | "onUploadId" | "onProgress" | "onRetry" | "sourceOffset" | "backoff">> & {
  backoff: BackoffPolicy;
};

/** Thrown out of a stream for failures that end the upload at once (the source's error, the retain limit). */
class Fatal {
  constructor(readonly error: unknown) {}
}

const EMPTY = new Uint8Array(0);
const FINAL_STATES = new Set(["ABORTED", "EXPIRED", "SALVAGED"]);

function sleep(ms: number, signal: AbortSignal | undefined): Promise<boolean> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve(false);
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve(true);
    }, ms);
    const onAbort = (): void => {
      clearTimeout(timer);
      resolve(false);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function resolveOptions(options: UploadOptions): Resolved {
  const chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
  if (!Number.isInteger(chunkSize) || chunkSize < 1 || chunkSize > MAX_CHUNK_SIZE) {
    throw new RangeError(`chunkSize must be an integer from 1 to ${MAX_CHUNK_SIZE} bytes`);
  }
  const retainLimit = options.retainLimit ?? DEFAULT_RETAIN_LIMIT;
  if (!(retainLimit >= chunkSize)) throw new RangeError("retainLimit must be at least chunkSize");
  const backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
  if (backoff.initialMs < 0 || backoff.maxMs < 0 || backoff.multiplier < 1 || backoff.jitter < 0 || backoff.jitter > 1) {
    throw new RangeError("backoff: times >= 0, multiplier >= 1, jitter from 0 to 1");
  }
  return {
    chunkSize,
    retainLimit,
    outageToleranceMs: options.outageToleranceMs ?? DEFAULT_OUTAGE_TOLERANCE_MS,
    checksums: options.checksums ?? true,
    heartbeatMs: options.heartbeatMs ?? DEFAULT_HEARTBEAT_MS,
    stallTimeoutMs: options.stallTimeoutMs ?? DEFAULT_STALL_MS,
    backoff,
  };
}

/** Streams `source` as one object, resuming after retryable failures; see UploadOptions. */
export async function upload(
  deps: UploadDeps,
  source: UploadSource,
  start: UploadStart,
  options: UploadOptions = {},
): Promise<UploadResult> {
  const resolved = resolveOptions(options);
  if (start.expectedSize !== undefined && !(Number.isSafeInteger(start.expectedSize) && start.expectedSize >= 0)) {
    throw new RangeError("expectedSize must be a non-negative integer");
  }
  if (options.sourceOffset !== undefined) {
    if (!(Number.isSafeInteger(options.sourceOffset) && options.sourceOffset >= 0)) {
      throw new RangeError("sourceOffset must be a non-negative integer");
    }
    if (!start.uploadId) throw new RangeError("sourceOffset resumes an existing upload: pass its uploadId");
  }
  options.signal?.throwIfAborted();
  const opened = await openSource(source);
  const run = new UploadRun(deps, opened, start, options, resolved);
  try {
    return await run.run();
  } finally {
    run.close();
  }
}

class UploadRun {
  private readonly message: UploadStartMessage;
  uploadId: string;
  private readonly signal: AbortSignal | undefined;
  private readonly checksummer: Checksummer | undefined;
  private wholeChecksums: boolean;
  private retained = new RetainedBuffer();
  private reader: FrameReader | undefined;
  private total: number | undefined;
  /** Highest committed size seen. */
  private committed = 0;
  /** Highest offset handed to a stream. */
  private sent = 0;
  private finishSent = false;
  /** Offset the current stream has reached; trimming never passes it. */
  private position = 0;
  /** The caller named the upload id: it may exist already. */
  private readonly resumeById: boolean;
  private streams = 0;
  private failures = 0;
  private outageSince: number | undefined;
  private fatal: Fatal | undefined;
  private refreshing: Promise<UploadStatus | undefined> | undefined;
  /** At the retain limit: since when the gateway holds every byte sent and commits none. */
  private stalledSince: number | undefined;
  private stallStart = -1;
  private queriedAt = 0;

  constructor(
    private readonly deps: UploadDeps,
    private readonly source: OpenedSource,
    start: UploadStart,
    private readonly options: UploadOptions,
    private readonly o: Resolved,
  ) {
    this.resumeById = Boolean(start.uploadId);
    this.uploadId = start.uploadId || randomUUID();
    this.total = start.expectedSize ?? (options.sourceOffset === undefined ? source.size : undefined);
    this.message = startMessage({
      ...start,
      contentType: start.contentType ?? "application/octet-stream",
      expectedSize: this.total,
      uploadId: this.uploadId,
      computeSha256: o.checksums,
    });
    this.signal = options.signal;
    this.wholeChecksums = o.checksums && options.sourceOffset === undefined;
    this.checksummer = this.wholeChecksums ? new Checksummer() : undefined;
  }

  close(): void {
    this.reader?.close();
  }

  private error(code: RecgwError["code"], message: string, reason = ""): RecgwError {
    return new RecgwError(code, message, { reason, uploadId: this.uploadId, attempts: this.streams });
  }

  // --- progress -------------------------------------------------------------------------

  private progress(): void {
    this.options.onProgress?.({ committed: this.committed, sent: this.sent, total: this.total });
  }

  private noteSent(offset: number): void {
    if (offset > this.sent) this.sent = offset;
    this.progress();
  }

  /** Records a committed size; growth restarts the outage clock and the backoff. */
  private observe(status: UploadStatus): void {
    if (status.committedSize > this.committed) {
      this.committed = status.committedSize;
      this.outageSince = undefined;
      this.failures = 0;
      this.progress();
    }
  }

  private announce(uploadId: string | null): void {
    if (uploadId === null || uploadId === "" || uploadId === this.uploadId) return;
    // The gateway's word decides which upload is resumed.
    this.uploadId = uploadId;
    this.message.uploadId = uploadId;
    this.options.onUploadId?.(uploadId);
  }

  // --- status ---------------------------------------------------------------------------

  private async status(): Promise<UploadStatus> {
    try {
      const response = await this.deps.service.getUploadStatus(
        { uploadId: this.uploadId },
        { signal: this.signal, timeoutMs: this.deps.timeoutMs },
      );
      return uploadStatus(response);
    } catch (error) {
      this.signal?.throwIfAborted();
      throw toRecgwError(error, this.deps.secrets, this.uploadId);
    }
  }

  /** A status query in the background whose committed size trims the retained bytes. */
  private refresh(): Promise<UploadStatus | undefined> {
    if (this.refreshing === undefined) {
      this.queriedAt = this.retained.end;
      const query = this.status().then(
        (status) => {
          if (status.state === "OPEN" || status.state === "FINISHING") {
            this.observe(status);
            this.retained.release(Math.min(status.committedSize, this.position));
          }
          return status;
        },
        () => undefined, // a broken stream reports the real problem
      );
      this.refreshing = query.finally(() => {
        this.refreshing = undefined;
      });
    }
    return this.refreshing;
  }

  private maybeTrim(): void {
    const limit = this.o.retainLimit;
    const step = Math.max(this.o.chunkSize, Math.floor(limit / 8));
    if (this.retained.size > limit / 2 && this.retained.end - this.queriedAt >= step) void this.refresh();
  }

  private hasRoom(): boolean {
    return this.retained.size + (this.reader?.buffered ?? 0) + this.o.chunkSize <= this.o.retainLimit;
  }

  /**
   * Waits until one more chunk fits the retain limit: "room", "stopped" when
   * `stop` fired first, "idle" after `heartbeatMs` (the stream needs a heartbeat).
   */
  private async makeRoom(stop: AbortSignal): Promise<"room" | "stopped" | "idle"> {
    if (this.hasRoom()) {
      this.stalledSince = undefined;
      return "room";
    }
    const waitingSince = Date.now();
    let delay = POLL_INITIAL_MS;
    for (;;) {
      const status = await this.refresh();
      if (stop.aborted) return "stopped";
      if (this.hasRoom()) {
        this.stalledSince = undefined;
        return "room";
      }
      if (this.retained.start !== this.stallStart) {
        this.stallStart = this.retained.start;
        this.stalledSince = undefined;
      } else if (status !== undefined && status.receivedSize >= this.sent) {
        this.stalledSince ??= Date.now();
        if (Date.now() - this.stalledSince >= this.o.stallTimeoutMs) {
          throw new Fatal(
            this.error(
              "RESOURCE_EXHAUSTED",
              `upload ${this.uploadId}: the retained buffer is full (retainLimit ${this.o.retainLimit} bytes) and ` +
                `the gateway has committed nothing for ${this.o.stallTimeoutMs} ms although it holds every byte ` +
                "sent: its parts are larger than the limit allows; raise retainLimit",
            ),
          );
        }
      } else {
        this.stalledSince = undefined;
      }
      if (Date.now() - waitingSince >= this.o.heartbeatMs) return "idle";
      if (!(await sleep(Math.min(delay, this.o.heartbeatMs), stop))) return "stopped";
      delay = Math.min(delay * 2, POLL_MAX_MS);
    }
  }

  // --- one stream -----------------------------------------------------------------------

  private finishChecksums(): { checksums: ObjectChecksums | undefined } {
    return { checksums: this.checksummer?.result() };
  }

  private async *requests(resumeAt: number, stop: AbortSignal): AsyncGenerator<UploadRequest> {
    const { chunkSize, checksums: crc, heartbeatMs } = this.o;
    const reader = this.reader!;
    let offset = resumeAt;
    this.position = offset;
    yield startRequest(this.message, resumeAt);
    // What the gateway had received but not committed: from the retained buffer.
    while (offset < this.retained.end) {
      const piece = this.retained.read(offset, chunkSize);
      const last = reader.ended && offset + piece.length === this.retained.end;
      if (last) this.finishSent = true;
      yield dataRequest(offset, piece, crc, last ? this.finishChecksums() : undefined);
      offset += piece.length;
      this.position = offset;
      this.noteSent(offset);
      if (last) return;
    }
    if (reader.ended) {
      this.finishSent = true;
      yield dataRequest(offset, EMPTY, crc, this.finishChecksums());
      return;
    }
    for (;;) {
      const room = await this.makeRoom(stop);
      if (room === "stopped") return;
      if (room === "idle") {
        // Reading is paused for memory; the stream must not look dead meanwhile.
        yield dataRequest(offset, EMPTY, crc);
        continue;
      }
      let next;
      try {
        next = await reader.next(heartbeatMs, stop);
      } catch (error) {
        throw new Fatal(error);
      }
      if (next === "stopped") return;
      const data = next === "idle" ? reader.flush() : next.data;
      const last = next !== "idle" && next.last;
      // One CRC32C pass per chunk: the message's, combined into the object's.
      const dataCrc = crc && data.length > 0 ? crc32c(data) : undefined;
      this.checksummer?.update(data, dataCrc);
      this.retained.append(data);
      if (last) this.finishSent = true;
      yield dataRequest(offset, data, crc, last ? this.finishChecksums() : undefined, dataCrc);
      offset += data.length;
      this.position = offset;
      this.noteSent(offset);
      if (last) return;
      this.maybeTrim();
    }
  }

  /** One stream from `resumeAt`; throws RecgwError, Fatal, or the signal's reason. */
  private async stream(resumeAt: number): Promise<UploadResponse> {
    this.streams++;
    const stop = new AbortController();
    const onAbort = (): void => stop.abort(this.signal?.reason);
    this.signal?.addEventListener("abort", onAbort, { once: true });
    const requests = this.requests(resumeAt, stop.signal);
    const guarded = (async function* (run: UploadRun) {
      try {
        yield* requests;
      } catch (error) {
        // Only failures of our own; Connect also throws the stream's errors in here.
        if (error instanceof Fatal) run.fatal = error;
        throw error;
      }
    })(this);
    try {
      const response = await this.deps.service.upload(guarded, {
        signal: stop.signal,
        timeoutMs: 0, // a stream lives as long as the recording
        onHeader: (headers) => this.announce(headers.get(UPLOAD_ID_HEADER)),
      });
      if (!this.finishSent) {
        throw this.error("UNKNOWN", "the gateway ended the upload before all data was sent");
      }
      return response;
    } catch (error) {
      if (this.fatal !== undefined) throw this.fatal;
      this.signal?.throwIfAborted();
      if (error instanceof RecgwError) throw error;
      const failure = toRecgwError(error, this.deps.secrets, this.uploadId);
      failure.uploadId = this.uploadId;
      failure.attempts = this.streams;
      throw failure;
    } finally {
      stop.abort();
      this.signal?.removeEventListener("abort", onAbort);
    }
  }

  // --- the whole upload -----------------------------------------------------------------

  async run(): Promise<UploadResult> {
    try {
      const done = await this.prepare();
      if (done !== undefined) return done;
      this.options.onUploadId?.(this.uploadId);
      let resumeAt = this.retained.start;
      for (;;) {
        let failure: RecgwError;
        try {
          const response = await this.stream(resumeAt);
          return this.checked(uploadResult(response, this.uploadId));
        } catch (error) {
          if (error instanceof Fatal) throw error.error;
          if (!(error instanceof RecgwError)) throw error;
          failure = error;
        }
        if (!isRetryable(failure)) throw failure;
        const next = await this.recover(failure);
        if (typeof next !== "number") return next;
        resumeAt = next;
        this.options.onRetry?.({ attempt: this.streams + 1, error: failure, resumeAt });
      }
    } catch (error) {
      if (error instanceof RecgwError) {
        error.uploadId ??= this.uploadId;
        error.attempts = Math.max(error.attempts, this.streams);
      }
      throw error;
    }
  }

  /**
   * Opens the source; for an upload id given by the caller, continues where the
   * gateway is. Returns the result when that upload is complete already.
   */
  private async prepare(): Promise<UploadResult | undefined> {
    let committed = 0;
    if (this.resumeById) {
      const status = await this.statusForStart();
      if (status !== undefined) {
        if (status.state === "COMPLETE" || status.state === "COMPLETION_UNCONFIRMED") {
          if (status.result === undefined) throw this.error("UNKNOWN", `upload ${this.uploadId} is complete but the gateway gave no result`);
          return status.result;
        }
        if (FINAL_STATES.has(status.state)) throw this.endedError(status);
        committed = status.committedSize;
      }
    }
    const sourceOffset = this.options.sourceOffset;
    let chunks: AsyncIterator<Uint8Array>;
    if (sourceOffset !== undefined) {
      if (committed < sourceOffset) {
        throw this.error(
          "FAILED_PRECONDITION",
          `upload ${this.uploadId} has ${committed} bytes committed but the source starts at offset ${sourceOffset}: ` +
            `supply the bytes from offset ${committed} on`,
        );
      }
      chunks = this.source.open(0, this.o.chunkSize);
      if (committed > sourceOffset) chunks = skipPrefix(chunks, committed - sourceOffset, new Checksummer());
    } else if (committed === 0) {
      chunks = this.source.open(0, this.o.chunkSize);
    } else if (!this.source.seekable) {
      throw this.error(
        "FAILED_PRECONDITION",
        `upload ${this.uploadId} has ${committed} bytes committed and the source cannot seek there: pass a ` +
          "seekable source (a Uint8Array or { path }), or a source of the bytes from offset " +
          `${committed} on with the option sourceOffset: ${committed}`,
      );
    } else if (this.checksummer !== undefined) {
      chunks = skipPrefix(this.source.open(0, this.o.chunkSize), committed, this.checksummer);
    } else {
      chunks = this.source.open(committed, this.o.chunkSize);
    }
    this.reader = new FrameReader(chunks, this.o.chunkSize);
    this.retained = new RetainedBuffer(committed);
    this.committed = committed;
    this.sent = committed;
    this.queriedAt = committed;
    return undefined;
  }

  /** GetUploadStatus of a caller-named upload, retried like a stream; undefined when unknown. */
  private async statusForStart(): Promise<UploadStatus | undefined> {
    for (;;) {
      try {
        const status = await this.status();
        if (status.state !== "FINISHING") return status;
      } catch (error) {
        const failure = error as RecgwError;
        if (failure.code === "NOT_FOUND") return undefined;
        if (!isRetryable(failure)) throw failure;
        this.outageSince ??= Date.now();
        if (Date.now() - this.outageSince > this.o.outageToleranceMs) throw failure;
      }
      this.failures++;
      if (!(await sleep(backoffMs(this.o.backoff, this.failures), this.signal))) this.signal?.throwIfAborted();
    }
  }

  private endedError(status: UploadStatus): RecgwError {
    const why = status.errorMessage ? `: ${status.errorMessage}` : "";
    return this.error(
      "FAILED_PRECONDITION",
      `upload ${this.uploadId} has ended (${status.state})${why}; start a new upload with a new upload id`,
      "UPLOAD_ENDED",
    );
  }

  /**
   * After a retryable failure: backoff, GetUploadStatus, until the upload can go
   * on. Returns the offset to resume at, or the result of a completed upload.
   */
  private async recover(failure: RecgwError): Promise<number | UploadResult> {
    let error = failure;
    for (;;) {
      this.outageSince ??= Date.now();
      const waited = Date.now() - this.outageSince;
      if (waited > this.o.outageToleranceMs) {
        throw new RecgwError(
          error.code,
          `${error.message} (gave up: nothing newly committed for ${Math.round(waited / 1000)} s, ` +
            `the outage tolerance is ${this.o.outageToleranceMs / 1000} s)`,
          { reason: error.reason, metadata: { ...error.metadata }, uploadId: this.uploadId, attempts: this.streams },
        );
      }
      this.failures++;
      if (!(await sleep(backoffMs(this.o.backoff, this.failures), this.signal))) this.signal?.throwIfAborted();
      let status: UploadStatus;
      try {
        status = await this.status();
      } catch (queryError) {
        const failed = queryError as RecgwError;
        if (failed.code === "NOT_FOUND") {
          // The gateway never recorded the start (or forgot the upload).
          if (this.retained.start === 0) return 0;
          throw this.error(
            "NOT_FOUND",
            `the gateway no longer knows upload ${this.uploadId}, and its first ${this.retained.start} bytes ` +
              "are no longer held to send again",
            failed.reason,
          );
        }
        if (!isRetryable(failed)) throw failed;
        error = failed;
        continue;
      }
      this.observe(status);
      if (status.state === "COMPLETE" || status.state === "COMPLETION_UNCONFIRMED") return this.settle(status);
      if (FINAL_STATES.has(status.state)) throw this.endedError(status);
      if (status.state === "FINISHING") continue; // all data is in; ask again after the backoff
      const committed = status.committedSize;
      if (committed < this.retained.start || committed > this.retained.end) {
        throw this.error(
          "DATA_LOSS",
          `cannot resume upload ${this.uploadId}: the gateway has committed ${committed} bytes but the client ` +
            `holds bytes ${this.retained.start} to ${this.retained.end} only`,
        );
      }
      this.position = committed;
      this.retained.release(committed);
      return committed;
    }
  }

  private settle(status: UploadStatus): UploadResult {
    if (!this.finishSent) {
      throw this.error(
        "FAILED_PRECONDITION",
        `upload ${this.uploadId} was completed by another stream before this client sent all its data`,
        "UPLOAD_COMPLETE",
      );
    }
    if (status.result === undefined) {
      throw this.error("UNKNOWN", `upload ${this.uploadId} is complete but the gateway gave no result`);
    }
    return this.checked(status.result);
  }

  /** The result, if it describes the bytes read and hashed. */
  private checked(result: UploadResult): UploadResult {
    let problem = "";
    if (this.reader?.ended && result.size !== this.retained.end) {
      problem = `the gateway stored ${result.size} bytes, the client sent ${this.retained.end}`;
    } else if (this.checksummer !== undefined) {
      const mine = this.checksummer.result();
      const theirs = result.checksums;
      if (
        (theirs.crc32c !== undefined && theirs.crc32c !== mine.crc32c) ||
        (theirs.sha256 !== undefined && Buffer.compare(theirs.sha256, mine.sha256) !== 0)
      ) {
        problem = "the gateway's checksums differ from those of the bytes sent";
      }
    }
    if (problem) throw this.error("DATA_LOSS", `upload ${this.uploadId}: ${problem}`);
    return result;
  }
}
