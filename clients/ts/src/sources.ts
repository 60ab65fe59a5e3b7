/**
 * What an upload reads: a Uint8Array or a file (both seekable: an existing
 * upload can be resumed from them at any offset), or a live source, a Readable
 * or any AsyncIterable of Uint8Array chunks, read exactly once.
 */
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import type { Checksummer } from "./checksums.js";

/** A file read from disk; seekable, and its size becomes `expectedSize`. */
export interface FileSource {
  path: string;
}

/**
 * A Uint8Array (or Buffer), a file (`{ path }`), a Readable or any
 * AsyncIterable of Uint8Array chunks. Chunks must not be modified after they
 * were yielded: they are kept, without copying, until the gateway committed them.
 */
export type UploadSource = Uint8Array | AsyncIterable<Uint8Array> | FileSource;

export interface OpenedSource {
  /** Total size when known in advance. */
  size: number | undefined;
  /** True when `open` may start at any offset (and more than once). */
  seekable: boolean;
  /** The bytes from `offset` on. A live source can only be opened once, at 0. */
  open(offset: number, chunkSize: number): AsyncIterator<Uint8Array>;
}

function isAsyncIterable(value: unknown): value is AsyncIterable<Uint8Array> {
  return (
    typeof value === "object" &&
    value !== null &&
    typeof (value as { [Symbol.asyncIterator]?: unknown })[Symbol.asyncIterator] === "function"
  );
}

function isFileSource(value: unknown): value is FileSource {
  return typeof value === "object" && value !== null && typeof (value as FileSource).path === "string";
}

async function* arrayChunks(data: Uint8Array, offset: number): AsyncGenerator<Uint8Array> {
  if (offset < data.length) yield data.subarray(offset);
}

async function* fileChunks(path: string, offset: number, chunkSize: number): AsyncGenerator<Uint8Array> {
  const stream = createReadStream(path, { start: offset, highWaterMark: chunkSize });
  try {
    for await (const chunk of stream) yield chunk as Buffer;
  } finally {
    stream.destroy();
  }
}

/** Recognises the source; a file is stat'ed for its size. */
export async function openSource(source: UploadSource): Promise<OpenedSource> {
  if (source instanceof Uint8Array) {
    return { size: source.length, seekable: true, open: (offset) => arrayChunks(source, offset) };
  }
  if (isAsyncIterable(source)) {
    let opened = false;
    return {
      size: undefined,
      seekable: false,
      open(offset) {
        if (opened || offset !== 0) throw new Error("a live upload source can only be read once, from its start");
        opened = true;
        return source[Symbol.asyncIterator]();
      },
    };
  }
  if (isFileSource(source)) {
    const info = await stat(source.path);
    if (!info.isFile()) throw new TypeError(`upload source ${JSON.stringify(source.path)} is not a regular file`);
    return {
      size: info.size,
      seekable: true,
      open: (offset, chunkSize) => fileChunks(source.path, offset, chunkSize),
    };
  }
  throw new TypeError("upload source must be a Uint8Array, a Readable, an AsyncIterable<Uint8Array> or { path }");
}

/**
 * The bytes of `chunks` after the first `prefix`, which are fed to `checksummer`
 * only (they are committed already, but belong in the whole-object checksums).
 */
export async function* skipPrefix(
  chunks: AsyncIterator<Uint8Array>,
  prefix: number,
  checksummer: Checksummer,
): AsyncGenerator<Uint8Array> {
  let left = prefix;
  try {
    for (;;) {
      const next = await chunks.next();
      if (next.done === true) {
        if (left > 0) throw new Error(`the source ended ${left} bytes before the committed size ${prefix}`);
        return;
      }
      let chunk = next.value;
      if (left > 0) {
        const head = chunk.subarray(0, Math.min(left, chunk.length));
        checksummer.update(head);
        left -= head.length;
        chunk = chunk.subarray(head.length);
        if (chunk.length === 0) continue;
      }
      yield chunk;
    }
  } finally {
    await chunks.return?.();
  }
}
