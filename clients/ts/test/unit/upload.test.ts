/** The upload state machine against the in-process fake gateway: framing, resume, limits. */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { describe, test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { RecgwError } from "../../dist/errors.js";
import { UploadState } from "../../dist/gen/recgw/v1/upload_pb.js";
import { upload, type UploadOptions } from "../../dist/upload.js";
import { ramp } from "../testdata.js";
import { FakeGateway, gatewayError } from "./fake-gateway.js";

const START = { tenantId: "acme", objectName: "call.webm" };
const FAST: UploadOptions = { backoff: { initialMs: 1, maxMs: 5 }, chunkSize: 4 };

function sha(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** A live source: yields `data` in `piece`-byte chunks, awaiting `gate(offset)` before each. */
async function* live(data: Uint8Array, piece: number, gate?: (offset: number) => Promise<void> | void): AsyncGenerator<Uint8Array> {
  for (let offset = 0; offset < data.length; offset += piece) {
    await gate?.(offset);
    yield data.slice(offset, offset + piece);
  }
}

describe("upload against the fake gateway", { timeout: 10_000 }, () => {
  test("messages: start alone, then chunks with CRC32C, finish with the last chunk and the object checksums", async () => {
    const gateway = new FakeGateway();
    const data = ramp(10);
    const ids: string[] = [];
    const result = await upload(gateway.deps(), data, START, { ...FAST, onUploadId: (id) => ids.push(id) });
    assert.equal(gateway.streams.length, 1);
    const [first] = gateway.streams[0]!;
    assert.equal(first!.start?.tenantId, "acme");
    assert.equal(first!.start?.expectedSize, 10n, "a Uint8Array's size is the expected size");
    assert.equal(first!.data.length, 0);
    assert.match(first!.start!.uploadId, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.deepEqual(ids, [first!.start!.uploadId], "the id is handed out before the first stream");
    assert.deepEqual(gateway.layout(1), [
      [0, 4, false],
      [4, 4, false],
      [8, 2, true],
    ]);
    assert.ok(gateway.streams[0]!.slice(1).every((m) => m.dataCrc32c !== undefined));
    assert.equal(result.size, 10);
    assert.equal(Buffer.from(result.checksums.sha256!).toString("hex"), sha(data));
    assert.equal(result.unconfirmed, false);
  });

  test("checksums: false sends neither per-message nor object checksums", async () => {
    const gateway = new FakeGateway();
    await upload(gateway.deps(), ramp(10), START, { ...FAST, checksums: false });
    const messages = gateway.streams[0]!;
    assert.ok(messages.every((m) => m.dataCrc32c === undefined && m.objectChecksums === undefined));
  });

  test("an empty object is one start and one finish message", async () => {
    const gateway = new FakeGateway();
    const result = await upload(gateway.deps(), live(new Uint8Array(0), 1), START, FAST);
    assert.deepEqual(gateway.layout(1), [[0, 0, true]]);
    assert.equal(result.size, 0);
  });

  test("a file source streams from disk with its size as expected_size", async () => {
    const dir = await mkdtemp(join(tmpdir(), "recgw-ts-"));
    try {
      const data = ramp(100_000);
      await writeFile(join(dir, "a.bin"), data);
      const gateway = new FakeGateway();
      const result = await upload(gateway.deps(), { path: join(dir, "a.bin") }, START, { chunkSize: 65536 });
      assert.equal(gateway.streams[0]![0]!.start?.expectedSize, 100_000n);
      assert.equal(sha(gateway.uploads.values().next().value!.bytes), sha(data));
      assert.equal(result.size, 100_000);
    } finally {
      await rm(dir, { recursive: true });
    }
  });

  test("a Readable is read once; a string chunk is refused clearly", async () => {
    const gateway = new FakeGateway();
    const data = ramp(1000);
    await upload(gateway.deps(), Readable.from([data.slice(0, 300), data.slice(300)]), START, { chunkSize: 256 });
    assert.equal(sha(gateway.uploads.values().next().value!.bytes), sha(data));
    await assert.rejects(
      upload(new FakeGateway().deps(), Readable.from(["text"]), START, FAST),
      (error: Error) => error instanceof TypeError && /Uint8Array/.test(error.message),
    );
  });

  test("a broken stream resumes from the committed size and re-sends the retained bytes", async () => {
    const gateway = new FakeGateway();
    const data = ramp(20);
    gateway.onMessage = (message, _upload, stream) => {
      if (stream === 1 && Number(message.writeOffset) === 12) throw new ConnectError("connection reset", Code.Unavailable);
    };
    const retries: number[] = [];
    const result = await upload(gateway.deps(), live(data, 3), START, {
      ...FAST,
      onRetry: (event) => retries.push(event.resumeAt),
    });
    assert.equal(gateway.streams.length, 2);
    assert.deepEqual(retries, [12]);
    const resumed = gateway.streams[1]!;
    assert.equal(Number(resumed[0]!.writeOffset), 12, "the new stream starts at the committed size");
    assert.equal(resumed[0]!.start?.uploadId, gateway.streams[0]![0]!.start?.uploadId, "same upload id");
    assert.equal(sha(gateway.uploads.values().next().value!.bytes), sha(data));
    assert.equal(result.size, 20);
  });

  test("a connection lost under the stream (Node's RST_STREAM CANCEL, no reason) resumes like UNAVAILABLE", async () => {
    const gateway = new FakeGateway();
    gateway.onMessage = (message, _upload, stream) => {
      if (stream === 1 && Number(message.writeOffset) === 8) {
        throw new ConnectError("http/2 stream closed with error code CANCEL (0x8)", Code.Canceled);
      }
    };
    const result = await upload(gateway.deps(), live(ramp(12), 4), START, FAST);
    assert.equal(gateway.streams.length, 2);
    assert.equal(result.size, 12);
  });

  test("a socket error under the stream (Connect's ABORTED for ECONNRESET, no reason) resumes like UNAVAILABLE", async () => {
    const gateway = new FakeGateway();
    gateway.onMessage = (message, _upload, stream) => {
      if (stream === 1 && Number(message.writeOffset) === 8) {
        const reset = Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET" });
        throw new ConnectError("read ECONNRESET", Code.Aborted, undefined, undefined, reset);
      }
    };
    const retried: string[] = [];
    const result = await upload(gateway.deps(), live(ramp(12), 4), START, {
      ...FAST,
      onRetry: (event) => retried.push(event.error.code),
    });
    assert.deepEqual(retried, ["UNAVAILABLE"]);
    assert.equal(result.size, 12);
  });

  test("OFFSET_MISMATCH (a part landed after the status query) is answered by a status query and a correct resume", async () => {
    const gateway = new FakeGateway();
    const data = ramp(24);
    const state = () => gateway.uploads.values().next().value!;
    gateway.onMessage = (message, _upload, stream) => {
      if (stream === 1 && Number(message.writeOffset) === 16) throw new ConnectError("reset", Code.Unavailable);
      if (stream === 2 && message.start !== undefined) {
        // The part the client believed uncommitted lands just now: the gateway is at 16, the stream at 12.
        state().committed = 16;
        state().bytes = Buffer.from(data.subarray(0, 16));
      }
    };
    gateway.onStatus = (upload, call) => {
      if (upload !== undefined && call === 1) {
        upload.committed = 12; // the first status query still says 12
        upload.bytes = Buffer.from(data.subarray(0, 12));
      }
      return undefined;
    };
    const result = await upload(gateway.deps(), live(data, 4), START, FAST);
    assert.equal(gateway.streams.length, 3);
    assert.equal(Number(gateway.streams[1]![0]!.writeOffset), 12);
    assert.equal(gateway.statusCalls, 2, "the OUT_OF_RANGE was answered by a status query");
    assert.equal(Number(gateway.streams[2]![0]!.writeOffset), 16, "resumed at the committed size the status gave");
    assert.equal(sha(state().bytes), sha(data));
    assert.equal(result.size, 24);
  });

  test("a final status (PERMISSION_DENIED ACCESS_DENIED) fails at once with code, reason, metadata and upload id", async () => {
    const gateway = new FakeGateway();
    gateway.onMessage = () => {
      throw gatewayError(Code.PermissionDenied, "ACCESS_DENIED", "S3 denied UploadPart", { operation: "UploadPart" });
    };
    await assert.rejects(upload(gateway.deps(), ramp(10), START, FAST), (error: unknown) => {
      assert.ok(error instanceof RecgwError);
      assert.equal(error.code, "PERMISSION_DENIED");
      assert.equal(error.reason, "ACCESS_DENIED");
      assert.equal(error.metadata["operation"], "UploadPart");
      assert.equal(error.message, "S3 denied UploadPart");
      assert.equal(error.uploadId, gateway.streams[0]![0]!.start?.uploadId);
      assert.equal(error.attempts, 1);
      return true;
    });
    assert.equal(gateway.statusCalls, 0);
  });

  test("the response lost after completion: the status query returns the result", async () => {
    const gateway = new FakeGateway();
    gateway.loseResponse = true;
    const result = await upload(gateway.deps(), ramp(10), START, FAST);
    assert.equal(gateway.streams.length, 1);
    assert.equal(result.size, 10);
  });

  test("COMPLETION_UNCONFIRMED is a result with unconfirmed set", async () => {
    const gateway = new FakeGateway();
    gateway.loseResponse = true;
    gateway.unconfirmed = true;
    const result = await upload(gateway.deps(), ramp(10), START, FAST);
    assert.equal(result.unconfirmed, true);
  });

  test("an upload ABORTED meanwhile is a final UPLOAD_ENDED error", async () => {
    const gateway = new FakeGateway();
    gateway.onMessage = (message, state) => {
      if (Number(message.writeOffset) === 8 && state) {
        state.state = UploadState.ABORTED;
        throw new ConnectError("reset", Code.Unavailable);
      }
    };
    await assert.rejects(upload(gateway.deps(), ramp(10), START, FAST), (error: unknown) => {
      assert.ok(error instanceof RecgwError);
      assert.equal(error.code, "FAILED_PRECONDITION");
      assert.equal(error.reason, "UPLOAD_ENDED");
      return true;
    });
  });

  test("retries give up after the outage tolerance without progress", async () => {
    const gateway = new FakeGateway();
    gateway.onMessage = () => {
      throw new ConnectError("connection refused", Code.Unavailable);
    };
    gateway.onStatus = () => new ConnectError("connection refused", Code.Unavailable);
    const started = Date.now();
    await assert.rejects(
      upload(gateway.deps(), ramp(10), START, { ...FAST, outageToleranceMs: 200, backoff: { initialMs: 10, maxMs: 20 } }),
      (error: unknown) => {
        assert.ok(error instanceof RecgwError);
        assert.equal(error.code, "UNAVAILABLE");
        assert.match(error.message, /outage tolerance/);
        return true;
      },
    );
    assert.ok(Date.now() - started >= 200);
    assert.ok(gateway.statusCalls >= 3, "it kept asking for the status");
  });

  test("progress restarts the outage clock: a long upload with many failures finishes", async () => {
    const gateway = new FakeGateway();
    const data = ramp(64);
    const broken = new Set<number>();
    gateway.onMessage = async (message, _state, stream) => {
      const offset = Number(message.writeOffset);
      // Every stream breaks once after 8 new bytes, slowly: the whole upload takes longer than the tolerance.
      if (message.start === undefined && offset > 0 && offset % 8 === 0 && !broken.has(offset)) {
        broken.add(offset);
        await new Promise((resolve) => setTimeout(resolve, 30));
        throw new ConnectError(`reset in stream ${stream}`, Code.Unavailable);
      }
    };
    const result = await upload(gateway.deps(), live(data, 4), START, { ...FAST, outageToleranceMs: 100 });
    assert.equal(result.size, 64);
    assert.ok(gateway.streams.length >= 7);
  });

  test("a committed size below the retained bytes cannot be resumed: a clear DATA_LOSS error", async () => {
    const gateway = new FakeGateway();
    gateway.onMessage = (message, state) => {
      if (Number(message.writeOffset) === 12 && state) {
        state.committed = 0; // the gateway forgot committed parts
        throw new ConnectError("reset", Code.Unavailable);
      }
    };
    await assert.rejects(upload(gateway.deps(), live(ramp(20), 4), START, { ...FAST, retainLimit: 8 }), (error: unknown) => {
      assert.ok(error instanceof RecgwError);
      assert.equal(error.code, "DATA_LOSS");
      assert.match(error.message, /committed 0 bytes but the client holds bytes \d+ to \d+/);
      return true;
    });
  });

  test("resuming an existing upload id from a seekable source continues at the committed size", async () => {
    const gateway = new FakeGateway();
    const data = ramp(20);
    gateway.onMessage = (message, _state, stream) => {
      if (stream === 1 && Number(message.writeOffset) === 12) throw gatewayError(Code.Canceled, "CANCELLED");
    };
    const first = await upload(gateway.deps(), live(data, 4), START, FAST).catch((error: RecgwError) => error);
    assert.ok(first instanceof RecgwError && first.code === "CANCELLED");
    const uploadId = first.uploadId!;
    assert.equal(gateway.uploads.get(uploadId)!.committed, 12);
    await assert.rejects(upload(gateway.deps(), live(data, 4), { ...START, uploadId }, FAST), (error: unknown) => {
      assert.ok(error instanceof RecgwError);
      assert.equal(error.code, "FAILED_PRECONDITION");
      assert.match(error.message, /12 bytes committed .*seekable source.*sourceOffset/);
      return true;
    });
    const result = await upload(gateway.deps(), data, { ...START, uploadId }, FAST);
    const resumed = gateway.streams.at(-1)!;
    assert.equal(Number(resumed[0]!.writeOffset), 12);
    assert.equal(Number(resumed[1]!.writeOffset), 12);
    assert.equal(result.size, 20);
    assert.equal(Buffer.from(result.checksums.sha256!).toString("hex"), sha(data), "checksums cover the skipped prefix");
    // A live source of the bytes from the committed size on, with sourceOffset.
    const gateway2 = new FakeGateway();
    gateway2.onMessage = gateway.onMessage;
    const again = await upload(gateway2.deps(), live(data, 4), START, FAST).catch((error: RecgwError) => error);
    const id2 = (again as RecgwError).uploadId!;
    gateway2.onMessage = undefined;
    const tail = await upload(gateway2.deps(), live(data.subarray(12), 4), { ...START, uploadId: id2 }, { ...FAST, sourceOffset: 12 });
    assert.equal(tail.size, 20);
    assert.equal(sha(gateway2.uploads.get(id2)!.bytes), sha(data));
    assert.ok(gateway2.streams.at(-1)!.every((m) => m.objectChecksums === undefined));
  });

  test("a new caller-chosen upload id (unknown to the gateway) starts from zero", async () => {
    const gateway = new FakeGateway();
    const uploadId = "6f1c2a4e-8a47-4a53-9d2e-0c7b8f4e2d11";
    const result = await upload(gateway.deps(), ramp(10), { ...START, uploadId }, FAST);
    assert.equal(result.uploadId, uploadId);
    assert.equal(gateway.statusCalls, 1);
  });

  test("backpressure: the source is read at most retainLimit ahead of the committed size", async () => {
    const gateway = new FakeGateway();
    gateway.commits = false;
    const data = ramp(64);
    let maxAhead = 0;
    const state = (): { committed: number } => gateway.uploads.values().next().value ?? { committed: 0 };
    const source = live(data, 4, (offset) => {
      maxAhead = Math.max(maxAhead, offset + 4 - state().committed);
    });
    let polls = 0;
    gateway.onStatus = (upload) => {
      polls++;
      if (upload && polls % 2 === 0) upload.committed = Math.floor(upload.bytes.length / 4) * 4; // commit slowly
      return undefined;
    };
    const result = await upload(gateway.deps(), source, START, { ...FAST, retainLimit: 16 });
    assert.equal(result.size, 64);
    // retained (<= 16) + the frame reader's look-ahead (one chunk) + the chunk being read
    assert.ok(maxAhead <= 16 + 4 + 4, `read ${maxAhead} bytes ahead of the committed size`);
    assert.ok(polls > 0);
  });

  test("at the retain limit with nothing committed for the stall time: a clear RESOURCE_EXHAUSTED", async () => {
    const gateway = new FakeGateway();
    gateway.commits = false;
    await assert.rejects(
      upload(gateway.deps(), live(ramp(64), 4), START, { ...FAST, retainLimit: 16, stallTimeoutMs: 200, heartbeatMs: 20 }),
      (error: unknown) => {
        assert.ok(error instanceof RecgwError);
        assert.equal(error.code, "RESOURCE_EXHAUSTED");
        assert.match(error.message, /raise retainLimit/);
        return true;
      },
    );
    assert.equal(gateway.streams.length, 1, "not retried");
    const heartbeats = gateway.layout(1).filter(([, length, finish]) => length === 0 && !finish);
    assert.ok(heartbeats.length >= 3, "heartbeats while reading was paused for memory");
  });

  test("a silent source gets heartbeats (its partial data, then empty messages) and finishes", async () => {
    const gateway = new FakeGateway();
    const data = ramp(10);
    let release!: () => void;
    const paused = new Promise<void>((resolve) => (release = resolve));
    const source = live(data, 2, (offset) => (offset === 6 ? paused : undefined));
    const done = upload(gateway.deps(), source, START, { ...FAST, heartbeatMs: 20 });
    // Wait until the gateway saw an empty heartbeat, then let the source go on.
    for (let i = 0; i < 200 && !gateway.layout(1).some(([, length]) => length === 0); i++) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    release();
    const result = await done;
    const layout = gateway.layout(1);
    assert.ok(layout.some(([offset, length, finish]) => offset === 6 && length === 0 && !finish), JSON.stringify(layout));
    assert.equal(result.size, 10);
    assert.equal(sha(gateway.uploads.values().next().value!.bytes), sha(data));
  });

  test("AbortSignal: the upload rejects with the signal's reason and the source is released", async () => {
    const gateway = new FakeGateway();
    const controller = new AbortController();
    let finished = false;
    async function* endless(): AsyncGenerator<Uint8Array> {
      try {
        for (;;) {
          yield new Uint8Array(4);
          await new Promise((resolve) => setTimeout(resolve, 5));
        }
      } finally {
        finished = true;
      }
    }
    const done = upload(gateway.deps(), endless(), START, { ...FAST, signal: controller.signal });
    setTimeout(() => controller.abort(new Error("stop now")), 50);
    await assert.rejects(done, /stop now/);
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.ok(finished, "the source generator was returned");
  });

  test("the source's own error ends the upload with that error, not retried", async () => {
    const gateway = new FakeGateway();
    async function* failing(): AsyncGenerator<Uint8Array> {
      yield new Uint8Array(8);
      throw new Error("microphone unplugged");
    }
    await assert.rejects(upload(gateway.deps(), failing(), START, FAST), /microphone unplugged/);
    assert.equal(gateway.streams.length, 1);
  });

  test("the bearer token never appears in an error message", async () => {
    const gateway = new FakeGateway();
    gateway.onMessage = () => {
      throw gatewayError(Code.Unauthenticated, "TOKEN_INVALID", "bad token secret-token-123");
    };
    await assert.rejects(upload(gateway.deps(), ramp(4), START, FAST), (error: unknown) => {
      assert.ok(error instanceof RecgwError);
      assert.equal(error.message, "bad token [REDACTED]");
      return true;
    });
  });

  test("options are checked", async () => {
    const deps = new FakeGateway().deps();
    await assert.rejects(upload(deps, ramp(4), START, { chunkSize: 5 * 1024 * 1024 }), RangeError);
    await assert.rejects(upload(deps, ramp(4), START, { chunkSize: 8, retainLimit: 4 }), RangeError);
    await assert.rejects(upload(deps, ramp(4), START, { sourceOffset: 3 }), /uploadId/);
  });
});
