/**
 * @recgw/client: resumable streaming uploads to a recgw gateway over gRPC.
 *
 * Sizes are plain numbers (the generated messages carry int64 as bigint; every
 * recgw size stays below 2^53 and the conversion checks it).
 */
export { createClient, DEFAULT_TIMEOUT_MS, KEEPALIVE_INTERVAL_MS } from "./client.js";
export type { ClientOptions, RecgwClient, TlsOptions } from "./client.js";
export { CredentialsAdmin } from "./admin.js";
export type {
  CredentialsView,
  ServerSideEncryption,
  SetCredentialsInput,
  StorageTarget,
  VerifyResult,
} from "./admin.js";
export { RecgwError, ERROR_DOMAIN } from "./errors.js";
export type { StatusCode } from "./errors.js";
export { crc32c, crc32cImplementation, Checksummer } from "./checksums.js";
export type { ObjectChecksums } from "./checksums.js";
export { DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE } from "./framing.js";
export { DEFAULT_BACKOFF, DEFAULT_OUTAGE_TOLERANCE_MS, retryAction, isRetryable } from "./retry.js";
export type { BackoffPolicy, RetryAction } from "./retry.js";
export type { FileSource, UploadSource } from "./sources.js";
export type { AbortResult, SalvageResult, UploadResult, UploadState, UploadStatus } from "./types.js";
export { DEFAULT_HEARTBEAT_MS, DEFAULT_RETAIN_LIMIT, UPLOAD_ID_HEADER } from "./upload.js";
export type { RetryEvent, UploadOptions, UploadProgress, UploadStart } from "./upload.js";
