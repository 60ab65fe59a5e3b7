package dev.recgw.client;

import java.util.ArrayDeque;

/**
 * Every byte from the gateway's committed size on, as the chunks they were read in: what a new
 * stream sends again after a failure. Confined to the upload's thread; the memory it holds is
 * accounted in a {@link MemoryGate}, released chunk by chunk as the committed size passes them.
 */
final class RetainedBuffer {
  /** A piece of one chunk to send: {@code length} bytes of {@code data} from {@code from}. */
  record Slice(long offset, byte[] data, int from, int length, int crc32c, boolean whole) {}

  private final ArrayDeque<Chunk> chunks = new ArrayDeque<>();
  private final MemoryGate gate;
  private final ChunkPool pool;
  private long start;
  private long end;
  private boolean eof;
  private long held;

  RetainedBuffer(long startOffset, MemoryGate gate, ChunkPool pool) {
    this.start = startOffset;
    this.end = startOffset;
    this.gate = gate;
    this.pool = pool;
  }

  /** First byte still held (everything before it is committed). */
  long start() {
    return start;
  }

  /** One past the last byte read from the source. */
  long end() {
    return end;
  }

  /** True once the last chunk arrived. */
  boolean eof() {
    return eof;
  }

  /** Bytes of the chunks held in memory. */
  long heldBytes() {
    return held;
  }

  void append(Chunk chunk) {
    if (chunk.offset() != end || eof) {
      throw new IllegalStateException("chunks must arrive in order, once");
    }
    end = chunk.end();
    eof = chunk.last();
    if (chunk.length() > 0) {
      chunks.addLast(chunk);
      held += chunk.length();
    }
  }

  /**
   * Forgets every byte before {@code committed} (the gateway has it durably), giving the
   * chunks' arrays back to the pool: only bytes every stream has serialized can be committed.
   */
  void release(long committed) {
    long upTo = Math.min(committed, end);
    if (upTo <= start) {
      return;
    }
    start = upTo;
    long freed = 0;
    while (!chunks.isEmpty() && chunks.peekFirst().end() <= upTo) {
      Chunk chunk = chunks.removeFirst();
      freed += chunk.length();
      pool.give(chunk.data());
    }
    held -= freed;
    if (freed > 0) {
      gate.release(freed);
    }
  }

  /** The bytes from {@code offset} to the end of their chunk; null if none are held there. */
  Slice slice(long offset) {
    if (offset < start || offset >= end) {
      return null;
    }
    for (Chunk chunk : chunks) {
      if (offset < chunk.end()) {
        int from = (int) (offset - chunk.offset());
        int length = chunk.length() - from;
        return new Slice(offset, chunk.data(), from, length, chunk.crc32c(), from == 0);
      }
    }
    return null;
  }

  /** Drops everything (the upload ended; a cancelled stream may still read them: not pooled); gives the memory back. */
  void clear() {
    chunks.clear();
    if (held > 0) {
      gate.release(held);
    }
    held = 0;
  }
}
