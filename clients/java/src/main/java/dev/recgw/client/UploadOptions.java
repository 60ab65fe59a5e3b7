package dev.recgw.client;

import java.time.Duration;
import java.util.Objects;
import java.util.function.Consumer;

/**
 * How one upload behaves. Immutable; build with {@link #builder()}, or use {@link #defaults()}.
 *
 * <p>Memory: the upload keeps every byte from the gateway's committed size on (the retained
 * buffer, at most {@link Builder#retainedLimit}) so that a new stream can send it again. Beyond
 * that it holds at most two chunks being cut from the source and one message queued in gRPC
 * (grpc-java's {@code isReady} turns false above 32 KiB of queued data, and the upload then waits
 * for {@code onReady}); an asynchronous publisher may overshoot by the one buffer it delivered.
 */
public final class UploadOptions {
  private static final long MIB = 1024 * 1024;

  /** Default retained limit: 64 MiB. */
  public static final long DEFAULT_RETAINED_LIMIT = 64 * MIB;
  /** Default bytes of data per message: 1 MiB. */
  public static final int DEFAULT_CHUNK_SIZE = (int) MIB;
  /** Largest chunk the gateway accepts: 4 MiB. */
  public static final int MAX_CHUNK_SIZE = (int) (4 * MIB);
  /** Default time without progress after which resuming gives up: 300 s. */
  public static final Duration DEFAULT_OUTAGE_TOLERANCE = Duration.ofSeconds(300);
  /** Default silence after which an empty message keeps the stream alive: 2 s. */
  public static final Duration DEFAULT_HEARTBEAT = Duration.ofSeconds(2);

  private static final UploadOptions DEFAULTS = builder().build();

  final long retainedLimit;
  final Duration outageTolerance;
  final int chunkSize;
  final boolean checksums;
  final Consumer<String> onUploadId;
  final ProgressListener onProgress;
  final RetryListener onRetry;
  final Duration heartbeat;
  final Backoff backoff;
  final long sourceOffset;
  final Duration stallTimeout;

  private UploadOptions(Builder b) {
    this.retainedLimit = b.retainedLimit;
    this.outageTolerance = b.outageTolerance;
    this.chunkSize = b.chunkSize;
    this.checksums = b.checksums;
    this.onUploadId = b.onUploadId;
    this.onProgress = b.onProgress;
    this.onRetry = b.onRetry;
    this.heartbeat = b.heartbeat;
    this.backoff = new Backoff(b.initialBackoff, 2.0, b.maxBackoff, 0.2);
    this.sourceOffset = b.sourceOffset;
    this.stallTimeout = b.stallTimeout;
  }

  /** The defaults: 64 MiB retained, 300 s outage tolerance, 1 MiB chunks, checksums on. */
  public static UploadOptions defaults() {
    return DEFAULTS;
  }

  public static Builder builder() {
    return new Builder();
  }

  /** Builds {@link UploadOptions}. */
  public static final class Builder {
    private long retainedLimit = DEFAULT_RETAINED_LIMIT;
    private Duration outageTolerance = DEFAULT_OUTAGE_TOLERANCE;
    private int chunkSize = DEFAULT_CHUNK_SIZE;
    private boolean checksums = true;
    private Consumer<String> onUploadId = id -> {};
    private ProgressListener onProgress = (c, s) -> {};
    private RetryListener onRetry = (a, e, r) -> {};
    private Duration heartbeat = DEFAULT_HEARTBEAT;
    private Duration initialBackoff = Backoff.DEFAULT.initial();
    private Duration maxBackoff = Backoff.DEFAULT.max();
    private long sourceOffset;
    private Duration stallTimeout = Duration.ofSeconds(10);

    private Builder() {}

    /**
     * Most bytes kept for sending again (default 64 MiB). It must exceed the gateway's part size
     * plus the parts it writes at once. When it is full the source is not read until the
     * gateway commits more; if the gateway holds every byte sent and commits none for 10 s, the
     * upload fails with {@link RecgwException#RETAINED_LIMIT_REACHED}.
     */
    public Builder retainedLimit(long bytes) {
      if (bytes <= 0) {
        throw new IllegalArgumentException("retainedLimit must be positive");
      }
      this.retainedLimit = bytes;
      return this;
    }

    /**
     * How long resuming keeps trying while nothing new gets committed (default 300 s). The clock
     * starts when a stream fails and restarts whenever the committed size grows, or when a
     * stream the gateway accepted stays up for 10 s.
     */
    public Builder outageTolerance(Duration tolerance) {
      if (tolerance.isNegative()) {
        throw new IllegalArgumentException("outageTolerance must not be negative");
      }
      this.outageTolerance = tolerance;
      return this;
    }

    /** Bytes of data per message, 1 to 4 MiB (default 1 MiB). */
    public Builder chunkSize(int bytes) {
      if (bytes <= 0 || bytes > MAX_CHUNK_SIZE) {
        throw new IllegalArgumentException("chunkSize must be between 1 and " + MAX_CHUNK_SIZE + " bytes");
      }
      this.chunkSize = bytes;
      return this;
    }

    /**
     * Per-message CRC32C and whole-object CRC32C + SHA-256, verified by the gateway (default
     * on). Off saves the CPU of hashing; S3 then gets the bytes unchecked end to end.
     */
    public Builder checksums(boolean on) {
      this.checksums = on;
      return this;
    }

    /**
     * Called with the upload id before any byte is sent (the client chooses a uuid4 unless
     * {@code UploadStart.upload_id} is set), and again only if the gateway answers with another
     * id. If it throws, the upload fails with that exception.
     */
    public Builder onUploadId(Consumer<String> listener) {
      this.onUploadId = Objects.requireNonNull(listener);
      return this;
    }

    /** Called after each message sent and each committed size learnt. */
    public Builder onProgress(ProgressListener listener) {
      this.onProgress = Objects.requireNonNull(listener);
      return this;
    }

    /** Called before each resumed stream opens. */
    public Builder onRetry(RetryListener listener) {
      this.onRetry = Objects.requireNonNull(listener);
      return this;
    }

    /**
     * Silence after which an empty message goes out (default 2 s), so the gateway's takeover
     * rule (5 s without a message) never hits a live but slow source.
     */
    public Builder heartbeat(Duration interval) {
      if (interval.isNegative() || interval.isZero()) {
        throw new IllegalArgumentException("heartbeat must be positive");
      }
      this.heartbeat = interval;
      return this;
    }

    /**
     * Backoff between resumes: {@code initial} doubling up to {@code max}, +-20 % jitter
     * (default 0.2 s to 10 s).
     */
    public Builder backoff(Duration initial, Duration max) {
      this.initialBackoff = Objects.requireNonNull(initial);
      this.maxBackoff = Objects.requireNonNull(max);
      new Backoff(initial, 2.0, max, 0.2); // validates
      return this;
    }

    /**
     * For resuming an existing upload id from a source that cannot seek: the given stream starts
     * at this byte of the object, which must be the upload's committed size. The whole-object
     * checksums are then not sent (the client never saw the first bytes); per-message CRC32C
     * still is.
     */
    public Builder sourceOffset(long offset) {
      if (offset < 0) {
        throw new IllegalArgumentException("sourceOffset must not be negative");
      }
      this.sourceOffset = offset;
      return this;
    }

    // Time the retained buffer may stay full while the gateway holds every byte and commits none.
    Builder stallTimeout(Duration timeout) {
      this.stallTimeout = timeout;
      return this;
    }

    public UploadOptions build() {
      if (retainedLimit < chunkSize) {
        throw new IllegalArgumentException("retainedLimit must be at least chunkSize");
      }
      return new UploadOptions(this);
    }
  }
}
