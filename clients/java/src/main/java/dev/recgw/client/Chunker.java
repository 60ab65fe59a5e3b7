package dev.recgw.client;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.util.function.Consumer;

/**
 * Cuts a byte stream into chunks of exactly {@code chunkSize} bytes (the last may be shorter).
 *
 * <p>A full chunk is held back until the next byte arrives or the source ends, so that the last
 * chunk is known to be last and carries {@code finish_write} itself, as in the shared vectors
 * (an object of exactly one chunk is one message). The chunk's CRC32C and the object's CRC32C
 * and SHA-256 are computed here, on the producer's thread, once per byte. One producer thread at
 * a time; it holds at most two chunks (the one held back and the one filling).
 */
final class Chunker {
  /** Reads up to {@code length} bytes into {@code buffer}; -1 at the end, like InputStream. */
  interface Reader {
    int read(byte[] buffer, int offset, int length) throws IOException;
  }

  private final int chunkSize;
  private final boolean checksums;
  private final ObjectHasher hasher;
  private final Consumer<Chunk> out;
  private final ChunkPool pool;
  private long offset;
  private byte[] filling;
  private int filled;
  private Chunk held;
  private boolean finished;

  /**
   * @param startOffset object offset of the first byte fed
   * @param hasher receives every byte, or null when no object checksums are computed
   * @param pool where the buffers to fill come from
   */
  Chunker(int chunkSize, long startOffset, boolean checksums, ObjectHasher hasher, ChunkPool pool, Consumer<Chunk> out) {
    this.chunkSize = chunkSize;
    this.pool = pool;
    this.checksums = checksums;
    this.hasher = hasher;
    this.out = out;
    this.offset = startOffset;
    this.filling = pool.take();
  }

  /** Feeds bytes. */
  void write(ByteBuffer bytes) {
    while (bytes.hasRemaining()) {
      releaseHeld();
      int n = Math.min(bytes.remaining(), chunkSize - filled);
      bytes.get(filling, filled, n);
      filled += n;
      cutIfFull();
    }
  }

  /** Reads once from {@code reader} straight into the chunk being filled; false at the end. */
  boolean readFrom(Reader reader) throws IOException {
    int n = reader.read(filling, filled, chunkSize - filled);
    if (n < 0) {
      return false;
    }
    if (n > 0) {
      releaseHeld();
      filled += n;
      cutIfFull();
    }
    return true;
  }

  /** The source ended: emits the last chunk. */
  void finish() {
    if (finished) {
      return;
    }
    finished = true;
    if (held != null) {
      Chunk last = held;
      held = null;
      out.accept(new Chunk(last.offset(), last.data(), last.length(), last.crc32c(), true));
    } else {
      out.accept(cut(true));
    }
  }

  private void releaseHeld() {
    if (held != null) {
      Chunk chunk = held;
      held = null;
      out.accept(chunk);
    }
  }

  private void cutIfFull() {
    if (filled == chunkSize) {
      held = cut(false);
    }
  }

  private Chunk cut(boolean last) {
    byte[] data = filling;
    int length = filled;
    if (hasher != null) {
      hasher.update(data, 0, length);
    }
    int crc = checksums ? ObjectHasher.crc32c(data, 0, length) : 0;
    Chunk chunk = new Chunk(offset, data, length, crc, last);
    offset += length;
    filling = last ? null : pool.take();
    filled = 0;
    return chunk;
  }
}
