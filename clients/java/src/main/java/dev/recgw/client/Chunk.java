package dev.recgw.client;

/**
 * One message's worth of the object: {@code length} bytes of {@code data} at {@code offset}.
 * Immutable once cut (the array is sent without copying). {@code last} marks the final chunk,
 * which carries {@code finish_write}; an empty object is one empty last chunk.
 */
record Chunk(long offset, byte[] data, int length, int crc32c, boolean last) {
  long end() {
    return offset + length;
  }
}
