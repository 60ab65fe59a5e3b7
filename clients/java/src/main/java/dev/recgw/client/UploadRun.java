package dev.recgw.client;

import com.google.protobuf.ByteString;
import com.google.protobuf.UnsafeByteOperations;
import dev.recgw.v1.GetUploadStatusRequest;
import dev.recgw.v1.GetUploadStatusResponse;
import dev.recgw.v1.ObjectChecksums;
import dev.recgw.v1.UploadRequest;
import dev.recgw.v1.UploadResponse;
import dev.recgw.v1.UploadServiceGrpc;
import dev.recgw.v1.UploadStart;
import dev.recgw.v1.UploadState;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ForwardingClientCall;
import io.grpc.ForwardingClientCallListener;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import io.grpc.stub.StreamObserver;
import java.time.Duration;
import java.util.Arrays;
import java.util.concurrent.CancellationException;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.ScheduledThreadPoolExecutor;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;

/**
 * One upload: its streams, the retained bytes, and the status queries that trim them and decide
 * how to resume.
 *
 * <p>Everything but {@link #offer}, {@link #sourceFailed} and the memory gate runs on the
 * upload's own single thread (the "loop"): gRPC's callbacks of its calls, timers, status answers.
 * The producer (a reader thread or a publisher) cuts chunks, takes room for them in the gate and
 * hands them over.
 *
 * <p>How a failed stream resumes (CLIENT_SPEC, testdata/retry_table.json): the status code and
 * ErrorInfo reason pick resume or fail; resume waits the backoff, asks GetUploadStatus, and
 * opens a new stream whose first message repeats {@code start} at {@code write_offset} =
 * committed size, re-sending the retained bytes from there. COMPLETE (and COMPLETION_UNCONFIRMED)
 * ends the upload with the status's result; ABORTED, EXPIRED and SALVAGED end it with an error.
 */
final class UploadRun {
  static final Metadata.Key<String> UPLOAD_ID_HEADER =
      Metadata.Key.of("x-recgw-upload-id", Metadata.ASCII_STRING_MARSHALLER);

  private static final long POLL_INITIAL_NANOS = TimeUnit.MILLISECONDS.toNanos(50);
  private static final long POLL_MAX_NANOS = TimeUnit.SECONDS.toNanos(1);
  // A stream the gateway accepted that stays up this long ends an outage.
  private static final long HEALTHY_STREAM_NANOS = TimeUnit.SECONDS.toNanos(10);

  /** Thrown to the producer once the upload has ended, so it stops reading. */
  static final class Ended extends RuntimeException {
    private static final long serialVersionUID = 1L;

    Ended() {
      super("the upload has ended", null, false, false);
    }
  }

  final CompletableFuture<UploadResult> result = new CompletableFuture<>();

  private final Channel channel;
  private final Redactor redactor;
  private final Duration callTimeout;
  private final UploadOptions opts;
  private final ScheduledThreadPoolExecutor loop;
  private final MemoryGate gate;
  private final RetainedBuffer retained;
  private final ChunkPool pool;
  private final ObjectHasher hasher;
  private final long heartbeatNanos;
  private final long healthyNanos;

  // Loop-confined state.
  private UploadStart start;
  private String uploadId;
  private Stream current;
  private int streams;
  private boolean finishEverSent;
  private long committed;
  private long sentHigh;
  private int failures;
  private long outageSince = -1;
  private RecgwException lastError;
  private boolean trimInFlight;
  private long trimQueriedAt;
  private boolean roomPolling;
  private long roomPollNanos;
  private long stallSince = -1;
  private ScheduledFuture<?> heartbeatTask;
  private boolean done;

  UploadRun(
      Channel channel,
      Redactor redactor,
      Duration callTimeout,
      UploadStart start,
      UploadOptions opts,
      long startOffset,
      ObjectHasher hasher) {
    this.channel = channel;
    this.redactor = redactor;
    this.callTimeout = callTimeout;
    this.start = start;
    this.uploadId = start.getUploadId();
    this.opts = opts;
    this.hasher = hasher;
    this.gate = new MemoryGate(opts.retainedLimit);
    this.pool = ChunkPool.forUpload(opts.chunkSize, opts.retainedLimit);
    this.retained = new RetainedBuffer(startOffset, gate, pool);
    this.committed = startOffset;
    this.sentHigh = startOffset;
    this.heartbeatNanos = opts.heartbeat.toNanos();
    this.healthyNanos = Math.min(HEALTHY_STREAM_NANOS, opts.outageTolerance.toNanos() / 2);
    this.loop =
        new ScheduledThreadPoolExecutor(
            1,
            r -> {
              Thread t = new Thread(r, "recgw-upload-" + uploadId);
              t.setDaemon(true);
              return t;
            },
            // Callbacks of calls that ended with the upload are dropped.
            (r, executor) -> {});
    loop.setExecuteExistingDelayedTasksAfterShutdownPolicy(false);
    loop.setRemoveOnCancelPolicy(true);
    gate.onBlocked(() -> loop.execute(this::onProducerBlocked));
    result.whenComplete(
        (r, t) -> {
          if (t instanceof CancellationException) {
            loop.execute(this::cancelled);
          }
        });
  }

  MemoryGate gate() {
    return gate;
  }

  ChunkPool pool() {
    return pool;
  }

  /** Opens the first stream. */
  void begin() {
    loop.execute(
        () -> {
          long every = Math.max(heartbeatNanos / 4, TimeUnit.MILLISECONDS.toNanos(10));
          heartbeatTask = loop.scheduleAtFixedRate(this::heartbeat, every, every, TimeUnit.NANOSECONDS);
          openStream(retained.start());
        });
  }

  /** Hands over the next chunk (producer thread; room for it was taken in the gate). */
  void offer(Chunk chunk) {
    loop.execute(() -> onChunk(chunk));
  }

  /** The source failed: the upload ends with {@code error}, staying open in the gateway. */
  void sourceFailed(Throwable error) {
    loop.execute(() -> fail(error));
  }

  boolean isDone() {
    return result.isDone();
  }

  // --- the loop -----------------------------------------------------------------------------

  private void onChunk(Chunk chunk) {
    if (done) {
      return;
    }
    retained.append(chunk);
    if (current != null) {
      current.pump();
    }
  }

  private void openStream(long resumeAt) {
    if (done) {
      return;
    }
    streams++;
    current = new Stream(resumeAt);
    current.open();
  }

  private void heartbeat() {
    Stream s = current;
    if (s != null && !done) {
      s.heartbeat();
    }
  }

  private void progress(long sent) {
    try {
      opts.onProgress.onProgress(committed, sent);
    } catch (RuntimeException e) {
      fail(e);
    }
  }

  private void noteCommitted(long size) {
    if (size > committed) {
      committed = size;
      endOutage();
      progress(current == null ? sentHigh : current.sent);
    }
  }

  private void endOutage() {
    outageSince = -1;
    failures = 0;
  }

  private void streamFailed(Stream stream, RecgwException error) {
    lastError = error;
    if (RetryRules.actionFor(error) == RetryRules.Action.FAIL) {
      fail(error);
      return;
    }
    if (stream.gotHeaders && System.nanoTime() - stream.openedAt >= healthyNanos) {
      endOutage();
    }
    scheduleResume(error);
  }

  /** Waits the backoff, then asks the status; gives up after the outage tolerance. */
  private void scheduleResume(RecgwException error) {
    long now = System.nanoTime();
    if (outageSince < 0) {
      outageSince = now;
    }
    failures++;
    long delay = opts.backoff.delayNanos(failures, ThreadLocalRandom.current()::nextDouble);
    long outage = now - outageSince;
    if (outage + delay > opts.outageTolerance.toNanos()) {
      fail(
          error.withNote(
              "gave up resuming: nothing new was committed for "
                  + TimeUnit.NANOSECONDS.toSeconds(outage)
                  + " s (outage tolerance "
                  + opts.outageTolerance.toSeconds()
                  + " s); upload "
                  + uploadId
                  + " stays open at "
                  + committed
                  + " committed bytes"));
      return;
    }
    loop.schedule(this::queryForResume, delay, TimeUnit.NANOSECONDS);
  }

  private void queryForResume() {
    if (done) {
      return;
    }
    queryStatus(
        status -> {
          noteCommitted(status.getCommittedSize());
          switch (status.getState()) {
            case UPLOAD_STATE_COMPLETE, UPLOAD_STATE_COMPLETION_UNCONFIRMED -> finishFromStatus(status);
            case UPLOAD_STATE_ABORTED, UPLOAD_STATE_EXPIRED, UPLOAD_STATE_SALVAGED -> fail(ended(status));
            case UPLOAD_STATE_FINISHING -> scheduleResume(lastError); // let the completion end
            default -> resumeFrom(status.getCommittedSize());
          }
        },
        error -> {
          if (error.code() == Status.Code.NOT_FOUND) {
            if (retained.start() == 0) {
              resumeFrom(0); // the stream died before the gateway registered the upload
            } else {
              fail(
                  RecgwException.client(
                      Status.Code.NOT_FOUND,
                      RecgwException.RESUME_IMPOSSIBLE,
                      "the gateway no longer knows upload "
                          + uploadId
                          + ", and its first "
                          + retained.start()
                          + " bytes are no longer held to send again",
                      uploadId));
            }
          } else if (RetryRules.actionFor(error) == RetryRules.Action.RESUME) {
            scheduleResume(error);
          } else {
            fail(error);
          }
        });
  }

  private void resumeFrom(long size) {
    if (size < retained.start() || size > retained.end()) {
      String why =
          size < retained.start()
              ? "the client released those bytes after the gateway had reported "
                  + retained.start()
                  + " bytes committed"
              : "that is more than the client has sent; is another client writing this upload id?";
      fail(
          RecgwException.client(
              Status.Code.FAILED_PRECONDITION,
              RecgwException.RESUME_IMPOSSIBLE,
              "cannot resume upload "
                  + uploadId
                  + ": the gateway has "
                  + size
                  + " bytes committed, the client holds bytes "
                  + retained.start()
                  + " to "
                  + retained.end()
                  + "; "
                  + why,
              uploadId));
      return;
    }
    retained.release(size);
    try {
      opts.onRetry.onRetry(streams + 1, lastError, size);
    } catch (RuntimeException e) {
      fail(e);
      return;
    }
    openStream(size);
  }

  private void finishFromStatus(GetUploadStatusResponse status) {
    if (!finishEverSent) {
      fail(
          RecgwException.client(
              Status.Code.FAILED_PRECONDITION,
              RecgwException.RESULT_MISMATCH,
              "upload " + uploadId + " was completed by another stream before this client sent all its data",
              uploadId));
      return;
    }
    if (!status.hasResult()) {
      fail(
          RecgwException.client(
              Status.Code.UNKNOWN,
              RecgwException.RESULT_MISMATCH,
              "upload " + uploadId + " is complete but the gateway gave no result",
              uploadId));
      return;
    }
    boolean unconfirmed = status.getState() == UploadState.UPLOAD_STATE_COMPLETION_UNCONFIRMED;
    complete(UploadResult.of(status.getResult(), uploadId, unconfirmed));
  }

  static RecgwException ended(GetUploadStatusResponse status) {
    String state = status.getState().name().replace("UPLOAD_STATE_", "").toLowerCase(java.util.Locale.ROOT);
    String why = status.getErrorMessage().isEmpty() ? "no reason given" : status.getErrorMessage();
    return RecgwException.client(
        Status.Code.FAILED_PRECONDITION,
        RecgwException.UPLOAD_ENDED,
        "upload " + status.getUploadId() + " is " + state + ": " + why + "; start a new upload",
        status.getUploadId());
  }

  // --- memory -------------------------------------------------------------------------------

  /** After each message: once half the limit is held, ask for the committed size now and then. */
  private void maybeTrim() {
    long limit = gate.limit();
    long step = Math.max(opts.chunkSize, limit / 8);
    if (!trimInFlight && retained.heldBytes() > limit / 2 && sentHigh - trimQueriedAt >= step) {
      trimQuery();
    }
  }

  private void trimQuery() {
    trimInFlight = true;
    trimQueriedAt = sentHigh;
    queryStatus(
        status -> {
          trimInFlight = false;
          noteCommitted(status.getCommittedSize());
          State open = State.of(status.getState());
          if (open == State.OPEN && current != null) {
            // Never past what the current stream has sent: it reads its next bytes from here.
            retained.release(Math.min(status.getCommittedSize(), current.sent));
          }
          checkStall(status);
        },
        error -> trimInFlight = false); // a broken stream reports the real problem
  }

  private void onProducerBlocked() {
    if (done || roomPolling) {
      return;
    }
    roomPolling = true;
    roomPollNanos = POLL_INITIAL_NANOS;
    pollRoom();
  }

  private void pollRoom() {
    if (done) {
      return;
    }
    if (!gate.isBlocked()) {
      roomPolling = false;
      stallSince = -1;
      return;
    }
    if (!trimInFlight) {
      trimQuery();
    }
    loop.schedule(this::pollRoom, roomPollNanos, TimeUnit.NANOSECONDS);
    roomPollNanos = Math.min(roomPollNanos * 2, POLL_MAX_NANOS);
  }

  /**
   * The buffer is full and the gateway holds every byte read but commits none: it waits for more
   * bytes than the limit lets the client hold (a part larger than the limit). Fail clearly
   * rather than hang.
   */
  private void checkStall(GetUploadStatusResponse status) {
    boolean stalled =
        gate.isBlocked()
            && current != null
            && !current.ended
            && status.getReceivedSize() >= retained.end()
            && status.getCommittedSize() < retained.end();
    if (!stalled) {
      stallSince = -1;
      return;
    }
    long now = System.nanoTime();
    if (stallSince < 0) {
      stallSince = now;
    } else if (now - stallSince >= opts.stallTimeout.toNanos()) {
      fail(
          RecgwException.client(
              Status.Code.RESOURCE_EXHAUSTED,
              RecgwException.RETAINED_LIMIT_REACHED,
              "the retained buffer is full ("
                  + gate.limit()
                  + " bytes) and the gateway, holding every byte sent, committed nothing for "
                  + opts.stallTimeout.toSeconds()
                  + " s: it waits to fill a part larger than the limit; raise retainedLimit",
              uploadId));
    }
  }

  // --- ending -------------------------------------------------------------------------------

  private void complete(UploadResult r) {
    if (done) {
      return;
    }
    RecgwException mismatch = check(r);
    if (mismatch != null) {
      fail(mismatch);
      return;
    }
    done = true;
    cleanUp(null);
    progress(r.size());
    result.complete(r);
  }

  /** Null if the result describes the bytes read and hashed. */
  private RecgwException check(UploadResult r) {
    String problem = null;
    if (retained.eof() && r.size() != retained.end()) {
      problem = "the gateway stored " + r.size() + " bytes, the client sent " + retained.end();
    } else if (hasher != null && retained.eof()) {
      boolean crcDiffers =
          r.crc32c().isPresent() && r.crc32c().getAsLong() != Integer.toUnsignedLong(hasher.crc32c());
      boolean shaDiffers = r.sha256().length > 0 && !Arrays.equals(r.sha256(), hasher.sha256());
      if (crcDiffers || shaDiffers) {
        problem = "the gateway's checksums differ from those of the bytes sent";
      }
    }
    if (problem == null) {
      return null;
    }
    return RecgwException.client(
        Status.Code.DATA_LOSS, RecgwException.RESULT_MISMATCH, "upload " + uploadId + ": " + problem, uploadId);
  }

  private void fail(Throwable error) {
    if (done) {
      return;
    }
    done = true;
    Throwable reported = error instanceof RecgwException r ? r.withUploadId(uploadId) : error;
    cleanUp(reported.getMessage());
    result.completeExceptionally(reported);
  }

  private void cancelled() {
    if (done) {
      return;
    }
    done = true;
    cleanUp("the caller cancelled the upload");
  }

  private void cleanUp(String why) {
    gate.fail(new Ended());
    if (heartbeatTask != null) {
      heartbeatTask.cancel(false);
    }
    if (current != null && !current.ended && current.requests != null) {
      current.ended = true;
      current.requests.cancel(why == null ? "the upload ended" : why, null);
    }
    retained.clear();
    loop.shutdown();
  }

  // --- status queries -----------------------------------------------------------------------

  private void queryStatus(
      java.util.function.Consumer<GetUploadStatusResponse> onStatus,
      java.util.function.Consumer<RecgwException> onError) {
    UploadServiceGrpc.newStub(channel)
        .withExecutor(loop)
        .withDeadlineAfter(callTimeout.toNanos(), TimeUnit.NANOSECONDS)
        .getUploadStatus(
            GetUploadStatusRequest.newBuilder().setUploadId(uploadId).build(),
            new StreamObserver<>() {
              private GetUploadStatusResponse response;

              @Override
              public void onNext(GetUploadStatusResponse value) {
                response = value;
              }

              @Override
              public void onError(Throwable t) {
                if (!done) {
                  onError.accept(RecgwException.fromGrpc(t, uploadId, redactor));
                }
              }

              @Override
              public void onCompleted() {
                if (!done && response != null) {
                  onStatus.accept(response);
                }
              }
            });
  }

  /** The states that matter for trimming. */
  private enum State {
    OPEN,
    OTHER;

    static State of(UploadState s) {
      return s == UploadState.UPLOAD_STATE_OPEN || s == UploadState.UPLOAD_STATE_FINISHING ? OPEN : OTHER;
    }
  }

  // --- one stream ---------------------------------------------------------------------------

  /** One Upload call: start at the resume offset, the retained bytes, new data, finish_write. */
  private final class Stream implements ClientResponseObserver<UploadRequest, UploadResponse> {
    final long resumeAt;
    long sent;
    long openedAt;
    long lastSendAt;
    boolean startSent;
    boolean finishSent;
    boolean gotHeaders;
    boolean ended;
    ClientCallStreamObserver<UploadRequest> requests;
    private UploadResponse response;

    Stream(long resumeAt) {
      this.resumeAt = resumeAt;
      this.sent = resumeAt;
    }

    void open() {
      openedAt = System.nanoTime();
      lastSendAt = openedAt;
      UploadServiceGrpc.newStub(channel).withExecutor(loop).withInterceptors(new HeaderWatch()).upload(this);
    }

    @Override
    public void beforeStart(ClientCallStreamObserver<UploadRequest> requestStream) {
      this.requests = requestStream;
      requestStream.setOnReadyHandler(this::pump);
    }

    /** Sends what it can while gRPC is ready (backpressure: isReady / onReady). */
    void pump() {
      if (ended || finishSent || done || current != this || requests == null) {
        return;
      }
      while (requests.isReady()) {
        UploadRequest message = next();
        if (message == null) {
          return;
        }
        send(message);
        if (finishSent) {
          return;
        }
      }
    }

    void heartbeat() {
      if (ended || finishSent || requests == null || !requests.isReady()) {
        return;
      }
      if (System.nanoTime() - lastSendAt < heartbeatNanos) {
        return;
      }
      UploadRequest.Builder message = UploadRequest.newBuilder().setWriteOffset(sent);
      if (!startSent) {
        message.setStart(start);
        startSent = true;
      }
      send(message.build());
    }

    private UploadRequest next() {
      if (sent < retained.start()) {
        fail(new IllegalStateException("internal error: bytes released before they were sent"));
        return null;
      }
      UploadRequest.Builder message = UploadRequest.newBuilder().setWriteOffset(sent);
      RetainedBuffer.Slice slice = retained.slice(sent);
      if (slice != null) {
        message.setData(UnsafeByteOperations.unsafeWrap(slice.data(), slice.from(), slice.length()));
        if (opts.checksums) {
          int crc =
              slice.whole() ? slice.crc32c() : ObjectHasher.crc32c(slice.data(), slice.from(), slice.length());
          message.setDataCrc32C(crc);
        }
        sent += slice.length();
      } else if (!(retained.eof() && sent == retained.end())) {
        return null;
      }
      if (retained.eof() && sent == retained.end()) {
        message.setFinishWrite(true);
        if (hasher != null) {
          message.setObjectChecksums(
              ObjectChecksums.newBuilder()
                  .setCrc32C(hasher.crc32c())
                  .setSha256(ByteString.copyFrom(hasher.sha256())));
        }
      }
      if (!startSent) {
        message.setStart(start);
        startSent = true;
      }
      return message.build();
    }

    private void send(UploadRequest message) {
      requests.onNext(message);
      lastSendAt = System.nanoTime();
      if (sent > sentHigh) {
        sentHigh = sent;
      }
      if (message.getFinishWrite()) {
        finishSent = true;
        finishEverSent = true;
        requests.onCompleted();
      }
      if (!message.getData().isEmpty()) {
        progress(sent);
        maybeTrim();
      }
    }

    @Override
    public void onNext(UploadResponse value) {
      response = value;
    }

    @Override
    public void onError(Throwable t) {
      if (ended || current != this || done) {
        ended = true;
        return;
      }
      ended = true;
      streamFailed(this, RecgwException.fromGrpc(t, uploadId, redactor));
    }

    @Override
    public void onCompleted() {
      boolean mine = !ended && current == this;
      ended = true;
      if (!mine || done) {
        return;
      }
      if (!finishSent || response == null) {
        fail(
            RecgwException.client(
                Status.Code.UNKNOWN,
                RecgwException.RESULT_MISMATCH,
                "the gateway ended upload " + uploadId + " before the client sent all its data",
                uploadId));
        return;
      }
      complete(UploadResult.of(response, uploadId, false));
    }

    void onHeaders(Metadata headers) {
      if (current != this || done) {
        return;
      }
      gotHeaders = true;
      String id = headers.get(UPLOAD_ID_HEADER);
      if (id != null && !id.equals(uploadId)) {
        // The gateway's word decides which upload a resume continues.
        uploadId = id;
        start = start.toBuilder().setUploadId(id).build();
        try {
          opts.onUploadId.accept(id);
        } catch (RuntimeException e) {
          fail(e);
        }
      }
    }

    /** Reports the response headers (the upload id) on the loop, as gRPC calls listeners there. */
    private final class HeaderWatch implements ClientInterceptor {
      @Override
      public <Q, R> ClientCall<Q, R> interceptCall(
          MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
        return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
          @Override
          public void start(Listener<R> listener, Metadata headers) {
            super.start(
                new ForwardingClientCallListener.SimpleForwardingClientCallListener<>(listener) {
                  @Override
                  public void onHeaders(Metadata received) {
                    Stream.this.onHeaders(received);
                    super.onHeaders(received);
                  }
                },
                headers);
          }
        };
      }
    }
  }
}
