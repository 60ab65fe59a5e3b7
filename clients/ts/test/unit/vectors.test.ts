/** The client against testdata/vectors.json: CRC32C, chunking and the exact encoded messages. */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { describe, test } from "node:test";
import { toBinary } from "@bufbuild/protobuf";
import { Checksummer, crc32c, crc32cCombine, crc32cImplementation, crc32cPure } from "../../dist/checksums.js";
import { dataRequest, FrameReader, startMessage, startRequest } from "../../dist/framing.js";
import { UploadRequestSchema } from "../../dist/gen/recgw/v1/upload_pb.js";
import { loadJson, materialize, type Pattern } from "../testdata.js";

interface Vectors {
  crc32c: { input: Pattern; crc32c: number }[];
  crc32c_continued: { first: Pattern; second: Pattern; crc32c_first: number; crc32c_both: number }[];
  chunking: {
    input: Pattern;
    chunk_size: number;
    messages: { write_offset: number; length: number; data_crc32c: number }[];
    object_crc32c: number;
    object_sha256: string;
  }[];
  messages: { name: string; fields: Record<string, unknown>; hex: string }[];
}

const vectors = loadJson<Vectors>("vectors.json");
const implementations = { native: crc32c, pure: crc32cPure };

test("the native CRC32C (@node-rs/crc32) loads on this platform", () => {
  assert.equal(crc32cImplementation, "native");
});

for (const [name, fn] of Object.entries(implementations)) {
  describe(`crc32c (${name})`, () => {
    for (const vector of vectors.crc32c) {
      test(`standard ${JSON.stringify(vector.input).slice(0, 60)}`, () => {
        assert.equal(fn(materialize(vector.input)), vector.crc32c);
      });
    }
    for (const vector of vectors.crc32c_continued) {
      test(`continued ${JSON.stringify(vector.first).slice(0, 40)}`, () => {
        const first = fn(materialize(vector.first));
        assert.equal(first, vector.crc32c_first);
        assert.equal(fn(materialize(vector.second), first), vector.crc32c_both);
      });
    }
  });
}

describe("crc32cCombine", () => {
  for (const vector of vectors.crc32c_continued) {
    test(`shared vector ${JSON.stringify(vector.first).slice(0, 40)}`, () => {
      const second = materialize(vector.second);
      assert.equal(crc32cCombine(vector.crc32c_first, crc32c(second), second.length), vector.crc32c_both);
    });
  }
  test("equals one pass over A then B, for lengths from 0 to past 4 MiB", () => {
    const data = new Uint8Array(4 * 1024 * 1024 + 3);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31 + 7) % 253;
    for (const [a, b] of [[0, 0], [0, 5], [5, 0], [1, 1], [7, 1000], [1000, 65537], [3, 4 * 1024 * 1024]] as const) {
      const first = data.subarray(0, a);
      const second = data.subarray(a, a + b);
      assert.equal(crc32cCombine(crc32c(first), crc32c(second), b), crc32c(data.subarray(0, a + b)), `${a} + ${b}`);
    }
  });
  test("a Checksummer fed messages' CRCs reports the object's CRC32C", () => {
    const parts = [new Uint8Array([1, 2, 3]), new Uint8Array(70_000).fill(9), new Uint8Array([4])];
    const combined = new Checksummer();
    const plain = new Checksummer();
    for (const part of parts) {
      combined.update(part, crc32c(part));
      plain.update(part);
    }
    assert.equal(combined.result().crc32c, crc32c(Buffer.concat(parts)));
    assert.equal(combined.result().crc32c, plain.result().crc32c);
  });
});

/** Source chunks of `piece` bytes: the reader must cut them the same way as one big buffer. */
async function* pieces(data: Uint8Array, piece: number): AsyncGenerator<Uint8Array> {
  for (let offset = 0; offset < data.length; offset += piece) yield data.slice(offset, offset + piece);
}

describe("chunking", () => {
  for (const vector of vectors.chunking) {
    for (const piece of [0, 1000, vector.chunk_size + 1]) {
      const label = piece === 0 ? "one buffer" : `${piece}-byte source chunks`;
      test(`${materialize(vector.input).length} bytes in ${vector.chunk_size}-byte messages, ${label}`, async () => {
        const data = materialize(vector.input);
        const source = piece === 0 ? pieces(data, Math.max(1, data.length)) : pieces(data, piece);
        const reader = new FrameReader(source, vector.chunk_size);
        const checksummer = new Checksummer();
        const seen: { write_offset: number; length: number; data_crc32c: number }[] = [];
        let offset = 0;
        for (;;) {
          const frame = await reader.next();
          assert.ok(typeof frame === "object", "a fast source never leaves the reader idle");
          checksummer.update(frame.data);
          const sums = frame.last ? checksummer.result() : undefined;
          const message = dataRequest(offset, frame.data, true, frame.last ? { checksums: sums } : undefined);
          seen.push({
            write_offset: Number(message.writeOffset),
            length: message.data.length,
            data_crc32c: message.dataCrc32c ?? 0,
          });
          assert.equal(message.finishWrite, frame.last);
          offset += frame.data.length;
          if (frame.last) {
            assert.equal(message.objectChecksums?.crc32c, vector.object_crc32c);
            assert.equal(Buffer.from(message.objectChecksums!.sha256).toString("hex"), vector.object_sha256);
            break;
          }
        }
        assert.deepEqual(seen, vector.messages);
        assert.equal(createHash("sha256").update(data).digest("hex"), vector.object_sha256);
      });
    }
  }
});

type Fields = {
  start?: {
    tenant_id: string;
    object_name: string;
    content_type?: string;
    metadata?: Record<string, string>;
    expected_size?: string;
    upload_id: string;
    compute_sha256?: boolean;
  };
  write_offset?: string;
  data?: string;
  data_crc32c?: number;
  finish_write?: boolean;
  object_checksums?: { crc32c: number; sha256: string };
};

describe("encoded messages", () => {
  for (const vector of vectors.messages) {
    test(vector.name, () => {
      const fields = vector.fields as Fields;
      const offset = Number(fields.write_offset ?? "0");
      const data = Buffer.from(fields.data ?? "", "base64");
      let message;
      if (fields.data !== undefined || fields.finish_write) {
        const sums = fields.object_checksums;
        message = dataRequest(
          offset,
          data,
          fields.data_crc32c !== undefined,
          fields.finish_write
            ? { checksums: sums && { crc32c: sums.crc32c, sha256: Buffer.from(sums.sha256, "base64") } }
            : undefined,
        );
        if (fields.data_crc32c !== undefined) assert.equal(message.dataCrc32c, fields.data_crc32c);
      }
      if (fields.start !== undefined) {
        const start = startMessage({
          tenantId: fields.start.tenant_id,
          objectName: fields.start.object_name,
          contentType: fields.start.content_type,
          metadata: fields.start.metadata,
          expectedSize: fields.start.expected_size === undefined ? undefined : Number(fields.start.expected_size),
          uploadId: fields.start.upload_id,
          computeSha256: fields.start.compute_sha256,
        });
        if (message === undefined) message = startRequest(start, offset);
        else message.start = start;
      }
      assert.ok(message !== undefined);
      assert.equal(Buffer.from(toBinary(UploadRequestSchema, message)).toString("hex"), vector.hex);
    });
  }
});
