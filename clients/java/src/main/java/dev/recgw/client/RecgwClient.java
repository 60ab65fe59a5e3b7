package dev.recgw.client;

import dev.recgw.v1.AbortUploadRequest;
import dev.recgw.v1.AbortUploadResponse;
import dev.recgw.v1.GetUploadStatusRequest;
import dev.recgw.v1.GetUploadStatusResponse;
import dev.recgw.v1.SalvageUploadRequest;
import dev.recgw.v1.SalvageUploadResponse;
import dev.recgw.v1.UploadServiceGrpc;
import dev.recgw.v1.UploadStart;
import dev.recgw.v1.UploadState;
import io.grpc.Channel;
import io.grpc.ChannelCredentials;
import io.grpc.ClientInterceptor;
import io.grpc.ClientInterceptors;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.netty.shaded.io.grpc.netty.NettyChannelBuilder;
import io.grpc.netty.shaded.io.netty.channel.ChannelOption;
import io.grpc.netty.shaded.io.netty.channel.WriteBufferWaterMark;
import io.grpc.stub.MetadataUtils;
import java.io.IOException;
import java.io.InputStream;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.channels.SeekableByteChannel;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Flow;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.function.Supplier;

/**
 * Client of a recgw gateway: resumable, checksummed uploads; upload status, abort, salvage; and
 * the credentials admin API ({@link #credentials()}). Thread-safe; one client may run many
 * uploads at once. Close it to release its channel.
 *
 * <pre>{@code
 * try (RecgwClient client = RecgwClient.builder().address("gw:50051").token(token)
 *     .tls(caPem, null, null, null).build()) {
 *   UploadResult r = client.upload(in, UploadStart.newBuilder().setTenantId("acme")
 *       .setObjectName("2026/11/28/call-42.webm").setContentType("video/webm").build(),
 *       UploadOptions.defaults());
 * }
 * }</pre>
 *
 * <p>Every call sends {@code authorization: Bearer <token>}. Errors are {@link RecgwException}
 * (unchecked); a failing source's {@link IOException} passes through unchanged.
 */
public final class RecgwClient implements AutoCloseable {
  private final ManagedChannel managed;
  private final Channel channel;
  private final String address;
  private final Redactor redactor;
  private final Duration callTimeout;

  private final boolean ownsChannel;

  private RecgwClient(Builder b) {
    this.address = b.channel != null ? b.channel.authority() : b.address;
    this.redactor = Redactor.of(b.token);
    this.callTimeout = b.callTimeout;
    this.ownsChannel = b.channel == null;
    this.managed = b.channel != null ? b.channel : openChannel(b);
    Metadata bearer = new Metadata();
    bearer.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + b.token);
    List<ClientInterceptor> interceptors = new ArrayList<>(b.interceptors);
    // Applied last, so it runs first and every interceptor sees the header.
    interceptors.add(MetadataUtils.newAttachHeadersInterceptor(bearer));
    this.channel = ClientInterceptors.intercept(managed, interceptors);
  }

  // Netty's defaults (32/64 KiB) flip the channel's writability every few HTTP/2 frames of a bulk
  // upload, each flip running the whole pipeline's writability handlers (and making the JIT
  // compile them); the flow-control window still bounds what a stream has queued.
  private static final int WRITE_BUFFER_LOW = 512 << 10;
  private static final int WRITE_BUFFER_HIGH = 1 << 20;

  private static ManagedChannel openChannel(Builder b) {
    ChannelCredentials credentials;
    if (b.plaintext) {
      credentials = InsecureChannelCredentials.create();
    } else {
      TlsChannelCredentials.Builder tls = TlsChannelCredentials.newBuilder();
      try {
        if (b.caFile != null) {
          tls.trustManager(b.caFile.toFile());
        }
        if (b.certFile != null) {
          tls.keyManager(b.certFile.toFile(), b.keyFile.toFile());
        }
      } catch (IOException e) {
        throw new UncheckedIOException("cannot read the TLS files: " + e.getMessage(), e);
      }
      credentials = tls.build();
    }
    String target = b.addresses.size() == 1 ? b.addresses.get(0) : Replicas.target(b.addresses);
    // round_robin: every call (each upload stream, each status query) goes to the next of the
    // target's addresses that is up, so uploads spread over the replicas a DNS name or a list of
    // addresses names, and a resume after a lost replica goes to a live one.
    ManagedChannelBuilder<?> builder =
        NettyChannelBuilder.forTarget(target, credentials)
            .defaultLoadBalancingPolicy("round_robin")
            .withOption(ChannelOption.WRITE_BUFFER_WATER_MARK, new WriteBufferWaterMark(WRITE_BUFFER_LOW, WRITE_BUFFER_HIGH))
            .keepAliveTime(b.keepAlive.toNanos(), TimeUnit.NANOSECONDS)
            .keepAliveTimeout(20, TimeUnit.SECONDS);
    if (b.serverName != null) {
      builder.overrideAuthority(b.serverName);
    }
    return builder.build();
  }

  public static Builder builder() {
    return new Builder();
  }

  /** The credentials admin API; needs a client whose token has the {@code admin} role. */
  public CredentialsAdmin credentials() {
    return new CredentialsAdmin(channel, redactor, callTimeout);
  }

  // --- uploads ------------------------------------------------------------------------------

  /**
   * Streams {@code in} (read once, to its end, on a thread of the client's) as one object and
   * returns when the object is complete, resuming by itself after connection losses (see {@link
   * UploadOptions}). {@code start} names tenant, object name, content type, metadata and,
   * optionally, {@code expected_size} and {@code upload_id}: without an id the client picks a
   * uuid4 (reported by {@link UploadOptions.Builder#onUploadId} before any byte is sent); with
   * one, the client asks the gateway first and, if that upload has committed bytes, fails with
   * {@link RecgwException#SOURCE_NOT_SEEKABLE} unless {@link UploadOptions.Builder#sourceOffset}
   * says {@code in} starts there. The stream is not closed.
   *
   * @throws RecgwException the gateway refused, or resuming gave up; {@code uploadId()} names
   *     the upload, which stays open unless the error says it ended
   * @throws IOException reading {@code in} failed (the upload stays open for resuming)
   */
  public UploadResult upload(InputStream in, UploadStart start, UploadOptions opts) throws IOException {
    return await(uploadAsync(in, start, opts));
  }

  /**
   * Uploads a file; its size becomes {@code expected_size} unless {@code start} sets one. With
   * {@code start.upload_id} naming an open upload, it continues from the committed size (the
   * bytes before it are read once to compute the whole-object checksums).
   */
  public UploadResult upload(Path file, UploadStart start, UploadOptions opts) throws IOException {
    try (FileChannel in = FileChannel.open(file, StandardOpenOption.READ)) {
      return upload(in, start, opts);
    }
  }

  /**
   * Uploads a seekable source from its position 0 (or, resuming {@code start.upload_id}, from
   * the upload's committed size); its size becomes {@code expected_size} unless set. The channel
   * is not closed.
   */
  public UploadResult upload(SeekableByteChannel in, UploadStart start, UploadOptions opts) throws IOException {
    Objects.requireNonNull(in, "in");
    if (!start.hasExpectedSize()) {
      start = start.toBuilder().setExpectedSize(in.size()).build();
    }
    return await(begin(start, opts, true, (run, id, offset, hasher) -> {
      try {
        seek(in, offset, hasher);
      } catch (IOException e) {
        throw new UncheckedIOException(e);
      }
      Chunker chunker = Feeds.blockingChunker(run, opts.chunkSize, offset, opts.checksums, hasher);
      Feeds.startReader(run, chunker, (b, off, len) -> in.read(ByteBuffer.wrap(b, off, len)), id);
    }));
  }

  /** Like {@link #upload(InputStream, UploadStart, UploadOptions)}, without waiting. */
  public CompletableFuture<UploadResult> uploadAsync(InputStream in, UploadStart start, UploadOptions opts) {
    Objects.requireNonNull(in, "in");
    return begin(start, opts, false, (run, id, offset, hasher) -> {
      Chunker chunker = Feeds.blockingChunker(run, opts.chunkSize, offset, opts.checksums, hasher);
      Feeds.startReader(run, chunker, in::read, id);
    });
  }

  /**
   * Uploads what {@code source} publishes, flow-controlled: the client requests one buffer at a
   * time, and the next only while the retained buffer has room for another chunk (so memory stays
   * within the retained limit plus one published buffer). The buffers are copied; the publisher
   * may reuse them. Cancelling the future cancels the stream and the subscription; the upload
   * stays open for resuming. With {@code start.upload_id} set, GetUploadStatus is asked first, on
   * the calling thread.
   */
  public CompletableFuture<UploadResult> uploadAsync(
      Flow.Publisher<ByteBuffer> source, UploadStart start, UploadOptions opts) {
    Objects.requireNonNull(source, "source");
    return begin(start, opts, false, (run, id, offset, hasher) ->
        source.subscribe(new Feeds.PublisherFeed(run, opts.chunkSize, offset, opts.checksums, hasher)));
  }

  /** Starts the producer of one upload at {@code offset}. */
  private interface Feed {
    void start(UploadRun run, String uploadId, long offset, ObjectHasher hasher);
  }

  /**
   * Starts an upload; every failure after the arguments were checked (the status probe of a
   * resumed id, the upload-id listener, the source) completes the future exceptionally.
   */
  private CompletableFuture<UploadResult> begin(UploadStart start, UploadOptions opts, boolean seekable, Feed feed) {
    Objects.requireNonNull(start, "start");
    Objects.requireNonNull(opts, "opts");
    if (start.getUploadId().isEmpty() && opts.sourceOffset != 0) {
      throw new IllegalArgumentException("sourceOffset needs UploadStart.upload_id of the upload to resume");
    }
    try {
      return launch(start, opts, seekable, feed);
    } catch (RuntimeException e) {
      return CompletableFuture.failedFuture(e);
    }
  }

  private CompletableFuture<UploadResult> launch(UploadStart start, UploadOptions opts, boolean seekable, Feed feed) {
    boolean resuming = !start.getUploadId().isEmpty();
    String id = resuming ? start.getUploadId() : UUID.randomUUID().toString();
    // The gateway computes the SHA-256 the client verifies only when asked.
    UploadStart first = start.toBuilder().setUploadId(id).setComputeSha256(opts.checksums).build();
    long offset = 0;
    if (resuming) {
      GetUploadStatusResponse status = probe(id, opts);
      if (status != null) {
        switch (status.getState()) {
          case UPLOAD_STATE_COMPLETE, UPLOAD_STATE_COMPLETION_UNCONFIRMED -> {
            boolean unconfirmed = status.getState() == UploadState.UPLOAD_STATE_COMPLETION_UNCONFIRMED;
            return CompletableFuture.completedFuture(UploadResult.of(status.getResult(), id, unconfirmed));
          }
          case UPLOAD_STATE_ABORTED, UPLOAD_STATE_EXPIRED, UPLOAD_STATE_SALVAGED ->
              throw UploadRun.ended(status);
          default -> offset = status.getCommittedSize();
        }
      }
      if (!seekable && offset != opts.sourceOffset) {
        throw RecgwException.client(
            Status.Code.FAILED_PRECONDITION,
            RecgwException.SOURCE_NOT_SEEKABLE,
            "upload " + id + " has " + offset + " bytes committed, but the source cannot seek"
                + (opts.sourceOffset == 0 ? "" : " and starts at byte " + opts.sourceOffset)
                + ": pass a seekable source (a Path or SeekableByteChannel), or a stream of the bytes from "
                + offset + " on with UploadOptions.sourceOffset(" + offset + ")",
            id);
      }
    }
    opts.onUploadId.accept(id);
    // Whole-object checksums need every byte: a stream that starts mid-object cannot give them.
    ObjectHasher hasher = opts.checksums && (seekable || offset == 0) ? new ObjectHasher() : null;
    UploadRun run = new UploadRun(channel, redactor, callTimeout, first, opts, offset, hasher);
    try {
      feed.start(run, id, offset, hasher);
    } catch (UncheckedIOException e) {
      run.result.cancel(false);
      return CompletableFuture.failedFuture(e.getCause());
    }
    run.begin();
    return run.result;
  }

  /** The status of an upload to resume, or null if the gateway does not know it (a new id). */
  private GetUploadStatusResponse probe(String id, UploadOptions opts) {
    long since = System.nanoTime();
    int attempt = 0;
    while (true) {
      try {
        return blockingUploads().getUploadStatus(GetUploadStatusRequest.newBuilder().setUploadId(id).build());
      } catch (StatusRuntimeException e) {
        RecgwException error = RecgwException.fromGrpc(e, id, redactor);
        if (error.code() == Status.Code.NOT_FOUND) {
          return null;
        }
        long delay = opts.backoff.delayNanos(++attempt, ThreadLocalRandom.current()::nextDouble);
        if (RetryRules.actionFor(error) == RetryRules.Action.FAIL
            || System.nanoTime() - since + delay > opts.outageTolerance.toNanos()) {
          throw error;
        }
        try {
          TimeUnit.NANOSECONDS.sleep(delay);
        } catch (InterruptedException ie) {
          Thread.currentThread().interrupt();
          throw RecgwException.client(Status.Code.CANCELLED, "", "interrupted", id);
        }
      }
    }
  }

  /** Positions a seekable source at {@code offset}, hashing the bytes before it. */
  private static void seek(SeekableByteChannel in, long offset, ObjectHasher hasher) throws IOException {
    if (offset > 0 && in.size() < offset) {
      throw new IOException("the source has " + in.size() + " bytes, fewer than the " + offset + " the upload has committed");
    }
    in.position(0);
    if (hasher != null && offset > 0) {
      ByteBuffer buffer = ByteBuffer.allocate(1 << 20);
      long left = offset;
      while (left > 0) {
        buffer.clear().limit((int) Math.min(buffer.capacity(), left));
        int n = in.read(buffer);
        if (n < 0) {
          throw new IOException("the source ended before byte " + offset);
        }
        hasher.update(buffer.array(), 0, n);
        left -= n;
      }
    }
    in.position(offset);
  }

  private static UploadResult await(CompletableFuture<UploadResult> future) throws IOException {
    try {
      return future.get();
    } catch (InterruptedException e) {
      future.cancel(true);
      Thread.currentThread().interrupt();
      throw RecgwException.client(Status.Code.CANCELLED, "", "interrupted while uploading", null);
    } catch (ExecutionException e) {
      Throwable cause = e.getCause();
      if (cause instanceof RecgwException r) {
        throw r;
      }
      if (cause instanceof IOException io) {
        throw io;
      }
      if (cause instanceof RuntimeException rt) {
        throw rt;
      }
      if (cause instanceof Error err) {
        throw err;
      }
      throw new IllegalStateException(cause);
    }
  }

  // --- other upload calls -------------------------------------------------------------------

  /** The state and committed size of an upload. */
  public UploadStatus status(String uploadId) {
    return call(uploadId, () -> UploadStatus.of(
        blockingUploads().getUploadStatus(GetUploadStatusRequest.newBuilder().setUploadId(uploadId).build())));
  }

  /** Cancels an upload; nothing of it becomes visible. A stream still writing it fails. */
  public AbortResult abort(String uploadId) {
    return call(uploadId, () -> {
      AbortUploadResponse r =
          blockingUploads().abortUpload(AbortUploadRequest.newBuilder().setUploadId(uploadId).build());
      return new AbortResult(r.getState(), r.getStorageAborted(), r.getDetail());
    });
  }

  /** Keeps what an open upload has committed as an object and ends the upload (SALVAGED). */
  public SalvageResult salvage(String uploadId) {
    return call(uploadId, () -> {
      SalvageUploadResponse r =
          blockingUploads().salvageUpload(SalvageUploadRequest.newBuilder().setUploadId(uploadId).build());
      return new SalvageResult(r.getState(), UploadResult.of(r.getResult(), uploadId, false));
    });
  }

  private UploadServiceGrpc.UploadServiceBlockingStub blockingUploads() {
    return UploadServiceGrpc.newBlockingStub(channel).withDeadlineAfter(callTimeout.toNanos(), TimeUnit.NANOSECONDS);
  }

  private <T> T call(String uploadId, Supplier<T> rpc) {
    try {
      return rpc.get();
    } catch (StatusRuntimeException e) {
      throw RecgwException.fromGrpc(e, uploadId, redactor);
    }
  }

  /** Closes the channel, unless it was given to {@link Builder#channel}. */
  @Override
  public void close() {
    if (!ownsChannel) {
      return;
    }
    managed.shutdown();
    try {
      if (!managed.awaitTermination(5, TimeUnit.SECONDS)) {
        managed.shutdownNow();
      }
    } catch (InterruptedException e) {
      managed.shutdownNow();
      Thread.currentThread().interrupt();
    }
  }

  @Override
  public String toString() {
    return "RecgwClient[" + address + "]";
  }

  /** Builds a {@link RecgwClient}: an address, a token, and TLS or, explicitly, plaintext. */
  public static final class Builder {
    private String address;
    private List<String> addresses;
    private String token;
    private boolean plaintext;
    private boolean tls;
    private Path caFile;
    private Path certFile;
    private Path keyFile;
    private String serverName;
    private Duration callTimeout = Duration.ofSeconds(30);
    private Duration keepAlive = Duration.ofSeconds(20);
    private final List<ClientInterceptor> interceptors = new ArrayList<>();
    private ManagedChannel channel;

    private Builder() {}

    /**
     * Uses a channel the caller built and owns (instead of {@code address} and TLS options);
     * {@link RecgwClient#close()} leaves it open.
     */
    public Builder channel(ManagedChannel channel) {
      this.channel = Objects.requireNonNull(channel);
      return this;
    }

    /**
     * The gateway, {@code host:port} (or any gRPC target such as {@code dns:///host:port}, whose
     * addresses the client balances over), or several replicas' addresses separated by commas
     * (see {@link #addresses}).
     */
    public Builder address(String address) {
      return addresses(Replicas.split(Objects.requireNonNull(address)));
    }

    /**
     * Several gateway replicas sharing one PostgreSQL session store, each {@code IP:port} ({@code
     * 10.0.0.11:50051}, {@code [fd00::11]:50051}): every call goes to the next replica that is up
     * (round_robin), and a resumed upload to a live one. Over TLS their certificates must carry
     * the {@code serverName} given to {@link #tls}. For names, give one DNS name that resolves to
     * every replica ({@code address("dns:///recgw.internal:50051")}). One address is the same as
     * {@link #address}.
     *
     * @throws IllegalArgumentException an empty entry, or one of several that is not IP:port
     */
    public Builder addresses(List<String> addresses) {
      List<String> trimmed = Replicas.checkNotEmpty(new ArrayList<>(addresses)).stream().map(String::strip).toList();
      if (trimmed.size() > 1) {
        trimmed.forEach(Replicas::parse);
      }
      this.addresses = trimmed;
      this.address = String.join(",", trimmed);
      return this;
    }

    /** The bearer token; never shown in an error, a log or {@code toString}. */
    public Builder token(String token) {
      this.token = Objects.requireNonNull(token);
      return this;
    }

    /**
     * TLS (the default, with the system's trust roots): {@code caFile} (PEM) to trust instead,
     * {@code certFile} + {@code keyFile} (PEM) for mTLS, {@code serverName} to check in the
     * gateway's certificate instead of the address's host. Each may be null.
     */
    public Builder tls(Path caFile, Path certFile, Path keyFile, String serverName) {
      if ((certFile == null) != (keyFile == null)) {
        throw new IllegalArgumentException("mTLS needs both certFile and keyFile");
      }
      this.tls = true;
      this.caFile = caFile;
      this.certFile = certFile;
      this.keyFile = keyFile;
      this.serverName = serverName;
      return this;
    }

    /** No TLS: only for a gateway on loopback or behind a TLS-terminating proxy. */
    public Builder plaintext() {
      this.plaintext = true;
      return this;
    }

    /** Deadline of each unary call (status, abort, credentials...); default 30 s. */
    public Builder callTimeout(Duration timeout) {
      this.callTimeout = Objects.requireNonNull(timeout);
      return this;
    }

    /** Keepalive ping interval (default 20 s; the gateway permits 10 s or more). */
    public Builder keepAlive(Duration interval) {
      this.keepAlive = Objects.requireNonNull(interval);
      return this;
    }

    /** Interceptors for every call (tracing, metrics), in grpc-java's order. */
    public Builder interceptors(ClientInterceptor... more) {
      interceptors.addAll(List.of(more));
      return this;
    }

    public RecgwClient build() {
      if (token == null || token.isEmpty()) {
        throw new IllegalStateException("token is required");
      }
      if (channel != null) {
        if (address != null || tls || plaintext) {
          throw new IllegalStateException("channel(...) replaces address, tls and plaintext");
        }
        return new RecgwClient(this);
      }
      if (addresses == null) {
        throw new IllegalStateException("address is required");
      }
      if (plaintext == tls) {
        if (plaintext) {
          throw new IllegalStateException("choose tls(...) or plaintext(), not both");
        }
        tls = true; // TLS with the system's trust roots
      }
      if (addresses.size() > 1 && !plaintext && serverName == null) {
        // The replicas' IP addresses name no host to check their certificates against.
        throw new IllegalStateException("TLS to several gateway addresses needs the name their certificates "
            + "carry: tls(caFile, certFile, keyFile, serverName)");
      }
      return new RecgwClient(this);
    }
  }
}
