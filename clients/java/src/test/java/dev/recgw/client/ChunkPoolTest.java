package dev.recgw.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotSame;
import static org.junit.jupiter.api.Assertions.assertSame;

import java.io.ByteArrayInputStream;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;

class ChunkPoolTest {
  private static final int CHUNK = 4;

  @Test
  void releasedChunksAreFilledAgainAndHeldOnesNever() throws Exception {
    ChunkPool pool = new ChunkPool(CHUNK, 8);
    MemoryGate gate = new MemoryGate(1 << 20);
    RetainedBuffer retained = new RetainedBuffer(0, gate, pool);
    List<Chunk> cut = new ArrayList<>();
    Chunker chunker = new Chunker(CHUNK, 0, true, null, pool, chunk -> {
      gate.force(chunk.length());
      retained.append(chunk);
      cut.add(chunk);
    });
    ByteArrayInputStream source = new ByteArrayInputStream(new byte[] {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13});
    Chunker.Reader in = (b, off, len) -> source.read(b, off, Math.min(len, 1)); // a byte a read
    while (cut.size() < 2) {
      chunker.readFrom(in);
    }
    byte[] first = cut.get(0).data();
    byte[] second = cut.get(1).data();
    assertNotSame(first, second);

    // Committed up to the middle of the second chunk: only the first goes back.
    retained.release(6);
    assertEquals(1, pool.size());
    assertEquals(CHUNK, gate.used());
    while (chunker.readFrom(in)) {
      // the rest of the source
    }
    chunker.finish();
    assertEquals(4, cut.size());
    assertSame(first, cut.get(3).data(), "the fourth chunk fills the first one's array");
    assertEquals(13, cut.get(3).data()[0]);
    assertEquals(ObjectHasher.crc32c(new byte[] {13}, 0, 1), cut.get(3).crc32c());
    assertEquals(List.of(5, 6, 7, 8), List.of(second[0], second[1], second[2], second[3]).stream().map(Byte::intValue).toList(),
        "the held second chunk is untouched");
    // An upload that ends keeps nothing for reuse: a cancelled stream may still be reading.
    retained.clear();
    assertEquals(0, pool.size());
  }

  @Test
  void keepsAtMostItsCapacityAndOnlyWholeChunkArrays() {
    ChunkPool pool = new ChunkPool(CHUNK, 2);
    pool.give(new byte[CHUNK]);
    pool.give(new byte[CHUNK]);
    pool.give(new byte[CHUNK]);
    pool.give(new byte[CHUNK - 1]);
    assertEquals(2, pool.size());
    pool.take();
    pool.take();
    assertEquals(CHUNK, pool.take().length);
    assertEquals(0, pool.size());
  }
}
