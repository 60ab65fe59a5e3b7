package dev.recgw.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.recgw.v1.UploadRequest;
import dev.recgw.v1.UploadStart;
import dev.recgw.v1.UploadState;
import io.grpc.Status;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.Flow;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Resume decisions, retained memory and heartbeats, against the in-process {@link FakeGateway}. */
class ResumeTest {
  private static final int KIB = 1024;
  private static final UploadStart START = UploadStart.newBuilder().setTenantId("acme").setObjectName("live.webm").build();

  private FakeGateway gateway;
  private RecgwClient client;
  private final List<String> retries = new CopyOnWriteArrayList<>();

  @BeforeEach
  void setUp() throws IOException {
    gateway = new FakeGateway();
    client = gateway.client();
  }

  @AfterEach
  void tearDown() {
    client.close();
    gateway.close();
  }

  /** Fast backoff, 16 KiB chunks, and a record of every retry. */
  private UploadOptions.Builder fast() {
    return UploadOptions.builder()
        .chunkSize(16 * KIB)
        .backoff(Duration.ofMillis(1), Duration.ofMillis(20))
        .onRetry((attempt, cause, at) -> retries.add(attempt + ":" + cause.code() + ":" + cause.reason() + "@" + at));
  }

  private byte[] stored(UploadResult r) {
    return gateway.uploads.get(r.uploadId()).bytes.toByteArray();
  }

  /** Waits until the gateway has let the upload's stream go: it commits nothing more then. */
  private void awaitReleased(String uploadId) {
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
    while (System.nanoTime() < deadline && gateway.uploads.get(uploadId).writer != null) {
      Thread.onSpinWait();
    }
    assertEquals(null, gateway.uploads.get(uploadId).writer, "the stream was cancelled");
  }

  private static FakeGateway.Fault failOnce(int stream, long offset, Status.Code code, String reason) {
    return (s, m, u) -> s == stream && m.getWriteOffset() == offset && !m.hasStart()
        ? FakeGateway.error(code, reason, "injected", Map.of())
        : null;
  }

  @Test
  void resumesFromTheCommittedSizeAfterUnavailable() throws Exception {
    byte[] data = Testdata.ramp(300 * KIB);
    gateway.fault = failOnce(1, 160 * KIB, Status.Code.UNAVAILABLE, "");
    UploadResult r = client.upload(new ByteArrayInputStream(data), START, fast().build());

    assertArrayEquals(data, stored(r));
    assertEquals(2, gateway.streams.size());
    UploadRequest first = gateway.streams.get(1).get(0);
    assertTrue(first.hasStart(), "the resumed stream repeats start");
    assertEquals(r.uploadId(), first.getStart().getUploadId());
    assertEquals(128 * KIB, first.getWriteOffset(), "resumes at the committed size (two 64 KiB parts)");
    assertEquals(16 * KIB, first.getData().size(), "and re-sends the retained bytes from there");
    assertEquals(List.of("2:UNAVAILABLE:@" + 128 * KIB), retries);
    assertTrue(gateway.statusQueries.contains(r.uploadId()));
    for (String auth : gateway.authorizations) {
      assertEquals("Bearer " + FakeGateway.TOKEN, auth);
    }
  }

  @Test
  void anotherWriterIsRetriedWithBackoff() throws Exception {
    byte[] data = Testdata.ramp(100 * KIB);
    gateway.fault = (s, m, u) -> {
      if (s == 1 && m.getWriteOffset() == 80 * KIB) {
        return FakeGateway.error(Status.Code.UNAVAILABLE, "", "cut", Map.of());
      }
      if ((s == 2 || s == 3) && m.hasStart()) {
        return FakeGateway.error(Status.Code.ABORTED, "ANOTHER_WRITER", "another stream is writing", Map.of());
      }
      return null;
    };
    UploadResult r = client.upload(new ByteArrayInputStream(data), START, fast().build());
    assertArrayEquals(data, stored(r));
    assertEquals(4, gateway.streams.size());
    assertEquals(List.of("2:UNAVAILABLE:@" + 64 * KIB, "3:ABORTED:ANOTHER_WRITER@" + 64 * KIB, "4:ABORTED:ANOTHER_WRITER@" + 64 * KIB), retries);
  }

  @Test
  void offsetMismatchIsAnsweredByAStatusQueryNotByItsMetadata() throws Exception {
    byte[] data = Testdata.ramp(200 * KIB);
    gateway.fault = (s, m, u) -> s == 1 && m.getWriteOffset() == 144 * KIB
        ? FakeGateway.error(Status.Code.OUT_OF_RANGE, "OFFSET_MISMATCH", "wrong offset", Map.of("committed_size", "0"))
        : null;
    UploadResult r = client.upload(new ByteArrayInputStream(data), START, fast().build());
    assertArrayEquals(data, stored(r));
    assertEquals(128 * KIB, gateway.streams.get(1).get(0).getWriteOffset());
    assertEquals(List.of("2:OUT_OF_RANGE:OFFSET_MISMATCH@" + 128 * KIB), retries);
  }

  @Test
  void chunkChecksumMismatchIsResumedButObjectMismatchIsFinal() throws Exception {
    byte[] data = Testdata.ramp(100 * KIB);
    gateway.fault = failOnce(1, 32 * KIB, Status.Code.DATA_LOSS, "CHUNK_CHECKSUM_MISMATCH");
    assertArrayEquals(data, stored(client.upload(new ByteArrayInputStream(data), START, fast().build())));

    gateway.fault = (s, m, u) -> m.getFinishWrite()
        ? FakeGateway.error(Status.Code.DATA_LOSS, "OBJECT_CHECKSUM_MISMATCH", "object checksums differ", Map.of())
        : null;
    RecgwException e = assertThrows(RecgwException.class, () -> client.upload(new ByteArrayInputStream(data), START, fast().build()));
    assertEquals(Status.Code.DATA_LOSS, e.code());
    assertEquals("OBJECT_CHECKSUM_MISMATCH", e.reason());
    assertEquals(1, retries.size(), "only the chunk mismatch was retried");
  }

  @Test
  void finalErrorsAreNotRetriedAndNeverShowTheToken() {
    gateway.fault = (s, m, u) -> FakeGateway.error(
        Status.Code.UNAUTHENTICATED, "TOKEN_INVALID", "token " + FakeGateway.TOKEN + " is unknown", Map.of());
    AtomicReference<String> announced = new AtomicReference<>();
    RecgwException e = assertThrows(RecgwException.class, () -> client.upload(
        new ByteArrayInputStream(new byte[10]), START, fast().onUploadId(announced::set).build()));
    assertEquals(Status.Code.UNAUTHENTICATED, e.code());
    assertEquals("TOKEN_INVALID", e.reason());
    assertEquals(RecgwException.GATEWAY_DOMAIN, e.domain());
    assertEquals(announced.get(), e.uploadId());
    assertFalse(e.getMessage().contains(FakeGateway.TOKEN), e.getMessage());
    assertTrue(e.getMessage().contains(Redactor.REDACTED));
    assertEquals(1, gateway.streams.size());
    assertTrue(gateway.statusQueries.isEmpty());
    assertTrue(retries.isEmpty());
  }

  @Test
  void theUploadIdIsAUuid4KnownBeforeAnyByteIsSent() throws Exception {
    AtomicReference<String> announced = new AtomicReference<>();
    AtomicLong streamsWhenAnnounced = new AtomicLong(-1);
    UploadResult r = client.upload(new ByteArrayInputStream(new byte[5]), START, fast().onUploadId(id -> {
      announced.set(id);
      streamsWhenAnnounced.set(gateway.streams.size());
    }).build());
    assertEquals(0, streamsWhenAnnounced.get());
    assertTrue(announced.get().matches("[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"), announced.get());
    assertEquals(announced.get(), r.uploadId());
  }

  @Test
  void aLostFinishAnswerEndsWithTheStatusResult() throws Exception {
    byte[] data = Testdata.ramp(50 * KIB);
    gateway.loseFinishResponse = true;
    UploadResult r = client.upload(new ByteArrayInputStream(data), START, fast().build());
    assertArrayEquals(data, stored(r));
    assertEquals(data.length, r.size());
    assertEquals(1, gateway.streams.size(), "no new stream: the status said COMPLETE");
  }

  @Test
  void anUploadThatEndedMeanwhileIsAFinalError() {
    gateway.fault = (s, m, u) -> {
      if (m.getWriteOffset() == 64 * KIB) {
        u.state = UploadState.UPLOAD_STATE_ABORTED;
        return FakeGateway.error(Status.Code.UNAVAILABLE, "", "cut", Map.of());
      }
      return null;
    };
    RecgwException e = assertThrows(RecgwException.class,
        () -> client.upload(new ByteArrayInputStream(Testdata.ramp(100 * KIB)), START, fast().build()));
    assertEquals(Status.Code.FAILED_PRECONDITION, e.code());
    assertEquals(RecgwException.UPLOAD_ENDED, e.reason());
    assertTrue(e.isClientSide());
    assertTrue(e.getMessage().contains("aborted"), e.getMessage());
  }

  @Test
  void statusQueryFailuresAreRetriedToo() throws Exception {
    byte[] data = Testdata.ramp(100 * KIB);
    gateway.fault = failOnce(1, 80 * KIB, Status.Code.UNAVAILABLE, "");
    gateway.statusFailures.add(FakeGateway.error(Status.Code.UNAVAILABLE, "VAULT_UNAVAILABLE", "x", Map.of()));
    gateway.statusFailures.add(Status.DEADLINE_EXCEEDED.asRuntimeException());
    UploadResult r = client.upload(new ByteArrayInputStream(data), START, fast().build());
    assertArrayEquals(data, stored(r));
    assertEquals(3, gateway.statusQueries.size());
  }

  @Test
  void retriesStopAfterTheOutageToleranceWithoutProgress() {
    gateway.fault = (s, m, u) -> s > 1 || m.getWriteOffset() >= 64 * KIB
        ? FakeGateway.error(Status.Code.UNAVAILABLE, "", "down", Map.of())
        : null;
    long began = System.nanoTime();
    RecgwException e = assertThrows(RecgwException.class, () -> client.upload(
        new ByteArrayInputStream(Testdata.ramp(200 * KIB)), START, fast().outageTolerance(Duration.ofMillis(300)).build()));
    long tookMs = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - began);
    assertEquals(Status.Code.UNAVAILABLE, e.code());
    assertTrue(e.getMessage().contains("gave up resuming"), e.getMessage());
    assertTrue(gateway.streams.size() > 3, "kept trying for the tolerance: " + gateway.streams.size());
    assertTrue(tookMs >= 250 && tookMs < 5000, "took " + tookMs + " ms");
    assertEquals(64 * KIB, gateway.uploads.get(e.uploadId()).committed);
  }

  @Test
  void resumingIsImpossibleWhenTheGatewayWantsBytesAlreadyReleased() {
    gateway.partSize = 16 * KIB;
    AtomicLong trimmedAt = new AtomicLong();
    gateway.fault = (s, m, u) -> {
      if (m.getWriteOffset() == 512 * KIB) {
        trimmedAt.set(u.committed);
        u.committed = 0; // the gateway "forgot" committed parts the client has released
        return FakeGateway.error(Status.Code.UNAVAILABLE, "", "cut", Map.of());
      }
      return null;
    };
    UploadOptions opts = fast().retainedLimit(128 * KIB).build();
    RecgwException e = assertThrows(RecgwException.class,
        () -> client.upload(new ByteArrayInputStream(Testdata.ramp(1024 * KIB)), START, opts));
    assertEquals(RecgwException.RESUME_IMPOSSIBLE, e.reason());
    assertTrue(e.getMessage().contains("has 0 bytes committed"), e.getMessage());
    assertTrue(trimmedAt.get() > 0);
  }

  /** An InputStream over {@code data} that records how far ahead of the gateway it was read. */
  private final class Watched extends InputStream {
    private final byte[] data;
    private int position;
    long maxAhead;
    String uploadId;

    Watched(byte[] data) {
      this.data = data;
    }

    @Override
    public int read() {
      throw new UnsupportedOperationException();
    }

    @Override
    public int read(byte[] b, int off, int len) {
      if (position == data.length) {
        return -1;
      }
      int n = Math.min(len, data.length - position);
      System.arraycopy(data, position, b, off, n);
      position += n;
      FakeGateway.Upload u = uploadId == null ? null : gateway.uploads.get(uploadId);
      long committed = u == null ? 0 : u.committed;
      maxAhead = Math.max(maxAhead, position - committed);
      return n;
    }
  }

  @Test
  void aSlowGatewayHoldsTheSourceBackWithinTheRetainedLimit() throws Exception {
    byte[] data = Testdata.ramp(2048 * KIB);
    long limit = 256 * KIB;
    gateway.fault = (s, m, u) -> {
      try {
        Thread.sleep(1); // a gateway slower than the source: its flow control pushes back
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
      }
      return null;
    };
    Watched source = new Watched(data);
    UploadResult r = client.upload(source, START, fast().retainedLimit(limit).onUploadId(id -> source.uploadId = id).build());
    assertArrayEquals(data, stored(r));
    // Retained limit, plus the two chunks the chunker may hold, plus the read in progress.
    assertTrue(source.maxAhead <= limit + 3 * 16 * KIB, "read " + source.maxAhead + " bytes ahead of the gateway");
    assertTrue(source.maxAhead > limit / 2, "the buffer was used: " + source.maxAhead);
  }

  @Test
  void aFullBufferThatTheGatewayNeverCommitsFailsClearly() {
    gateway.committing = false;
    UploadOptions opts = fast().retainedLimit(64 * KIB).stallTimeout(Duration.ofMillis(200)).build();
    RecgwException e = assertThrows(RecgwException.class,
        () -> client.upload(new ByteArrayInputStream(Testdata.ramp(1024 * KIB)), START, opts));
    assertEquals(Status.Code.RESOURCE_EXHAUSTED, e.code());
    assertEquals(RecgwException.RETAINED_LIMIT_REACHED, e.reason());
    assertTrue(e.getMessage().contains("raise retainedLimit"), e.getMessage());
  }

  @Test
  void aSilentSourceGetsHeartbeats() throws Exception {
    CountDownLatch resume = new CountDownLatch(1);
    InputStream source = new InputStream() {
      int step;

      @Override
      public int read() {
        throw new UnsupportedOperationException();
      }

      @Override
      public int read(byte[] b, int off, int len) throws IOException {
        step++;
        if (step == 1) {
          b[off] = 42;
          return 1;
        }
        if (step == 2) {
          try {
            if (!resume.await(10, TimeUnit.SECONDS)) {
              throw new IOException("the test never saw heartbeats");
            }
          } catch (InterruptedException e) {
            throw new IOException(e);
          }
          b[off] = 43;
          return 1;
        }
        return -1;
      }
    };
    var future = client.uploadAsync(source, START, fast().heartbeat(Duration.ofMillis(50)).build());
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
    while (System.nanoTime() < deadline && (gateway.streams.isEmpty() || gateway.streams.get(0).size() < 3)) {
      Thread.onSpinWait();
    }
    List<UploadRequest> seen = List.copyOf(gateway.streams.get(0));
    resume.countDown();
    UploadResult r = future.get(10, TimeUnit.SECONDS);
    assertTrue(seen.size() >= 3, "heartbeats while the source was silent: " + seen.size());
    assertTrue(seen.get(0).hasStart(), "the first heartbeat carries start");
    for (UploadRequest m : seen) {
      assertEquals(0, m.getWriteOffset());
      assertTrue(m.getData().isEmpty());
      assertFalse(m.getFinishWrite());
    }
    assertArrayEquals(new byte[] {42, 43}, stored(r));
  }

  @Test
  void anExistingUploadResumesFromASeekableSourceAndNotFromAStream(@TempDir Path dir) throws Exception {
    byte[] data = Testdata.ramp(400 * KIB);
    AtomicReference<String> id = new AtomicReference<>();
    InputStream failing = new InputStream() {
      int position;

      @Override
      public int read() {
        throw new UnsupportedOperationException();
      }

      @Override
      public int read(byte[] b, int off, int len) throws IOException {
        if (position >= 200 * KIB) {
          // Crash once the gateway has committed some of it, so there is something to resume.
          long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
          while (System.nanoTime() < deadline
              && (gateway.uploads.get(id.get()) == null || gateway.uploads.get(id.get()).committed < 128 * KIB)) {
            Thread.onSpinWait();
          }
          throw new IOException("the recorder crashed");
        }
        int n = Math.min(len, 200 * KIB - position);
        System.arraycopy(data, position, b, off, n);
        position += n;
        return n;
      }
    };
    IOException crash = assertThrows(IOException.class, () -> client.upload(failing, START, fast().onUploadId(id::set).build()));
    assertEquals("the recorder crashed", crash.getMessage());
    // Chunks sent before the crash are still being committed until the gateway lets the
    // cancelled stream go (CI once read 128 KiB here and the resume then started at 192).
    awaitReleased(id.get());
    long committed = gateway.uploads.get(id.get()).committed;
    UploadStart resume = START.toBuilder().setUploadId(id.get()).build();

    RecgwException refused = assertThrows(RecgwException.class,
        () -> client.upload(new ByteArrayInputStream(data), resume, fast().build()));
    assertTrue(committed >= 128 * KIB);
    assertEquals(RecgwException.SOURCE_NOT_SEEKABLE, refused.reason());
    assertTrue(refused.getMessage().contains(committed + " bytes committed"), refused.getMessage());

    Path file = dir.resolve("recording.webm");
    Files.write(file, data);
    int streamsBefore = gateway.streams.size();
    UploadResult r = client.upload(file, resume, fast().build());
    assertArrayEquals(data, stored(r));
    UploadRequest first = gateway.streams.get(streamsBefore).get(0);
    assertEquals(committed, first.getWriteOffset(), "continues at the committed size");
    assertEquals(data.length, first.getStart().getExpectedSize());
    UploadRequest last = gateway.streams.get(gateway.streams.size() - 1).get(gateway.streams.get(gateway.streams.size() - 1).size() - 1);
    assertEquals(FakeGateway.crc(com.google.protobuf.ByteString.copyFrom(data)), last.getObjectChecksums().getCrc32C(),
        "whole-object checksums cover the bytes before the committed size too");
  }

  @Test
  void aStreamOfTheRemainingBytesResumesWithSourceOffset() throws Exception {
    byte[] data = Testdata.ramp(300 * KIB);
    gateway.fault = (s, m, u) -> s == 1 && m.getWriteOffset() == 160 * KIB
        ? FakeGateway.error(Status.Code.PERMISSION_DENIED, "ACCESS_DENIED", "denied", Map.of())
        : null;
    RecgwException denied = assertThrows(RecgwException.class, () -> client.upload(new ByteArrayInputStream(data), START, fast().build()));
    String id = denied.uploadId();
    assertNotNull(id);
    int committed = (int) client.status(id).committedSize();
    assertEquals(128 * KIB, committed);
    gateway.fault = (s, m, u) -> null;
    UploadResult r = client.upload(
        new ByteArrayInputStream(data, committed, data.length - committed),
        START.toBuilder().setUploadId(id).build(),
        fast().sourceOffset(committed).build());
    assertArrayEquals(data, stored(r));
  }

  /** Publishes {@code total} bytes in 10 KiB buffers, only as requested. */
  private static final class CountingPublisher implements Flow.Publisher<ByteBuffer> {
    final byte[] data;
    volatile long maxOutstanding;
    long outstanding;
    int position;

    CountingPublisher(byte[] data) {
      this.data = data;
    }

    @Override
    public void subscribe(Flow.Subscriber<? super ByteBuffer> subscriber) {
      subscriber.onSubscribe(new Flow.Subscription() {
        boolean emitting;

        @Override
        public synchronized void request(long n) {
          outstanding += n;
          maxOutstanding = Math.max(maxOutstanding, outstanding);
          if (emitting) {
            return;
          }
          emitting = true;
          while (outstanding > 0 && position < data.length) {
            int len = Math.min(10 * KIB, data.length - position);
            ByteBuffer buffer = ByteBuffer.wrap(data, position, len);
            position += len;
            outstanding--;
            subscriber.onNext(buffer);
          }
          emitting = false;
          if (position == data.length) {
            position++;
            subscriber.onComplete();
          }
        }

        @Override
        public void cancel() {}
      });
    }
  }

  @Test
  void aPublisherIsAskedForOneBufferAtATime() throws Exception {
    byte[] data = Testdata.ramp(1024 * KIB);
    gateway.fault = failOnce(1, 320 * KIB, Status.Code.UNAVAILABLE, "");
    CountingPublisher source = new CountingPublisher(data);
    UploadResult r = client.uploadAsync(source, START, fast().retainedLimit(128 * KIB).build()).get(30, TimeUnit.SECONDS);
    assertArrayEquals(data, stored(r));
    assertEquals(1, source.maxOutstanding);
    assertEquals(1, retries.size());
  }

  @Test
  void cancellingAnAsyncUploadCancelsTheStreamAndLeavesTheUploadOpen() throws Exception {
    CountDownLatch never = new CountDownLatch(1);
    AtomicReference<String> id = new AtomicReference<>();
    InputStream source = new InputStream() {
      int reads;

      @Override
      public int read() {
        throw new UnsupportedOperationException();
      }

      @Override
      public int read(byte[] b, int off, int len) throws IOException {
        if (reads++ < 8) {
          java.util.Arrays.fill(b, off, off + len, (byte) 7);
          return len;
        }
        try {
          never.await(); // a live source that has nothing more yet
        } catch (InterruptedException e) {
          throw new IOException(e);
        }
        return -1;
      }
    };
    var future = client.uploadAsync(source, START, fast().onUploadId(id::set).build());
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
    while (System.nanoTime() < deadline && (gateway.uploads.get(id.get()) == null || gateway.uploads.get(id.get()).committed < 64 * KIB)) {
      Thread.onSpinWait();
    }
    assertTrue(future.cancel(true));
    awaitReleased(id.get());
    UploadStatus status = client.status(id.get());
    assertEquals(UploadState.UPLOAD_STATE_OPEN, status.state());
    assertEquals(64 * KIB, status.committedSize(), "112 KiB sent (the 8th chunk is held back), one part");
    never.countDown();
  }

  @Test
  void asyncFailuresBeforeTheFirstStreamCompleteTheFuture() {
    var future = client.uploadAsync(new ByteArrayInputStream(new byte[1]), START,
        fast().onUploadId(id -> { throw new IllegalStateException("journal full"); }).build());
    var e = assertThrows(java.util.concurrent.ExecutionException.class, future::get);
    assertEquals("journal full", e.getCause().getMessage());
    assertTrue(gateway.streams.isEmpty());
  }
}
