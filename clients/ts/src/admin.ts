/**
 * The credentials admin API: a tenant's S3 credentials are written, described,
 * verified and deleted, never read back. Needs a token of role `admin`.
 */
import type { Client } from "@connectrpc/connect";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { toRecgwError } from "./errors.js";
import {
  type CredentialsService,
  type CredentialsView as CredentialsViewMessage,
  ServerSideEncryptionMode,
  type StorageTarget as StorageTargetMessage,
} from "./gen/recgw/v1/credentials_pb.js";
import { toNumber } from "./types.js";

/** Server-side encryption applied to every write of the tenant. */
export interface ServerSideEncryption {
  mode: "UNSPECIFIED" | "S3" | "KMS";
  /** KMS key id or ARN, with mode KMS (empty: the account's default key). */
  kmsKeyId?: string;
}

/** Where and how a tenant's objects are written (no secret). */
export interface StorageTarget {
  region: string;
  bucket: string;
  /** Default `uploads/`; must end with `/`. */
  prefix?: string;
  /** For S3-compatible stores; empty for AWS. */
  endpointUrl?: string;
  forcePathStyle?: boolean;
  encryption?: ServerSideEncryption;
  allowOverwrite?: boolean;
  equalPartSizes?: boolean;
}

/** The non-secret view of stored credentials. */
export interface CredentialsView {
  tenantId: string;
  /** Grows with every overwrite. */
  version: number;
  updateTime: Date | undefined;
  /** The access key id masked to its last 4 characters, e.g. `****WXYZ`. */
  accessKeyIdHint: string;
  target: Required<Omit<StorageTarget, "encryption">> & { encryption: ServerSideEncryption };
}

/** Whether a test write with the stored credentials succeeded. */
export interface VerifyResult {
  ok: boolean;
  /** Key of the test object. */
  key: string;
  /** S3 error code when not ok, e.g. `AccessDenied`. */
  errorCode: string;
  /** What to fix when not ok. */
  errorMessage: string;
}

export interface SetCredentialsInput {
  tenantId: string;
  accessKeyId: string;
  /**
   * The secret access key. Pass a Uint8Array (UTF-8) to wipe it yourself after
   * the call (`secret.fill(0)`); the client keeps no reference to it. (A string
   * copy lives for the duration of the call: the message field is a string.)
   */
  secretAccessKey: Uint8Array | string;
  target: StorageTarget;
}

const MODES = ["UNSPECIFIED", "S3", "KMS"] as const;

function view(message: CredentialsViewMessage | undefined): CredentialsView {
  const target: StorageTargetMessage | undefined = message?.target;
  return {
    tenantId: message?.tenantId ?? "",
    version: toNumber(message?.version ?? 0n, "version"),
    updateTime: message?.updateTime ? timestampDate(message.updateTime) : undefined,
    accessKeyIdHint: message?.accessKeyIdHint ?? "",
    target: {
      region: target?.region ?? "",
      bucket: target?.bucket ?? "",
      prefix: target?.prefix ?? "",
      endpointUrl: target?.endpointUrl ?? "",
      forcePathStyle: target?.forcePathStyle ?? false,
      encryption: {
        mode: MODES[target?.encryption?.mode ?? 0] ?? "UNSPECIFIED",
        kmsKeyId: target?.encryption?.kmsKeyId ?? "",
      },
      allowOverwrite: target?.allowOverwrite ?? false,
      equalPartSizes: target?.equalPartSizes ?? false,
    },
  };
}

/** CredentialsService calls; errors are RecgwError with no secret in them. */
export class CredentialsAdmin {
  constructor(
    private readonly service: Client<typeof CredentialsService>,
    private readonly secrets: readonly string[],
    private readonly timeoutMs: number,
  ) {}

  /** Creates or overwrites the tenant's credentials; returns what was stored (no secret). */
  async set(input: SetCredentialsInput): Promise<CredentialsView> {
    let secret =
      typeof input.secretAccessKey === "string"
        ? input.secretAccessKey
        : new TextDecoder("utf-8", { fatal: true }).decode(input.secretAccessKey);
    const encryption = input.target.encryption;
    try {
      const response = await this.service.setCredentials(
        {
          tenantId: input.tenantId,
          accessKeyId: input.accessKeyId,
          secretAccessKey: secret,
          target: {
            region: input.target.region,
            bucket: input.target.bucket,
            prefix: input.target.prefix ?? "",
            endpointUrl: input.target.endpointUrl ?? "",
            forcePathStyle: input.target.forcePathStyle ?? false,
            allowOverwrite: input.target.allowOverwrite ?? false,
            equalPartSizes: input.target.equalPartSizes ?? false,
            encryption:
              encryption === undefined
                ? undefined
                : { mode: ServerSideEncryptionMode[encryption.mode], kmsKeyId: encryption.kmsKeyId ?? "" },
          },
        },
        { timeoutMs: this.timeoutMs },
      );
      return view(response.credentials);
    } catch (error) {
      throw toRecgwError(error, [...this.secrets, secret]);
    } finally {
      secret = "";
    }
  }

  /** The non-secret view; RecgwError NOT_FOUND (CREDENTIALS_NOT_FOUND) when none are stored. */
  async describe(tenantId: string): Promise<CredentialsView> {
    try {
      const response = await this.service.describeCredentials({ tenantId }, { timeoutMs: this.timeoutMs });
      return view(response.credentials);
    } catch (error) {
      throw toRecgwError(error, this.secrets);
    }
  }

  /** Removes the tenant's credentials, all versions. */
  async delete(tenantId: string): Promise<void> {
    try {
      await this.service.deleteCredentials({ tenantId }, { timeoutMs: this.timeoutMs });
    } catch (error) {
      throw toRecgwError(error, this.secrets);
    }
  }

  /** Writes a tiny test object with the stored credentials to prove they can write. */
  async verify(tenantId: string): Promise<VerifyResult> {
    try {
      const response = await this.service.verifyCredentials({ tenantId }, { timeoutMs: this.timeoutMs });
      return {
        ok: response.ok,
        key: response.key,
        errorCode: response.errorCode,
        errorMessage: response.errorMessage,
      };
    } catch (error) {
      throw toRecgwError(error, this.secrets);
    }
  }

  toString(): string {
    return "CredentialsAdmin";
  }
}
