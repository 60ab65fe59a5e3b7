package dev.recgw.client;

import java.util.concurrent.ArrayBlockingQueue;

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
  private final ArrayBlockingQueue<byte[]> free;

  ChunkPool(int chunkSize, int capacity) {
    this.chunkSize = chunkSize;
    this.free = new ArrayBlockingQueue<>(Math.max(1, capacity));
  }

  /** Free buffers kept for an upload: an eighth of the retained limit, as trimming frees about that much at once. */
  static ChunkPool forUpload(int chunkSize, long retainedLimit) {
    return new ChunkPool(chunkSize, (int) Math.max(2, Math.min(64, retainedLimit / 8 / chunkSize)));
  }

  /** A buffer of {@code chunkSize} bytes whose contents are to be overwritten. */
  byte[] take() {
    byte[] b = free.poll();
    return b != null ? b : new byte[chunkSize];
  }

  /** Gives back a buffer nothing refers to any more (dropped if the pool is full or it is not a whole chunk's). */
  void give(byte[] b) {
    if (b.length == chunkSize) {
      free.offer(b);
    }
  }

  /** Free buffers held (for tests). */
  int size() {
    return free.size();
  }
}
