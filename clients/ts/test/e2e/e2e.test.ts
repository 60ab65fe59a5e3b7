/**
 * End to end against the live stack of tests/e2e_stack.py (real gateway,
 * OpenBao, moto with IAM enforced, a cuttable loopback proxy):
 *
 *     .venv/bin/python -m tests.e2e_stack -- npm --prefix clients/ts run test:e2e
 *
 * Skipped when RECGW_E2E_ADDRESS is unset. The tests share one gateway (cuts and
 * restarts hit every connection), so they run one at a time.
 */
import assert from "node:assert/strict";
import { createHash, randomUUID } from "node:crypto";
import { describe, test } from "node:test";
import { createClient, RecgwError, type RecgwClient } from "../../dist/index.js";
import { toRecgwError } from "../../dist/errors.js";
import { dataRequest, startMessage, startRequest } from "../../dist/framing.js";
import type { UploadRequest } from "../../dist/gen/recgw/v1/upload_pb.js";

const env = process.env;
const ADDRESS = env["RECGW_E2E_ADDRESS"];
const MiB = 1024 * 1024;
const skip = ADDRESS ? false : "RECGW_E2E_ADDRESS is unset (run through tests.e2e_stack)";

function need(name: string): string {
  const value = env[name];
  if (!value) throw new Error(`${name} is unset`);
  return value;
}

async function control(path: string, method = "POST"): Promise<Response> {
  const response = await fetch(`${need("RECGW_E2E_CONTROL")}${path}`, { method });
  if (!response.ok && response.status !== 404) throw new Error(`control ${path}: HTTP ${response.status}`);
  return response;
}

async function storedObject(bucket: string, key: string): Promise<Buffer | undefined> {
  const response = await control(`/object?bucket=${encodeURIComponent(bucket)}&key=${encodeURIComponent(key)}`, "GET");
  return response.status === 404 ? undefined : Buffer.from(await response.arrayBuffer());
}

function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

function sha(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** A live recording: 1 MiB chunks; before the chunk at each gate offset it awaits the gate's action. */
async function* recording(data: Uint8Array, gates: Record<number, () => Promise<unknown>> = {}): AsyncGenerator<Uint8Array> {
  for (let offset = 0; offset < data.length; offset += MiB) {
    const gate = gates[offset];
    if (gate !== undefined) await gate();
    yield data.slice(offset, offset + MiB);
  }
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (let delay = 20; ; delay = Math.min(delay * 2, 500)) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

describe("e2e against a live gateway", { skip, concurrency: 1, timeout: 180_000 }, () => {
  const uploader = (): RecgwClient =>
    createClient({ address: need("RECGW_E2E_ADDRESS"), token: need("RECGW_E2E_UPLOADER_TOKEN"), plaintext: true });
  const tenant = (): string => need("RECGW_E2E_TENANT");
  const bucket = (): string => need("RECGW_E2E_BUCKET");
  const name = (label: string): string => `ts-e2e/${label}-${randomUUID().slice(0, 8)}.bin`;

  async function assertStored(key: string, data: Uint8Array): Promise<void> {
    const stored = await storedObject(bucket(), key);
    assert.ok(stored !== undefined, `object ${key} exists`);
    assert.equal(stored.length, data.length);
    assert.equal(sha(stored), sha(data), "the stored object is byte-exact");
  }

  test("a small upload is byte-exact", async () => {
    const client = uploader();
    try {
      const data = pattern(1000, 1);
      const ids: string[] = [];
      const result = await client.upload(data, { tenantId: tenant(), objectName: name("small"), contentType: "audio/ogg" }, {
        onUploadId: (id) => ids.push(id),
      });
      assert.deepEqual(ids, [result.uploadId]);
      assert.equal(result.size, 1000);
      assert.equal(Buffer.from(result.checksums.sha256!).toString("hex"), sha(data));
      await assertStored(result.key, data);
      const status = await client.status(result.uploadId);
      assert.equal(status.state, "COMPLETE");
      assert.equal(status.committedSize, 1000);
    } finally {
      client.close();
    }
  });

  test("a 12 MiB live upload becomes a multi-part object, byte-exact", async () => {
    const client = uploader();
    try {
      const data = pattern(12 * MiB, 2);
      const progress: number[] = [];
      const result = await client.upload(recording(data), { tenantId: tenant(), objectName: name("multi") }, {
        onProgress: (p) => progress.push(p.sent),
      });
      assert.ok(result.partCount >= 3, `part count ${result.partCount}`);
      assert.equal(progress.at(-1), data.length);
      assert.equal(Buffer.from(result.checksums.sha256!).toString("hex"), sha(data));
      await assertStored(result.key, data);
    } finally {
      client.close();
    }
  });

  test("a stream cut mid-upload resumes by itself", async () => {
    const client = uploader();
    try {
      const data = pattern(12 * MiB, 3);
      const resumedAt: number[] = [];
      const source = recording(data, { [7 * MiB]: () => control("/cut") });
      const result = await client.upload(source, { tenantId: tenant(), objectName: name("cut") }, {
        onRetry: (event) => resumedAt.push(event.resumeAt),
        backoff: { initialMs: 50 },
      });
      assert.ok(resumedAt.length >= 1, "the upload resumed");
      assert.ok(resumedAt.every((offset) => offset % (5 * MiB) === 0), `resumed at part boundaries: ${resumedAt}`);
      await assertStored(result.key, data);
    } finally {
      client.close();
    }
  });

  test("the gateway killed and restarted mid-upload: the upload finishes after it", async () => {
    const client = uploader();
    try {
      const data = pattern(12 * MiB, 4);
      const resumedAt: number[] = [];
      // Killed, and started again while the client is already retrying (status queries fail meanwhile).
      let restarted: Promise<Response> | undefined;
      const source = recording(data, {
        [8 * MiB]: async () => {
          await control("/gateway/kill");
          restarted = control("/gateway/start");
        },
      });
      const result = await client.upload(source, { tenantId: tenant(), objectName: name("restart") }, {
        onRetry: (event) => resumedAt.push(event.resumeAt),
        backoff: { initialMs: 50, maxMs: 500 }, // scaled down: the restart takes seconds
      });
      await restarted;
      assert.ok(resumedAt.length >= 1, "the upload resumed");
      assert.equal(result.size, data.length);
      await assertStored(result.key, data);
    } finally {
      client.close();
    }
  });

  test("a wrong offset gets OUT_OF_RANGE with the committed size; the client resumes there", async () => {
    const client = uploader();
    try {
      const data = pattern(7 * MiB, 5);
      const uploadId = randomUUID();
      const start = startMessage({ tenantId: tenant(), objectName: name("offset"), uploadId, computeSha256: true });
      // A raw stream writes 6 MiB (one 5 MiB part) and dies without finishing.
      const stop = new AbortController();
      async function* partial(): AsyncGenerator<UploadRequest> {
        yield startRequest(start, 0);
        for (let offset = 0; offset < 6 * MiB; offset += MiB) yield dataRequest(offset, data.subarray(offset, offset + MiB), true);
        await new Promise((resolve) => stop.signal.addEventListener("abort", resolve)); // hold the stream open
      }
      const first = client.services.upload.upload(partial(), { signal: stop.signal }).catch((error: unknown) => error);
      await waitFor("the first part to be committed", async () => {
        const status = await client.status(uploadId).catch(() => undefined);
        return status !== undefined && status.committedSize === 5 * MiB ? status : undefined;
      });
      stop.abort();
      await first;
      // A stream at the wrong offset is refused with the facts to resume.
      async function* wrong(): AsyncGenerator<UploadRequest> {
        yield startRequest(start, 0);
        yield dataRequest(0, data.subarray(0, MiB), true);
      }
      const refused = await waitFor("OUT_OF_RANGE", async () => {
        const error = toRecgwError(await client.services.upload.upload(wrong()).catch((e: unknown) => e));
        return error.code === "ABORTED" && error.reason === "ANOTHER_WRITER" ? undefined : error;
      });
      assert.equal(refused.code, "OUT_OF_RANGE");
      assert.equal(refused.reason, "OFFSET_MISMATCH");
      assert.equal(refused.metadataInt("committed_size"), 5 * MiB);
      // The client resumes the upload id from a seekable source at the committed size.
      const retries: number[] = [];
      const result = await client.upload(data, { tenantId: tenant(), objectName: start.objectName, uploadId }, {
        onRetry: (event) => retries.push(event.resumeAt),
        backoff: { initialMs: 50 },
      });
      assert.equal(result.uploadId, uploadId);
      assert.equal(Buffer.from(result.checksums.sha256!).toString("hex"), sha(data));
      await assertStored(result.key, data);
    } finally {
      client.close();
    }
  });

  test("salvage keeps the committed bytes; the upload has then ended", async (t) => {
    const client = uploader();
    try {
      const data = pattern(6 * MiB, 10);
      const uploadId = randomUUID();
      const objectName = name("salvage");
      const start = startMessage({ tenantId: tenant(), objectName, uploadId });
      const stop = new AbortController();
      async function* partial(): AsyncGenerator<UploadRequest> {
        yield startRequest(start, 0);
        for (let offset = 0; offset < data.length; offset += MiB) yield dataRequest(offset, data.subarray(offset, offset + MiB), true);
        await new Promise((resolve) => stop.signal.addEventListener("abort", resolve));
      }
      const first = client.services.upload.upload(partial(), { signal: stop.signal }).catch((error: unknown) => error);
      await waitFor("the first part to be committed", async () => {
        const status = await client.status(uploadId).catch(() => undefined);
        return status !== undefined && status.committedSize === 5 * MiB ? status : undefined;
      });
      stop.abort();
      await first;
      const salvaged = await waitFor("the salvage", () =>
        client.salvage(uploadId).catch((error: unknown) => {
          // The gateway may not have noticed the stream's end yet.
          if (error instanceof RecgwError && error.code === "ABORTED" && error.reason === "ANOTHER_WRITER") return undefined;
          if (error instanceof RecgwError && error.code === "UNIMPLEMENTED") return "unimplemented" as const;
          throw error;
        }),
      );
      if (salvaged === "unimplemented") {
        await client.abort(uploadId);
        t.skip("the gateway does not implement SalvageUpload yet (UNIMPLEMENTED)");
        return;
      }
      assert.equal(salvaged.state, "SALVAGED");
      assert.equal(salvaged.result?.size, 5 * MiB);
      await assertStored(salvaged.result!.key, data.subarray(0, 5 * MiB));
      await assert.rejects(client.upload(data, { tenantId: tenant(), objectName, uploadId }), (error: unknown) => {
        assert.ok(error instanceof RecgwError);
        assert.equal(error.code, "FAILED_PRECONDITION");
        assert.equal(error.reason, "UPLOAD_ENDED");
        assert.match(error.message, /SALVAGED/);
        return true;
      });
    } finally {
      client.close();
    }
  });

  test("abort while data flows: the upload fails as aborted and no object appears", async () => {
    const client = uploader();
    try {
      const data = pattern(10 * MiB, 6);
      let uploadId = "";
      const objectName = name("abort");
      const source = recording(data, {
        [3 * MiB]: async () => {
          // The gateway may still be opening the upload (Vault, the session store) while bytes flow.
          await waitFor("the upload to be open", () => client.status(uploadId).catch(() => undefined));
          const aborted = await client.abort(uploadId);
          assert.equal(aborted.state, "ABORTED");
        },
      });
      const error = await client
        .upload(source, { tenantId: tenant(), objectName }, { onUploadId: (id) => (uploadId = id) })
        .then(() => undefined, (e: unknown) => e);
      assert.ok(error instanceof RecgwError, `an error: ${String(error)}`);
      assert.ok(
        (error.code === "ABORTED" && error.reason === "UPLOAD_ABORTED") ||
          (error.code === "FAILED_PRECONDITION" && error.reason === "UPLOAD_ENDED"),
        `${error.code} ${error.reason}: ${error.message}`,
      );
      assert.equal(error.uploadId, uploadId);
      assert.equal((await client.status(uploadId)).state, "ABORTED");
      assert.equal(await storedObject(bucket(), `uploads/${objectName}`), undefined);
    } finally {
      client.close();
    }
  });

  test("a bad token: UNAUTHENTICATED, TOKEN_INVALID", async () => {
    const client = createClient({ address: need("RECGW_E2E_ADDRESS"), token: "not-a-valid-token-CANARY", plaintext: true });
    try {
      for (const call of [
        () => client.upload(pattern(10, 7), { tenantId: tenant(), objectName: name("badtoken") }),
        () => client.status(randomUUID()),
      ]) {
        await assert.rejects(call(), (error: unknown) => {
          assert.ok(error instanceof RecgwError);
          assert.equal(error.code, "UNAUTHENTICATED");
          assert.equal(error.reason, "TOKEN_INVALID");
          assert.ok(!error.message.includes("not-a-valid-token-CANARY"));
          return true;
        });
      }
    } finally {
      client.close();
    }
  });

  test("a tenant without credentials: FAILED_PRECONDITION, CREDENTIALS_NOT_FOUND", async () => {
    const client = uploader();
    try {
      await assert.rejects(
        client.upload(pattern(10, 8), { tenantId: `nocreds-${randomUUID().slice(0, 8)}`, objectName: name("nocreds") }),
        (error: unknown) => {
          assert.ok(error instanceof RecgwError);
          assert.equal(error.code, "FAILED_PRECONDITION");
          assert.equal(error.reason, "CREDENTIALS_NOT_FOUND");
          assert.equal(error.attempts, 1, "not retried");
          return true;
        },
      );
    } finally {
      client.close();
    }
  });

  test("checksum mismatches: DATA_LOSS for a corrupted message and for a wrong object checksum", async () => {
    const client = uploader();
    try {
      const data = pattern(1000, 9);
      const objectName = name("checksum");
      const start = startMessage({ tenantId: tenant(), objectName, uploadId: randomUUID(), computeSha256: true });
      async function* corrupted(): AsyncGenerator<UploadRequest> {
        yield startRequest(start, 0);
        const message = dataRequest(0, data, true);
        message.dataCrc32c = (message.dataCrc32c! ^ 1) >>> 0;
        yield message;
      }
      const chunk = toRecgwError(await client.services.upload.upload(corrupted()).catch((e: unknown) => e));
      assert.equal(chunk.code, "DATA_LOSS");
      assert.equal(chunk.reason, "CHUNK_CHECKSUM_MISMATCH");
      const start2 = startMessage({ tenantId: tenant(), objectName, uploadId: randomUUID(), computeSha256: true });
      async function* wrongObject(): AsyncGenerator<UploadRequest> {
        yield startRequest(start2, 0);
        yield dataRequest(0, data, true, { checksums: { crc32c: 1, sha256: new Uint8Array(32) } });
      }
      const whole = toRecgwError(await client.services.upload.upload(wrongObject()).catch((e: unknown) => e));
      assert.equal(whole.code, "DATA_LOSS");
      assert.equal(whole.reason, "OBJECT_CHECKSUM_MISMATCH");
      assert.equal(await storedObject(bucket(), `uploads/${objectName}`), undefined, "no object was created");
    } finally {
      client.close();
    }
  });

  test("credentials admin: set, describe, verify, delete; no secret in any error or log", async () => {
    const created = (await (await control("/tenant")).json()) as {
      tenant_id: string;
      bucket: string;
      access_key_id: string;
      secret_access_key: string;
      region: string;
      endpoint_url: string;
    };
    const admin = createClient({ address: need("RECGW_E2E_ADDRESS"), token: need("RECGW_E2E_ADMIN_TOKEN"), plaintext: true });
    const notAdmin = uploader();
    const secretText = created.secret_access_key;
    try {
      const target = {
        region: created.region,
        bucket: created.bucket,
        endpointUrl: created.endpoint_url,
        forcePathStyle: true,
      };
      const secret = new TextEncoder().encode(secretText);
      const view = await admin.credentialsAdmin.set({
        tenantId: created.tenant_id,
        accessKeyId: created.access_key_id,
        secretAccessKey: secret,
        target,
      });
      secret.fill(0);
      assert.equal(view.tenantId, created.tenant_id);
      assert.ok(view.accessKeyIdHint.endsWith(created.access_key_id.slice(-4)));
      assert.ok(!JSON.stringify(view).includes(secretText));
      const described = await admin.credentialsAdmin.describe(created.tenant_id);
      assert.equal(described.target.bucket, created.bucket);
      assert.ok(described.version >= view.version);
      const verified = await admin.credentialsAdmin.verify(created.tenant_id);
      assert.equal(verified.ok, true, `${verified.errorCode} ${verified.errorMessage}`);
      // A refused set: the error carries no secret.
      const refused = await admin.credentialsAdmin
        .set({ tenantId: `BAD TENANT ${secretText}`, accessKeyId: created.access_key_id, secretAccessKey: secretText, target })
        .then(() => undefined, (e: unknown) => e);
      assert.ok(refused instanceof RecgwError);
      assert.equal(refused.code, "INVALID_ARGUMENT");
      assert.equal(refused.reason, "INVALID_FIELD");
      assert.ok(!`${refused.message} ${String(refused)} ${JSON.stringify(refused.metadata)}`.includes(secretText));
      // Only admins.
      await assert.rejects(notAdmin.credentialsAdmin.describe(created.tenant_id), (error: unknown) => {
        assert.ok(error instanceof RecgwError);
        assert.equal(error.code, "PERMISSION_DENIED");
        assert.equal(error.reason, "ROLE_NOT_ALLOWED");
        return true;
      });
      await admin.credentialsAdmin.delete(created.tenant_id);
      await assert.rejects(admin.credentialsAdmin.describe(created.tenant_id), (error: unknown) => {
        assert.ok(error instanceof RecgwError);
        assert.equal(error.code, "NOT_FOUND");
        assert.equal(error.reason, "CREDENTIALS_NOT_FOUND");
        return true;
      });
      const logs = await (await control("/logs", "GET")).text();
      assert.ok(logs.length > 0);
      for (const canary of [secretText, need("RECGW_E2E_ADMIN_TOKEN"), need("RECGW_E2E_UPLOADER_TOKEN")]) {
        assert.ok(!logs.includes(canary), "no secret in the gateway's log");
      }
    } finally {
      admin.close();
      notAdmin.close();
    }
  });
});
