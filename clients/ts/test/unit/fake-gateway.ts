/**
 * An in-process stand-in for the generated UploadService client, for unit tests
 * of the upload state machine (resume, trimming, heartbeats) without a network.
 * It keeps the gateway's rules: offsets must match, bytes become committed a
 * part at a time, uncommitted bytes are dropped when a stream breaks, finish
 * verifies the object checksums. The end-to-end tests use the real gateway.
 */
import { createHash } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { crc32c } from "../../dist/checksums.js";
import { ErrorInfoSchema } from "../../dist/gen/google/rpc/error_details_pb.js";
import {
  GetUploadStatusResponseSchema,
  type UploadRequest,
  type UploadResponse,
  UploadResponseSchema,
  UploadState,
} from "../../dist/gen/recgw/v1/upload_pb.js";
import type { UploadDeps } from "../../dist/upload.js";

export function gatewayError(code: Code, reason: string, message = reason, metadata: Record<string, string> = {}): ConnectError {
  return new ConnectError(message, code, undefined, [
    { desc: ErrorInfoSchema, value: { reason, domain: "recgw.v1", metadata } },
  ]);
}

export interface FakeUpload {
  id: string;
  state: UploadState;
  bytes: Buffer;
  committed: number;
  result: UploadResponse | undefined;
}

/** A hook run before each message is taken in; a thrown error ends the stream with it. */
export type MessageHook = (message: UploadRequest, upload: FakeUpload | undefined, stream: number) => void | Promise<void>;

export class FakeGateway {
  readonly uploads = new Map<string, FakeUpload>();
  /** Every message of every stream, by stream number (1-based). */
  readonly streams: UploadRequest[][] = [];
  statusCalls = 0;
  partSize = 4;
  /** Return true to commit parts as they fill (default); false holds everything received. */
  commits = true;
  onMessage: MessageHook | undefined;
  /** Overrides GetUploadStatus: return an error to throw it, undefined for the normal answer. */
  onStatus: ((upload: FakeUpload | undefined, call: number) => ConnectError | undefined) | undefined;
  /** Lose the response of a completed upload (the stream fails after the object is complete). */
  loseResponse = false;
  /** Completion answers as unconfirmed. */
  unconfirmed = false;

  deps(): UploadDeps {
    return { service: this as unknown as UploadDeps["service"], secrets: ["secret-token-123"], timeoutMs: 1000 };
  }

  async upload(
    requests: AsyncIterable<UploadRequest>,
    options: { signal?: AbortSignal; onHeader?: (headers: Headers) => void },
  ): Promise<UploadResponse> {
    const messages: UploadRequest[] = [];
    this.streams.push(messages);
    const stream = this.streams.length;
    let upload: FakeUpload | undefined;
    const iterator = requests[Symbol.asyncIterator]();
    const aborted = new Promise<never>((_, reject) => {
      const fail = (): void => reject(new ConnectError("the operation was aborted", Code.Canceled));
      if (options.signal?.aborted) fail();
      options.signal?.addEventListener("abort", fail, { once: true });
    });
    aborted.catch(() => undefined);
    try {
      for (;;) {
        const next = await Promise.race([iterator.next(), aborted]);
        if (next.done === true) throw gatewayError(Code.Aborted, "STREAM_ENDED_WITHOUT_FINISH");
        const message = next.value;
        messages.push(message);
        await this.onMessage?.(message, upload, stream);
        if (upload === undefined) {
          if (message.start === undefined) throw gatewayError(Code.InvalidArgument, "STREAM_OUT_OF_ORDER");
          const id = message.start.uploadId;
          upload = this.uploads.get(id);
          if (upload === undefined) {
            upload = { id, state: UploadState.OPEN, bytes: Buffer.alloc(0), committed: 0, result: undefined };
            this.uploads.set(id, upload);
          }
          if (upload.state === UploadState.COMPLETE) {
            if (message.finishWrite && message.data.length === 0 && upload.result) return upload.result;
            throw gatewayError(Code.FailedPrecondition, "UPLOAD_COMPLETE");
          }
          if (upload.state !== UploadState.OPEN) throw gatewayError(Code.FailedPrecondition, "UPLOAD_ENDED");
          options.onHeader?.(new Headers({ "x-recgw-upload-id": id }));
        }
        const offset = Number(message.writeOffset);
        if (offset !== upload.bytes.length) {
          throw gatewayError(Code.OutOfRange, "OFFSET_MISMATCH", "wrong offset", {
            committed_size: String(upload.committed),
          });
        }
        if (message.dataCrc32c !== undefined && crc32c(message.data) !== message.dataCrc32c) {
          throw gatewayError(Code.DataLoss, "CHUNK_CHECKSUM_MISMATCH");
        }
        upload.bytes = Buffer.concat([upload.bytes, message.data]);
        if (this.commits) upload.committed = Math.floor(upload.bytes.length / this.partSize) * this.partSize;
        if (message.finishWrite) return this.finish(upload, message);
      }
    } catch (error) {
      if (upload !== undefined && upload.state === UploadState.OPEN) {
        upload.bytes = upload.bytes.subarray(0, upload.committed); // uncommitted bytes are lost
      }
      throw error;
    }
  }

  private finish(upload: FakeUpload, message: UploadRequest): UploadResponse {
    const sha256 = createHash("sha256").update(upload.bytes).digest();
    const crc = crc32c(upload.bytes);
    const sums = message.objectChecksums;
    if (sums && ((sums.crc32c !== undefined && sums.crc32c !== crc) || (sums.sha256.length && !sha256.equals(sums.sha256)))) {
      throw gatewayError(Code.DataLoss, "OBJECT_CHECKSUM_MISMATCH");
    }
    upload.committed = upload.bytes.length;
    upload.state = this.unconfirmed ? UploadState.COMPLETION_UNCONFIRMED : UploadState.COMPLETE;
    upload.result = create(UploadResponseSchema, {
      uploadId: upload.id,
      bucket: "bucket",
      key: `uploads/${upload.id}`,
      size: BigInt(upload.bytes.length),
      etag: "etag",
      checksums: { crc32c: crc, sha256 },
      unconfirmed: this.unconfirmed,
    });
    if (this.loseResponse) throw new ConnectError("connection reset", Code.Unavailable);
    return upload.result;
  }

  async getUploadStatus(request: { uploadId: string }): Promise<unknown> {
    this.statusCalls++;
    const upload = this.uploads.get(request.uploadId);
    const override = this.onStatus?.(upload, this.statusCalls);
    if (override !== undefined) throw override;
    if (upload === undefined) throw gatewayError(Code.NotFound, "UPLOAD_NOT_FOUND");
    return create(GetUploadStatusResponseSchema, {
      uploadId: upload.id,
      state: upload.state,
      committedSize: BigInt(upload.committed),
      receivedSize: BigInt(upload.bytes.length),
      result: upload.result,
    });
  }

  /** Data messages of a stream as [offset, length, finish]. */
  layout(stream: number): [number, number, boolean][] {
    return (this.streams[stream - 1] ?? [])
      .filter((message) => message.start === undefined)
      .map((message) => [Number(message.writeOffset), message.data.length, message.finishWrite]);
  }
}
