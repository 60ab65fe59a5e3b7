/**
 * How an upload's bytes become UploadRequest messages.
 *
 * Every stream opens with a message that carries `start` and the stream's
 * `write_offset` and no data. The bytes follow in messages of `chunkSize` bytes
 * (the last one shorter), each with its `write_offset` and `data_crc32c`; the
 * message with the last bytes also sets `finish_write` and the whole-object
 * checksums (an empty object: one message without data). To know which chunk is
 * the last, a full chunk is held until one more byte or the end of the source
 * arrives; a source that goes quiet gets what it produced sent after the
 * heartbeat time anyway (see FrameReader.flush), and an empty message when it
 * produced nothing, so the gateway never sees a live-but-slow writer as gone.
 */
import { create } from "@bufbuild/protobuf";
import {
  ObjectChecksumsSchema,
  type UploadRequest,
  UploadRequestSchema,
  type UploadStart,
  UploadStartSchema,
} from "./gen/recgw/v1/upload_pb.js";
import { crc32c, type ObjectChecksums } from "./checksums.js";

export const MiB = 1024 * 1024;
/** Default bytes of data per message. */
export const DEFAULT_CHUNK_SIZE = MiB;
/** The most data the gateway accepts in one message. */
export const MAX_CHUNK_SIZE = 4 * MiB;

/** What an upload creates (the public form of UploadStart). */
export interface StartFields {
  tenantId: string;
  objectName: string;
  contentType?: string | undefined;
  metadata?: Record<string, string> | undefined;
  expectedSize?: number | undefined;
  uploadId: string;
  /** Ask the gateway for the SHA-256 the client verifies (it computes it only when asked). */
  computeSha256?: boolean | undefined;
}

/** The UploadStart message; content type defaults to `application/octet-stream`. */
export function startMessage(fields: StartFields): UploadStart {
  const start = create(UploadStartSchema, {
    tenantId: fields.tenantId,
    objectName: fields.objectName,
    contentType: fields.contentType ?? "",
    metadata: { ...(fields.metadata ?? {}) },
    uploadId: fields.uploadId,
    computeSha256: fields.computeSha256 ?? false,
  });
  if (fields.expectedSize !== undefined) start.expectedSize = BigInt(fields.expectedSize);
  return start;
}

/** The first message of a stream: `start` at `writeOffset`, no data. */
export function startRequest(start: UploadStart, writeOffset: number): UploadRequest {
  return create(UploadRequestSchema, { start, writeOffset: BigInt(writeOffset) });
}

/**
 * A data message at `writeOffset`; with `perMessageCrc` it carries `data_crc32c`
 * (`dataCrc` when the caller computed it already). `finish` makes it the last
 * message, with the whole-object checksums if given.
 */
export function dataRequest(
  writeOffset: number,
  data: Uint8Array,
  perMessageCrc: boolean,
  finish?: { checksums?: ObjectChecksums | undefined },
  dataCrc?: number,
): UploadRequest {
  const request = create(UploadRequestSchema, { writeOffset: BigInt(writeOffset), data });
  // No data, no CRC (the finish or heartbeat message alone).
  if (perMessageCrc && data.length > 0) request.dataCrc32c = dataCrc ?? crc32c(data);
  if (finish !== undefined) {
    request.finishWrite = true;
    if (finish.checksums !== undefined) {
      request.objectChecksums = create(ObjectChecksumsSchema, {
        crc32c: finish.checksums.crc32c,
        sha256: finish.checksums.sha256 ?? new Uint8Array(0),
      });
    }
  }
  return request;
}

/** The next bytes of the object; `last` when nothing follows them. */
export interface Frame {
  data: Uint8Array;
  last: boolean;
}

const EMPTY = new Uint8Array(0);

type Outcome<T> = { kind: "value"; value: T } | { kind: "idle" } | { kind: "stopped" };

/** Waits for `promise`, at most `idleMs`, or until `stop` fires; the promise itself runs on. */
function race<T>(promise: Promise<T>, idleMs: number | undefined, stop: AbortSignal | undefined): Promise<Outcome<T>> {
  if (stop?.aborted) return Promise.resolve({ kind: "stopped" });
  return new Promise((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const onStop = (): void => {
      cleanup();
      resolve({ kind: "stopped" });
    };
    const cleanup = (): void => {
      if (timer !== undefined) clearTimeout(timer);
      stop?.removeEventListener("abort", onStop);
    };
    if (idleMs !== undefined) {
      timer = setTimeout(() => {
        cleanup();
        resolve({ kind: "idle" });
      }, idleMs);
    }
    stop?.addEventListener("abort", onStop, { once: true });
    promise.then(
      (value) => {
        cleanup();
        resolve({ kind: "value", value });
      },
      (error: unknown) => {
        cleanup();
        reject(error);
      },
    );
  });
}

/**
 * Cuts the chunks a source yields (any sizes) into frames of `chunkSize` bytes.
 * A read from the source that is still pending when a caller stops waiting
 * stays pending for the next caller: a live source is read exactly once.
 */
export class FrameReader {
  private queue: Uint8Array[] = [];
  private queued = 0;
  private inflight: Promise<IteratorResult<Uint8Array>> | undefined;
  private sourceDone = false;
  /** True once the last frame was returned. */
  ended = false;

  constructor(
    private readonly source: AsyncIterator<Uint8Array>,
    readonly chunkSize: number,
  ) {}

  /** Bytes read from the source but not yet returned in a frame. */
  get buffered(): number {
    return this.queued;
  }

  /**
   * The next frame; "idle" when none is ready within `idleMs`, "stopped" when
   * `stop` fires first. Rejects with the source's error.
   */
  async next(idleMs?: number, stop?: AbortSignal): Promise<Frame | "idle" | "stopped"> {
    if (this.ended) throw new Error("FrameReader: read after the last frame");
    for (;;) {
      const frame = this.take();
      if (frame !== undefined) return frame;
      this.inflight ??= this.source.next();
      const outcome = await race(this.inflight, idleMs, stop);
      if (outcome.kind !== "value") return outcome.kind;
      this.inflight = undefined;
      const result = outcome.value;
      if (result.done === true) {
        this.sourceDone = true;
        continue;
      }
      const chunk: unknown = result.value;
      if (!(chunk instanceof Uint8Array)) {
        throw new TypeError(
          `the upload source yielded ${typeof chunk === "string" ? "a string" : typeof chunk}; ` +
            "it must yield Uint8Array (or Buffer) chunks (do not set an encoding on a Readable)",
        );
      }
      if (chunk.length > 0) {
        this.queue.push(chunk);
        this.queued += chunk.length;
      }
    }
  }

  /** What is buffered (at most `chunkSize` bytes, possibly none), as a frame that is not the last. */
  flush(): Uint8Array {
    return this.cut(Math.min(this.queued, this.chunkSize));
  }

  /**
   * Tells the source that no more is read (a Readable is destroyed, a generator
   * returns), without waiting: an async generator stuck in a read would never answer.
   */
  close(): void {
    this.inflight?.catch(() => undefined);
    if (this.sourceDone) return;
    this.sourceDone = true;
    try {
      this.source.return?.()?.catch(() => undefined);
    } catch {
      // the source's own error was (or will be) reported by a read
    }
  }

  private take(): Frame | undefined {
    if (this.queued > this.chunkSize) return { data: this.cut(this.chunkSize), last: false };
    if (this.sourceDone) {
      this.ended = true;
      return { data: this.cut(this.queued), last: true };
    }
    return undefined;
  }

  private cut(length: number): Uint8Array {
    if (length === 0) return EMPTY;
    const first = this.queue[0]!;
    if (first.length >= length) {
      this.queued -= length;
      if (first.length === length) {
        this.queue.shift();
        return first;
      }
      this.queue[0] = first.subarray(length);
      return first.subarray(0, length);
    }
    const out = new Uint8Array(length);
    let filled = 0;
    while (filled < length) {
      const chunk = this.queue[0]!;
      const piece = Math.min(chunk.length, length - filled);
      out.set(chunk.subarray(0, piece), filled);
      filled += piece;
      if (piece === chunk.length) this.queue.shift();
      else this.queue[0] = chunk.subarray(piece);
    }
    this.queued -= length;
    return out;
  }
}
