/**
 * createClient: one HTTP/2 connection to a gateway (or one to each of several
 * replicas, balanced round robin), with the bearer token on every call,
 * keepalive pings, and TLS (optionally mTLS) unless plaintext is asked for
 * explicitly.
 */
import { readFileSync } from "node:fs";
import { type Client, createClient as createConnectClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import type { SecureClientSessionOptions } from "node:http2";
import { CredentialsAdmin } from "./admin.js";
import { BalancedTransport, replicaAddresses, type Replica } from "./balance.js";
import { toRecgwError } from "./errors.js";
import { CredentialsService } from "./gen/recgw/v1/credentials_pb.js";
import { UploadService } from "./gen/recgw/v1/upload_pb.js";
import type { UploadSource } from "./sources.js";
import {
  abortResult,
  salvageResult,
  uploadStatus,
  type AbortResult,
  type SalvageResult,
  type UploadResult,
  type UploadStatus,
} from "./types.js";
import { upload, type UploadOptions, type UploadStart } from "./upload.js";

/** Keepalive: a PING every 20 s on connections with open streams (the gateway allows >= 10 s). */
export const KEEPALIVE_INTERVAL_MS = 20_000;
const KEEPALIVE_TIMEOUT_MS = 10_000;
/** Default deadline of the unary calls (status, abort, salvage, credentials). */
export const DEFAULT_TIMEOUT_MS = 30_000;

export interface TlsOptions {
  /** PEM file of the CA that signed the gateway's certificate (default: the system's CAs). */
  caFile?: string;
  /** PEM client certificate for mTLS (with keyFile). */
  certFile?: string;
  /** PEM private key of certFile. */
  keyFile?: string;
  /** The name to verify the gateway's certificate against (and send as SNI), instead of the host. */
  serverName?: string;
}

export interface ClientOptions {
  /**
   * `host:port` of the gateway, or several replicas' `host:port` separated by
   * commas (the same as `addresses`).
   */
  address?: string;
  /**
   * Several gateway replicas sharing one PostgreSQL session store, each
   * `host:port`: the client keeps a connection to each, and every call (each
   * upload stream, each status query) goes to the next one that is up, so
   * uploads spread and a resume after a lost replica lands on a live one. Over
   * TLS each certificate is checked against the host of its address, unless
   * `tls.serverName` names one for all. Give either `address` or `addresses`.
   */
  addresses?: string[];
  /** Bearer token: role `uploader` for uploads, `admin` for credentialsAdmin. */
  token: string;
  /** TLS settings; TLS is used unless `plaintext` is true. */
  tls?: TlsOptions;
  /** Talk plaintext HTTP/2 (h2c): only for loopback or a trusted network, only when asked. */
  plaintext?: boolean;
  /** Deadline of unary calls; default 30 000 ms. */
  timeoutMs?: number;
}

export interface RecgwClient {
  /**
   * Streams `source` into the tenant's bucket as one object and resolves with
   * the finished object; resumes by itself after connection losses and
   * gateway restarts (see UploadOptions). Rejects with RecgwError, with the
   * source's own error, or with `signal.reason` when aborted.
   */
  upload(source: UploadSource, start: UploadStart, options?: UploadOptions): Promise<UploadResult>;
  /** State and committed size of an upload. */
  status(uploadId: string): Promise<UploadStatus>;
  /** Cancels an upload; nothing of it becomes visible. */
  abort(uploadId: string): Promise<AbortResult>;
  /** Keeps what an open upload has committed as an object; the upload ends SALVAGED. */
  salvage(uploadId: string): Promise<SalvageResult>;
  /** The credentials admin API (needs an `admin` token). */
  readonly credentialsAdmin: CredentialsAdmin;
  /** The generated Connect clients, with the token attached, for anything the API above lacks. */
  readonly services: {
    readonly upload: Client<typeof UploadService>;
    readonly credentials: Client<typeof CredentialsService>;
  };
  /** Closes the connection(s); calls in flight fail. */
  close(): void;
}

function tlsOptions(tls: TlsOptions | undefined): SecureClientSessionOptions {
  const options: SecureClientSessionOptions = {};
  if (tls?.caFile) options.ca = readFileSync(tls.caFile);
  if (tls?.certFile || tls?.keyFile) {
    if (!tls.certFile || !tls.keyFile) throw new TypeError("tls: certFile and keyFile go together (mTLS)");
    options.cert = readFileSync(tls.certFile);
    options.key = readFileSync(tls.keyFile);
  }
  if (tls?.serverName) options.servername = tls.serverName;
  return options;
}

/** A client of one gateway, or of several replicas (see `addresses`). */
export function createClient(options: ClientOptions): RecgwClient {
  if (options.address === "") throw new TypeError("address must be host:port (no scheme)");
  const addresses = replicaAddresses(options.address, options.addresses);
  const token = options.token.trim();
  if (!token) throw new TypeError("token is required");
  if (options.plaintext && options.tls !== undefined) throw new TypeError("plaintext and tls exclude each other");
  const sessionOptions = options.plaintext ? {} : tlsOptions(options.tls);
  const authorization: Interceptor = (next) => (request) => {
    request.header.set("authorization", `Bearer ${token}`);
    return next(request);
  };
  const replicas: Replica[] = addresses.map((address) => {
    const baseUrl = `${options.plaintext ? "http" : "https"}://${address}`;
    const session = new Http2SessionManager(
      baseUrl,
      { pingIntervalMs: KEEPALIVE_INTERVAL_MS, pingTimeoutMs: KEEPALIVE_TIMEOUT_MS },
      sessionOptions,
    );
    return { address, session, transport: createGrpcTransport({ baseUrl, sessionManager: session, interceptors: [authorization] }) };
  });
  const balanced = replicas.length > 1 ? new BalancedTransport(replicas) : undefined;
  const transport = balanced ?? replicas[0]!.transport;
  const uploads = createConnectClient(UploadService, transport);
  const credentials = createConnectClient(CredentialsService, transport);
  const secrets = [token];
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;

  async function unary<T>(uploadId: string, call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (error) {
      throw toRecgwError(error, secrets, uploadId);
    }
  }

  return {
    upload: (source, start, uploadOptions) =>
      upload({ service: uploads, secrets, timeoutMs }, source, start, uploadOptions),
    status: (uploadId) =>
      unary(uploadId, async () => uploadStatus(await uploads.getUploadStatus({ uploadId }, { timeoutMs }))),
    abort: (uploadId) =>
      unary(uploadId, async () => abortResult(await uploads.abortUpload({ uploadId }, { timeoutMs }))),
    salvage: (uploadId) =>
      unary(uploadId, async () => salvageResult(await uploads.salvageUpload({ uploadId }, { timeoutMs }))),
    credentialsAdmin: new CredentialsAdmin(credentials, secrets, timeoutMs),
    services: { upload: uploads, credentials },
    close: () => (balanced !== undefined ? balanced.close() : replicas[0]!.session.abort()),
    toString: () => `RecgwClient(${addresses.join(",")})`,
  } as RecgwClient;
}
