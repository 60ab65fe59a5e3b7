/**
 * Upload throughput of the TypeScript client: streams N MiB (a live source of
 * 1 MiB chunks, checksums on) through a gateway and prints MiB/s.
 *
 *     npm run bench -- --address 127.0.0.1:50051 --token T --tenant acme [--mib 64] [--tls]
 *
 * Defaults come from RECGW_E2E_* (so it runs under tests.e2e_stack too).
 * Prints `client_ts: uploading <MiB> MiB` when the upload begins, then
 * `client_ts: <MiB> MiB in <s> s = <MiB/s> MiB/s, CPU <s> s` (this process's CPU
 * time during the upload); `make bench` reads both lines.
 */
import { parseArgs } from "node:util";
import { createClient } from "../dist/index.js";

const MiB = 1024 * 1024;
const { values } = parseArgs({
  options: {
    address: { type: "string", default: process.env["RECGW_E2E_DIRECT_ADDRESS"] ?? process.env["RECGW_E2E_ADDRESS"] },
    token: { type: "string", default: process.env["RECGW_E2E_UPLOADER_TOKEN"] },
    tenant: { type: "string", default: process.env["RECGW_E2E_TENANT"] },
    mib: { type: "string", default: "64" },
    // an untimed upload first, so V8 has optimised the path
    "warmup-mib": { type: "string", default: "0" },
    tls: { type: "boolean", default: false },
    "no-checksums": { type: "boolean", default: false },
  },
});
if (!values.address || !values.token || !values.tenant) {
  console.error("usage: bench --address HOST:PORT --token TOKEN --tenant TENANT [--mib N] [--tls] [--no-checksums]");
  process.exit(2);
}
const total = Number(values.mib) * MiB;
const chunk = new Uint8Array(MiB);
for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 7 + 3) % 251;

async function* live(size: number = total): AsyncGenerator<Uint8Array> {
  for (let sent = 0; sent < size; sent += MiB) yield chunk.slice(0, Math.min(MiB, size - sent));
}

const client = createClient({ address: values.address, token: values.token, plaintext: !values.tls });
try {
  const warmup = Number(values["warmup-mib"]) * MiB;
  if (warmup > 0) {
    await client.upload(
      live(warmup),
      { tenantId: values.tenant, objectName: `bench/client-ts-warmup-${Date.now()}.bin` },
      { checksums: !values["no-checksums"] },
    );
  }
  console.log(`client_ts: uploading ${values.mib} MiB`);
  const cpuBefore = process.cpuUsage();
  const started = process.hrtime.bigint();
  const result = await client.upload(
    live(),
    { tenantId: values.tenant, objectName: `bench/client-ts-${Date.now()}.bin` },
    { checksums: !values["no-checksums"] },
  );
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = process.cpuUsage(cpuBefore);
  const cpuSeconds = (cpu.user + cpu.system) / 1e6;
  const mib = result.size / MiB;
  console.log(
    `client_ts: ${mib} MiB in ${seconds.toFixed(3)} s = ${(mib / seconds).toFixed(1)} MiB/s, CPU ${cpuSeconds.toFixed(3)} s`,
  );
} finally {
  client.close();
}
