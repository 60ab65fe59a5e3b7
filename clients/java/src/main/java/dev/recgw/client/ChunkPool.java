package dev.recgw.client;

import java.util.ArrayDeque;

/**
 * Chunk buffers to fill again: the retained buffer gives back each chunk's array once the
 * gateway has committed its bytes (by then gRPC has serialized them and holds no reference), and
 * the chunker takes them before allocating. A fresh 1 MiB array per message costs the zeroing,
 * the first-touch page faults of a growing heap, and young collections, about as much CPU as the
 * SHA-256 of the chunk. At most {@code capacity} free arrays are kept; thread-safe.
 *
 * <p>The memory bound is unchanged: a new array is allocated only when none is free, so the
 * arrays alive never outnumber the most the retained buffer held at once plus the chunker's two.
 */
final class ChunkPool {
  private final int chunkSize;
  private final int capacity;
  private final ArrayDeque<byte[]> free = new ArrayDeque<>();

  ChunkPool(int chunkSize, int capacity) {
    this.chunkSize = chunkSize;
    this.capacity = Math.max(1, capacity);
  }

  /**
   * Room for as many free buffers as the retained limit holds chunks: a trim releases a part or
   * more at once (8 MiB by default), and a smaller pool would drop most of them.
   */
  static ChunkPool forUpload(int chunkSize, long retainedLimit) {
    return new ChunkPool(chunkSize, (int) Math.max(2, Math.min(1 << 16, retainedLimit / chunkSize)));
  }

  /** A buffer of {@code chunkSize} bytes whose contents are to be overwritten. */
  byte[] take() {
    byte[] b;
    synchronized (this) {
      b = free.pollLast(); // the most recently used: likeliest in cache
    }
    return b != null ? b : new byte[chunkSize];
  }

  /** Gives back a buffer nothing refers to any more (dropped if the pool is full or it is not a whole chunk's). */
  synchronized void give(byte[] b) {
    if (b.length == chunkSize && free.size() < capacity) {
      free.addLast(b);
    }
  }

  /** Free buffers held (for tests). */
  synchronized int size() {
    return free.size();
  }
}
