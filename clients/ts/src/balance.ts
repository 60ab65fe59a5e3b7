/**
 * Client-side balancing over several gateway replicas (Connect-node has none):
 * one HTTP/2 connection per address, and every call (each upload stream, each
 * status query) goes to the next address that is up, round robin. A call that
 * fails with UNAVAILABLE or on a broken connection marks its address down;
 * calls skip it while a background probe reconnects with backoff, so a resumed
 * upload lands on a live replica. A unary call refused at connect goes on to
 * the next replica. With every address down, calls still rotate.
 */
import type { DescMessage, DescMethodStreaming, DescMethodUnary, MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, type ContextValues, type StreamResponse, type Transport, type UnaryResponse } from "@connectrpc/connect";
import type { Http2SessionManager } from "@connectrpc/connect-node";

/** What Transport takes as request headers (HeadersInit, which is a DOM type). */
type HeaderInit = ConstructorParameters<typeof Headers>[0];

const PROBE_INITIAL_MS = 200;
const PROBE_MAX_MS = 5_000;

/** One replica: its address, connection and transport. */
export interface Replica {
  address: string;
  session: Http2SessionManager;
  transport: Transport;
}

interface State extends Replica {
  down: boolean;
  probeDelayMs: number;
  timer: ReturnType<typeof setTimeout> | undefined;
}

/**
 * The addresses of `address` separated by commas (or `addresses`), trimmed;
 * throws TypeError for an empty entry, a scheme, or, when there are several,
 * an entry that is not `host:port`.
 */
export function replicaAddresses(address: string | undefined, addresses: readonly string[] | undefined): string[] {
  if ((address === undefined) === (addresses === undefined)) {
    throw new TypeError("give either address or addresses");
  }
  const list = (addresses ?? address!.split(",")).map((entry) => entry.trim());
  if (list.length === 0) throw new TypeError("addresses is empty");
  if (list.some((entry) => entry === "")) throw new TypeError("an empty gateway address in the list of addresses");
  for (const entry of list) {
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(entry)) throw new TypeError(`address must be host:port (no scheme): ${JSON.stringify(entry)}`);
    if (list.length > 1 && !/^(\[[0-9a-f:.]+\]|[^:[\]\s/]+):\d{1,5}$/i.test(entry)) {
      throw new TypeError(`several gateway addresses must each be host:port (${JSON.stringify(entry)} is not)`);
    }
  }
  return list;
}

/** Errors of a connection attempt, before any request could be sent. */
const CONNECT_ERRORS = new Set(["ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "ENOTFOUND", "EAI_AGAIN"]);

function neverConnected(error: unknown): boolean {
  for (let e: unknown = error, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && CONNECT_ERRORS.has(code)) return true;
  }
  return false;
}

/** A Transport that sends each call to the next replica that is up. */
export class BalancedTransport implements Transport {
  private readonly replicas: State[];
  private next: number;
  private closed = false;

  constructor(replicas: readonly Replica[]) {
    this.replicas = replicas.map((replica) => ({ ...replica, down: false, probeDelayMs: PROBE_INITIAL_MS, timer: undefined }));
    // A random start, so that many clients do not all begin with the first replica.
    this.next = Math.floor(Math.random() * replicas.length);
  }

  /** The next replica that is up (or, when none is, simply the next). */
  private pick(): State {
    const n = this.replicas.length;
    let chosen = this.next;
    for (let k = 0; k < n; k++) {
      const i = (this.next + k) % n;
      if (!this.replicas[i]!.down) {
        chosen = i;
        break;
      }
    }
    this.next = (chosen + 1) % n;
    return this.replicas[chosen]!;
  }

  private succeeded(replica: State): void {
    if (!replica.down) return;
    clearTimeout(replica.timer);
    replica.timer = undefined;
    replica.down = false;
    replica.probeDelayMs = PROBE_INITIAL_MS;
  }

  private failed(replica: State, error: unknown, signal: AbortSignal | undefined): void {
    if (this.closed || replica.down || signal?.aborted) return;
    // A lost connection shows as UNAVAILABLE, INTERNAL, ABORTED or CANCELLED without details
    // (see errors.ts); the gateway's own answers carry ErrorInfo and, unless UNAVAILABLE, say
    // nothing about the replica. One marked down wrongly is back as soon as the probe connects.
    const failure = ConnectError.from(error);
    if (failure.code !== Code.Unavailable && failure.details.length > 0) return;
    replica.down = true;
    replica.probeDelayMs = PROBE_INITIAL_MS;
    this.probe(replica);
  }

  private probe(replica: State): void {
    replica.timer = setTimeout(() => {
      void replica.session.connect().then((state) => {
        if (this.closed || !replica.down) return;
        if (state !== "error") {
          this.succeeded(replica);
          return;
        }
        replica.probeDelayMs = Math.min(replica.probeDelayMs * 2, PROBE_MAX_MS);
        this.probe(replica);
      });
    }, replica.probeDelayMs);
    replica.timer.unref();
  }

  async unary<I extends DescMessage, O extends DescMessage>(
    method: DescMethodUnary<I, O>,
    signal: AbortSignal | undefined,
    timeoutMs: number | undefined,
    header: HeaderInit | undefined,
    input: MessageInitShape<I>,
    contextValues?: ContextValues,
  ): Promise<UnaryResponse<I, O>> {
    // A call whose connection could not be made was never sent: it goes on to the next
    // replica (each tried once), so a dead replica costs no failed call.
    for (let tried = 1; ; tried++) {
      const replica = this.pick();
      try {
        const response = await replica.transport.unary(method, signal, timeoutMs, header, input, contextValues);
        this.succeeded(replica);
        return response;
      } catch (error) {
        this.failed(replica, error, signal);
        if (tried >= this.replicas.length || !neverConnected(error) || signal?.aborted) throw error;
      }
    }
  }

  async stream<I extends DescMessage, O extends DescMessage>(
    method: DescMethodStreaming<I, O>,
    signal: AbortSignal | undefined,
    timeoutMs: number | undefined,
    header: HeaderInit | undefined,
    input: AsyncIterable<MessageInitShape<I>>,
    contextValues?: ContextValues,
  ): Promise<StreamResponse<I, O>> {
    const replica = this.pick();
    let response: StreamResponse<I, O>;
    try {
      response = await replica.transport.stream(method, signal, timeoutMs, header, input, contextValues);
    } catch (error) {
      this.failed(replica, error, signal);
      throw error;
    }
    return { ...response, message: this.watch(replica, response.message, signal) };
  }

  /** The messages of a stream; its end or failure tells about the replica. */
  private async *watch<T>(replica: State, messages: AsyncIterable<T>, signal: AbortSignal | undefined): AsyncIterable<T> {
    try {
      yield* messages;
      this.succeeded(replica);
    } catch (error) {
      this.failed(replica, error, signal);
      throw error;
    }
  }

  /** Closes every connection and stops the probes; calls in flight fail. */
  close(): void {
    this.closed = true;
    for (const replica of this.replicas) {
      clearTimeout(replica.timer);
      replica.session.abort();
    }
  }
}
