/**
 * The client's TLS options against a real TLS handshake: an in-process gRPC
 * server (Connect's Node adapter over http2.createSecureServer) that requires a
 * client certificate, with a CA and certificates made by the openssl CLI.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { createSecureServer, type Http2SecureServer } from "node:http2";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { createClient, RecgwError } from "../../dist/index.js";
import { UploadService, UploadState } from "../../dist/gen/recgw/v1/upload_pb.js";

function hasOpenssl(): boolean {
  try {
    execFileSync("openssl", ["version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

const TOKEN = "uploader-CANARY-tls-token";

describe("TLS and mTLS", { skip: hasOpenssl() ? false : "the openssl CLI is not installed" }, () => {
  let dir = "";
  let server: Http2SecureServer;
  let address = "";
  const seenAuthorization: string[] = [];
  const file = (name: string): string => join(dir, name);

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "recgw-ts-tls-"));
    const openssl = (...args: string[]): void => {
      execFileSync("openssl", args, { cwd: dir, stdio: "pipe" });
    };
    const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl("req", "-x509", ...ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=recgw test CA");
    writeFileSync(file("server.ext"), "subjectAltName=DNS:gateway.test\nextendedKeyUsage=serverAuth\n");
    writeFileSync(file("client.ext"), "extendedKeyUsage=clientAuth\n");
    for (const who of ["server", "client"]) {
      openssl("req", ...ec, "-keyout", `${who}.key`, "-out", `${who}.csr`, "-subj", `/CN=${who}`);
      openssl("x509", "-req", "-in", `${who}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", `${who}.pem`, "-days", "2", "-extfile", `${who}.ext`);
    }
    server = createSecureServer(
      {
        key: await readFile(file("server.key")),
        cert: await readFile(file("server.pem")),
        ca: await readFile(file("ca.pem")),
        requestCert: true,
        rejectUnauthorized: true,
      },
      connectNodeAdapter({
        routes: (router) =>
          router.service(UploadService, {
            getUploadStatus(request, context) {
              seenAuthorization.push(context.requestHeader.get("authorization") ?? "");
              return { uploadId: request.uploadId, state: UploadState.OPEN, committedSize: 5n };
            },
          }),
      }),
    );
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    address = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  after(async () => {
    await new Promise<void>((resolve) => server.close(() => resolve()));
    rmSync(dir, { recursive: true, force: true });
  });

  const tls = (): { caFile: string; certFile: string; keyFile: string; serverName: string } => ({
    caFile: file("ca.pem"),
    certFile: file("client.pem"),
    keyFile: file("client.key"),
    serverName: "gateway.test",
  });

  async function failure(options: Parameters<typeof createClient>[0]): Promise<RecgwError> {
    const client = createClient(options);
    try {
      return await client.status("u1").then(
        () => assert.fail("the call should not have succeeded"),
        (error: unknown) => {
          assert.ok(error instanceof RecgwError, String(error));
          return error;
        },
      );
    } finally {
      client.close();
    }
  }

  test("mTLS with the CA, a client certificate and the server name override; the token travels as a bearer", async () => {
    const client = createClient({ address, token: TOKEN, tls: tls() });
    try {
      const status = await client.status("u1");
      assert.equal(status.state, "OPEN");
      assert.equal(status.committedSize, 5);
      assert.deepEqual(seenAuthorization, [`Bearer ${TOKEN}`]);
    } finally {
      client.close();
    }
  });

  test("the certificate is checked against the host when no server name is given", async () => {
    const error = await failure({ address, token: TOKEN, tls: { ...tls(), serverName: undefined } });
    assert.equal(error.code, "UNAVAILABLE");
    assert.match(error.message, /altnames|IP: 127\.0\.0\.1/i);
    assert.ok(!error.message.includes(TOKEN));
  });

  test("without the CA the gateway's certificate is not trusted", async () => {
    const error = await failure({ address, token: TOKEN, tls: { ...tls(), caFile: undefined } });
    assert.equal(error.code, "UNAVAILABLE");
    assert.match(error.message, /certificate/i);
  });

  test("without a client certificate the gateway refuses the handshake", async () => {
    const error = await failure({ address, token: TOKEN, tls: { caFile: file("ca.pem"), serverName: "gateway.test" } });
    assert.equal(error.code, "UNAVAILABLE");
  });

  test("plaintext only when asked for, and never together with tls", () => {
    assert.throws(() => createClient({ address, token: TOKEN, plaintext: true, tls: tls() }), /exclude/);
    assert.throws(() => createClient({ address: `https://${address}`, token: TOKEN }), /host:port/);
    assert.throws(() => createClient({ address, token: TOKEN, tls: { certFile: file("client.pem") } }), /together/);
  });
});
