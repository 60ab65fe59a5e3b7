/**
 * The client's public result types and their conversion from the generated
 * messages. Sizes are `number`: protobuf-es gives int64 fields as `bigint`, and
 * every size recgw handles stays far below 2^53 (S3 objects end at 5 TiB), so
 * the conversion checks the bound and callers never deal with bigint.
 */
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { ObjectChecksums } from "./checksums.js";
import {
  type AbortUploadResponse,
  type GetUploadStatusResponse,
  type ObjectChecksums as ObjectChecksumsMessage,
  type SalvageUploadResponse,
  type UploadResponse,
  UploadState as UploadStateEnum,
} from "./gen/recgw/v1/upload_pb.js";

/** Life-cycle state of an upload (the UploadState names without their prefix). */
export type UploadState =
  | "UNSPECIFIED"
  | "OPEN"
  | "FINISHING"
  | "COMPLETE"
  | "ABORTED"
  | "EXPIRED"
  | "COMPLETION_UNCONFIRMED"
  | "SALVAGED";

/** The finished object. */
export interface UploadResult {
  uploadId: string;
  bucket: string;
  /** Full object key: the tenant's prefix and the object name. */
  key: string;
  size: number;
  etag: string;
  versionId: string;
  /** 0 when the object was written with a single PutObject. */
  partCount: number;
  /** What the gateway computed over the bytes it received. */
  checksums: ObjectChecksums;
  /**
   * True when S3's answer to the completion was lost and could not be confirmed
   * (state COMPLETION_UNCONFIRMED): the object is very likely complete; `etag`
   * and `checksums` are what the gateway expects, to compare with the object.
   */
  unconfirmed: boolean;
}

/** What GetUploadStatus reports. */
export interface UploadStatus {
  uploadId: string;
  state: UploadState;
  /** Bytes durably written to S3 parts (all bytes, once complete). */
  committedSize: number;
  /** Bytes the gateway received so far. */
  receivedSize: number;
  tenantId: string;
  key: string;
  /** The finished (or salvaged) object. */
  result: UploadResult | undefined;
  /** Why the upload ended, when ABORTED or EXPIRED. */
  errorMessage: string;
  createTime: Date | undefined;
  updateTime: Date | undefined;
}

/** What AbortUpload did; `detail` explains anything left in S3. */
export interface AbortResult {
  state: UploadState;
  storageAborted: boolean;
  detail: string;
}

/** What SalvageUpload kept. */
export interface SalvageResult {
  state: UploadState;
  result: UploadResult | undefined;
}

/** An int64 as a number; throws past 2^53, which no recgw size reaches. */
export function toNumber(value: bigint, field: string): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER)) {
    throw new RangeError(`${field} ${value} does not fit a JavaScript number`);
  }
  return Number(value);
}

export function stateName(state: UploadStateEnum): UploadState {
  const name = UploadStateEnum[state] as string | undefined;
  return (name ?? "UNSPECIFIED") as UploadState;
}

function checksums(message: ObjectChecksumsMessage | undefined): ObjectChecksums {
  const out: ObjectChecksums = {};
  if (message?.crc32c !== undefined) out.crc32c = message.crc32c;
  if (message !== undefined && message.sha256.length > 0) out.sha256 = message.sha256;
  return out;
}

export function uploadResult(response: UploadResponse, uploadId = ""): UploadResult {
  return {
    uploadId: response.uploadId || uploadId,
    bucket: response.bucket,
    key: response.key,
    size: toNumber(response.size, "size"),
    etag: response.etag,
    versionId: response.versionId,
    partCount: response.partCount,
    checksums: checksums(response.checksums),
    unconfirmed: response.unconfirmed,
  };
}

function date(stamp: Timestamp | undefined): Date | undefined {
  return stamp === undefined ? undefined : timestampDate(stamp);
}

export function uploadStatus(response: GetUploadStatusResponse): UploadStatus {
  const state = stateName(response.state);
  const result = response.result === undefined ? undefined : uploadResult(response.result, response.uploadId);
  if (result !== undefined && state === "COMPLETION_UNCONFIRMED") result.unconfirmed = true;
  return {
    uploadId: response.uploadId,
    state,
    committedSize: toNumber(response.committedSize, "committed_size"),
    receivedSize: toNumber(response.receivedSize, "received_size"),
    tenantId: response.tenantId,
    key: response.key,
    result,
    errorMessage: response.errorMessage,
    createTime: date(response.createTime),
    updateTime: date(response.updateTime),
  };
}

export function abortResult(response: AbortUploadResponse): AbortResult {
  return {
    state: stateName(response.state),
    storageAborted: response.storageAborted,
    detail: response.detail,
  };
}

export function salvageResult(response: SalvageUploadResponse): SalvageResult {
  return {
    state: stateName(response.state),
    result: response.result === undefined ? undefined : uploadResult(response.result),
  };
}
