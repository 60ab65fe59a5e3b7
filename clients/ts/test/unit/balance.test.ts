/**
 * Several replicas: two real HTTP/2 gRPC servers on loopback (Connect's Node
 * adapter over http2.createServer), balanced by the client; one is killed (its
 * connections destroyed, its port closed) and the calls, and a resumed upload,
 * go to the other. The servers share one FakeGateway, as replicas share
 * PostgreSQL.
 */
import assert from "node:assert/strict";
import { createServer, type Http2Server, type ServerHttp2Session } from "node:http2";
import type { AddressInfo } from "node:net";
import { afterEach, describe, test } from "node:test";
import type { ServiceImpl } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { createClient, RecgwError } from "../../dist/index.js";
import { UploadService, UploadState } from "../../dist/gen/recgw/v1/upload_pb.js";
import { FakeGateway } from "./fake-gateway.js";

const TOKEN = "balance-CANARY-token-0123";

interface Replica {
  address: string;
  calls: number;
  /** Destroys its connections and stops listening, like a crashed replica. */
  kill(): Promise<void>;
}

const servers: Http2Server[] = [];

afterEach(async () => {
  await Promise.all(servers.splice(0).map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
});

async function replica(service: (self: Replica) => Partial<ServiceImpl<typeof UploadService>>, port = 0): Promise<Replica> {
  const sessions = new Set<ServerHttp2Session>();
  const self: Replica = { address: "", calls: 0, kill: async () => undefined };
  const server = createServer(connectNodeAdapter({ routes: (router) => router.service(UploadService, service(self)) }));
  server.on("session", (session) => {
    sessions.add(session);
    session.on("close", () => sessions.delete(session));
  });
  await new Promise<void>((resolve) => server.listen(port, "127.0.0.1", resolve));
  servers.push(server);
  self.address = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  self.kill = () => {
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    for (const session of sessions) session.destroy();
    return closed;
  };
  return self;
}

function counting(self: Replica): Partial<ServiceImpl<typeof UploadService>> {
  return {
    getUploadStatus(request) {
      self.calls++;
      return { uploadId: request.uploadId, state: UploadState.OPEN };
    },
  };
}

async function within<T>(what: string, attempt: () => Promise<T | undefined>, ms = 20_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const got = await attempt();
    if (got !== undefined) return got;
    assert.ok(Date.now() < deadline, `timed out: ${what}`);
  }
}

describe("several replicas", () => {
  test("calls spread round robin, all go to the replica left when one dies, and to both once it is back", async () => {
    const a = await replica(counting);
    const b = await replica(counting);
    const client = createClient({ address: `${a.address}, ${b.address}`, token: TOKEN, plaintext: true });
    try {
      for (let i = 0; i < 10; i++) assert.equal((await client.status("u1")).state, "OPEN");
      assert.deepEqual([a.calls, b.calls], [5, 5]);
      await a.kill();
      // The first calls may still go to A and fail; then A is down and B gets every call.
      await within("every call goes to B", async () => {
        const before = b.calls;
        try {
          await client.status("u1");
          return b.calls === before + 1 ? true : undefined;
        } catch (error) {
          assert.ok(error instanceof RecgwError && error.code === "UNAVAILABLE", String(error));
          return undefined;
        }
      });
      const before = b.calls;
      for (let i = 0; i < 6; i++) await client.status("u1");
      assert.equal(b.calls - before, 6);
      // A replica back on its address is found by the background probe.
      const again = await replica(counting, Number(a.address.split(":")[1]));
      await within("calls reach A again", async () => {
        await client.status("u1");
        return again.calls > 0 ? true : undefined;
      });
    } finally {
      client.close();
    }
  });

  test("an upload whose replica dies resumes on the other one", async () => {
    const fake = new FakeGateway();
    const servedBy: Replica[] = [];
    const shared = (self: Replica): Partial<ServiceImpl<typeof UploadService>> => ({
      upload(requests, context) {
        servedBy.push(self);
        return fake.upload(requests, context) as ReturnType<NonNullable<ServiceImpl<typeof UploadService>["upload"]>>;
      },
      getUploadStatus(request) {
        return fake.getUploadStatus(request) as never;
      },
    });
    const a = await replica(shared);
    const b = await replica(shared);
    fake.onMessage = async (_message, _upload, stream) => {
      if (stream === 1 && fake.streams[0]!.length === 4) await servedBy[0]!.kill();
    };
    const data = Buffer.alloc(64, 7);
    const retries: string[] = [];
    const client = createClient({ addresses: [a.address, b.address], token: TOKEN, plaintext: true });
    try {
      const result = await client.upload(data, { tenantId: "acme", objectName: "call.webm" }, {
        chunkSize: 8,
        backoff: { initialMs: 20, maxMs: 200 },
        outageToleranceMs: 20_000,
        onRetry: (event) => retries.push(event.error.code),
      });
      assert.equal(result.size, 64);
      // The broken stream marked its replica down: the one resumed stream went to the other.
      assert.equal(retries.length, 1, `retries: ${retries.join(", ")}`);
      assert.equal(servedBy.length, 2);
      assert.notEqual(servedBy[1], servedBy[0]);
      assert.deepEqual(fake.uploads.get(fake.streams[0]![0]!.start!.uploadId)!.bytes, data);
    } finally {
      client.close();
    }
  });

  test("bad lists are refused with the reason", () => {
    const make = (options: Partial<Parameters<typeof createClient>[0]>): unknown =>
      createClient({ token: TOKEN, plaintext: true, ...options });
    assert.throws(() => make({ address: "127.0.0.1:1,,127.0.0.1:2" }), /empty gateway address/);
    assert.throws(() => make({ address: "127.0.0.1:1," }), /empty gateway address/);
    assert.throws(() => make({ addresses: [] }), /addresses is empty/);
    assert.throws(() => make({ addresses: ["127.0.0.1:1", "gw-b"] }), /must each be host:port \("gw-b" is not\)/);
    assert.throws(() => make({ addresses: ["127.0.0.1:1", "gw\n:1"] }), /"gw\\n:1"/);
    assert.throws(() => make({ address: "127.0.0.1:1", addresses: ["127.0.0.1:2"] }), /either address or addresses/);
    assert.throws(() => make({}), /either address or addresses/);
    assert.throws(() => make({ addresses: ["127.0.0.1:1", "https://gw-b:443"] }), /no scheme/);
    // Names and IPv6 literals are fine; each connects lazily.
    const fine = createClient({ addresses: ["gw-a.example:443", "[fd00::12]:443"], token: TOKEN });
    assert.equal(String(fine), "RecgwClient(gw-a.example:443,[fd00::12]:443)");
    fine.close();
  });
});
