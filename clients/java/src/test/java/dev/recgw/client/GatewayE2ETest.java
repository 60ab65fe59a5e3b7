package dev.recgw.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.protobuf.ByteString;
import dev.recgw.v1.CredentialsView;
import dev.recgw.v1.StorageTarget;
import dev.recgw.v1.UploadRequest;
import dev.recgw.v1.UploadStart;
import dev.recgw.v1.UploadState;
import dev.recgw.v1.VerifyCredentialsResponse;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ForwardingClientCall;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import java.io.IOException;
import java.io.InputStream;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.time.Duration;
import java.util.HexFormat;
import java.util.List;
import java.util.Random;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicReference;
import java.util.function.UnaryOperator;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Tag;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.condition.EnabledIfEnvironmentVariable;
import org.junit.jupiter.api.io.TempDir;

/**
 * End-to-end against the live stack of {@code python -m tests.e2e_stack} (real OpenBao, moto with
 * IAM enforced, {@code recgw serve} behind a cuttable loopback proxy, 5 MiB parts). Skipped when
 * RECGW_E2E_ADDRESS is unset. Faults the stack cannot make (a wrong offset, a corrupted chunk)
 * are injected by a client interceptor of this test that rewrites one outgoing message.
 */
@Tag("e2e")
@EnabledIfEnvironmentVariable(named = "RECGW_E2E_ADDRESS", matches = ".+")
class GatewayE2ETest {
  private static final int MIB = 1024 * 1024;
  private static final HttpClient HTTP = HttpClient.newHttpClient();

  private static String control;
  private static String tenant;
  private static RecgwClient client;

  private final List<String> retries = new CopyOnWriteArrayList<>();

  @BeforeAll
  static void connect() {
    control = System.getenv("RECGW_E2E_CONTROL");
    tenant = System.getenv("RECGW_E2E_TENANT");
    client = connect(System.getenv("RECGW_E2E_UPLOADER_TOKEN"));
  }

  @AfterAll
  static void close() {
    client.close();
  }

  private static RecgwClient connect(String token, ClientInterceptor... interceptors) {
    return RecgwClient.builder()
        .address(System.getenv("RECGW_E2E_ADDRESS"))
        .token(token)
        .plaintext()
        .interceptors(interceptors)
        .build();
  }

  private UploadOptions.Builder options() {
    // Time scaled down: a gateway restart is noticed within a second of it serving again.
    return UploadOptions.builder()
        .outageTolerance(Duration.ofSeconds(60))
        .backoff(Duration.ofMillis(100), Duration.ofSeconds(1))
        .onRetry((attempt, cause, at) -> retries.add(cause.code() + ":" + cause.reason() + "@" + at));
  }

  private static UploadStart start(String tenantId) {
    return UploadStart.newBuilder()
        .setTenantId(tenantId)
        .setObjectName("java-e2e/" + UUID.randomUUID() + ".webm")
        .setContentType("video/webm")
        .putMetadata("room", "blue")
        .build();
  }

  private static byte[] random(int size) {
    byte[] data = new byte[size];
    new Random(size).nextBytes(data);
    return data;
  }

  private static String sha256(byte[] data) throws Exception {
    return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(data));
  }

  // --- the control API -------------------------------------------------------------------------

  private static HttpResponse<byte[]> post(String path) throws Exception {
    HttpRequest request = HttpRequest.newBuilder(URI.create(control + path))
        .POST(HttpRequest.BodyPublishers.noBody()).timeout(Duration.ofSeconds(120)).build();
    HttpResponse<byte[]> response = HTTP.send(request, HttpResponse.BodyHandlers.ofByteArray());
    assertEquals(200, response.statusCode(), path);
    return response;
  }

  private static byte[] object(UploadResult r) throws Exception {
    String query = "bucket=" + URLEncoder.encode(r.bucket(), StandardCharsets.UTF_8)
        + "&key=" + URLEncoder.encode(r.key(), StandardCharsets.UTF_8);
    HttpResponse<byte[]> response = HTTP.send(
        HttpRequest.newBuilder(URI.create(control + "/object?" + query)).build(), HttpResponse.BodyHandlers.ofByteArray());
    return response.statusCode() == 404 ? null : response.body();
  }

  private static String logs() throws Exception {
    return HTTP.send(HttpRequest.newBuilder(URI.create(control + "/logs")).build(), HttpResponse.BodyHandlers.ofString()).body();
  }

  private void assertStored(byte[] data, UploadResult r) throws Exception {
    assertEquals(data.length, r.size());
    assertEquals(sha256(data), r.sha256Hex());
    assertArrayEquals(data, object(r), "the object in the bucket");
  }

  /** Serves {@code data}, running {@code action} once when a read passes {@code at}. */
  private static final class Trigger extends InputStream {
    private final byte[] data;
    private final long at;
    private final ThrowingRunnable action;
    private int position;
    private boolean fired;

    interface ThrowingRunnable {
      void run() throws Exception;
    }

    Trigger(byte[] data, long at, ThrowingRunnable action) {
      this.data = data;
      this.at = at;
      this.action = action;
    }

    @Override
    public int read() {
      throw new UnsupportedOperationException();
    }

    @Override
    public int read(byte[] b, int off, int len) throws IOException {
      if (!fired && position >= at) {
        fired = true;
        try {
          action.run();
        } catch (IOException e) {
          throw e;
        } catch (Exception e) {
          throw new IOException(e);
        }
      }
      if (position == data.length) {
        return -1;
      }
      int n = Math.min(len, data.length - position);
      System.arraycopy(data, position, b, off, n);
      position += n;
      return n;
    }
  }

  /** Rewrites the first outgoing UploadRequest that {@code pick} changes (once per client). */
  private static ClientInterceptor rewriteOnce(UnaryOperator<UploadRequest> pick) {
    AtomicBoolean done = new AtomicBoolean();
    return new ClientInterceptor() {
      @Override
      public <Q, R> ClientCall<Q, R> interceptCall(MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
        return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
          @Override
          @SuppressWarnings("unchecked")
          public void sendMessage(Q message) {
            if (!done.get() && message instanceof UploadRequest request) {
              UploadRequest changed = pick.apply(request);
              if (changed != request && done.compareAndSet(false, true)) {
                message = (Q) changed;
              }
            }
            super.sendMessage(message);
          }
        };
      }
    };
  }

  // --- uploads ---------------------------------------------------------------------------------

  @Test
  void smallUploadIsByteExact() throws Exception {
    byte[] data = random(100_000);
    AtomicReference<String> id = new AtomicReference<>();
    UploadResult r = client.upload(new java.io.ByteArrayInputStream(data), start(tenant), options().onUploadId(id::set).build());
    assertStored(data, r);
    assertEquals(id.get(), r.uploadId());
    assertEquals(UploadState.UPLOAD_STATE_COMPLETE, client.status(r.uploadId()).state());
  }

  @Test
  void multipartUploadIsByteExact() throws Exception {
    byte[] data = random(12 * MIB);
    UploadResult r = client.upload(new java.io.ByteArrayInputStream(data), start(tenant), options().build());
    assertStored(data, r);
    assertEquals(3, r.partCount(), "5 MiB parts");
    assertTrue(retries.isEmpty());
  }

  @Test
  void aCutStreamResumesByItself() throws Exception {
    byte[] data = random(12 * MIB);
    UploadResult r = client.upload(new Trigger(data, 7 * MIB, () -> post("/cut")), start(tenant), options().build());
    assertStored(data, r);
    assertFalse(retries.isEmpty(), "the cut made the client resume");
  }

  @Test
  void anUploadSurvivesTheGatewayBeingKilledAndRestarted() throws Exception {
    byte[] data = random(12 * MIB);
    UploadResult r = client.upload(new Trigger(data, 7 * MIB, () -> post("/gateway/restart")), start(tenant), options().build());
    assertStored(data, r);
    assertFalse(retries.isEmpty(), "the restart made the client resume");
  }

  @Test
  void aWrongOffsetIsAnsweredByAStatusQueryAndACorrectResume() throws Exception {
    byte[] data = random(12 * MIB);
    ClientInterceptor wrongOffset = rewriteOnce(m -> m.getWriteOffset() == 7 * MIB
        ? m.toBuilder().setWriteOffset(m.getWriteOffset() + 1).build() : m);
    try (RecgwClient faulty = connect(System.getenv("RECGW_E2E_UPLOADER_TOKEN"), wrongOffset)) {
      UploadResult r = faulty.upload(new java.io.ByteArrayInputStream(data), start(tenant), options().build());
      assertStored(data, r);
    }
    assertEquals(1, retries.size(), retries.toString());
    assertTrue(retries.get(0).startsWith("OUT_OF_RANGE:OFFSET_MISMATCH@"), retries.toString());
    long resumedAt = Long.parseLong(retries.get(0).substring(retries.get(0).indexOf('@') + 1));
    assertEquals(0, resumedAt % (5 * MIB), "resumed at a part boundary (the committed size): " + resumedAt);
  }

  @Test
  void aCorruptedChunkIsSentAgain() throws Exception {
    byte[] data = random(8 * MIB);
    ClientInterceptor corrupt = rewriteOnce(m -> m.getWriteOffset() == 3 * MIB && !m.getData().isEmpty()
        ? m.toBuilder().setData(flipFirstByte(m.getData())).build() : m);
    try (RecgwClient faulty = connect(System.getenv("RECGW_E2E_UPLOADER_TOKEN"), corrupt)) {
      UploadResult r = faulty.upload(new java.io.ByteArrayInputStream(data), start(tenant), options().build());
      assertStored(data, r);
    }
    assertEquals(List.of("DATA_LOSS:CHUNK_CHECKSUM_MISMATCH@0"), retries);
  }

  @Test
  void anObjectChecksumMismatchIsFinalAndCreatesNoObject() throws Exception {
    byte[] data = random(1 * MIB + 5);
    ClientInterceptor badSha = rewriteOnce(m -> m.getFinishWrite()
        ? m.toBuilder().setObjectChecksums(m.getObjectChecksums().toBuilder().setSha256(ByteString.copyFrom(new byte[32]))).build()
        : m);
    UploadStart start = start(tenant);
    try (RecgwClient faulty = connect(System.getenv("RECGW_E2E_UPLOADER_TOKEN"), badSha)) {
      RecgwException e = assertThrows(RecgwException.class,
          () -> faulty.upload(new java.io.ByteArrayInputStream(data), start, options().build()));
      assertEquals(Status.Code.DATA_LOSS, e.code());
      assertEquals("OBJECT_CHECKSUM_MISMATCH", e.reason());
      assertNotNull(e.uploadId());
      UploadStatus status = client.status(e.uploadId());
      assertEquals(UploadState.UPLOAD_STATE_OPEN, status.state(), "the upload stays open");
      UploadResult none = new UploadResult(e.uploadId(), System.getenv("RECGW_E2E_BUCKET"), status.key(), 0, "", "", 0,
          java.util.OptionalLong.empty(), new byte[0], false);
      assertEquals(null, object(none), "no object is visible");
    }
    assertTrue(retries.isEmpty());
  }

  private static ByteString flipFirstByte(ByteString data) {
    byte[] bytes = data.toByteArray();
    bytes[0] ^= 0x5a;
    return ByteString.copyFrom(bytes);
  }

  /** The committed size, 0 while the gateway has not opened the upload yet (the client reads ahead). */
  private long committedOrZero(String uploadId) {
    try {
      return client.status(uploadId).committedSize();
    } catch (RecgwException e) {
      if ("UPLOAD_NOT_FOUND".equals(e.reason())) {
        return 0;
      }
      throw e;
    }
  }

  /** The client reads ahead of the network: the gateway may not have opened the upload yet. */
  private AbortResult abortWhenKnown(String uploadId) {
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
    while (true) {
      try {
        return client.abort(uploadId);
      } catch (RecgwException e) {
        if (!"UPLOAD_NOT_FOUND".equals(e.reason()) || System.nanoTime() > deadline) {
          throw e;
        }
        try {
          Thread.sleep(20);
        } catch (InterruptedException interrupted) {
          Thread.currentThread().interrupt();
          throw e;
        }
      }
    }
  }

  @Test
  void abortWhileDataFlowsEndsTheUpload() throws Exception {
    byte[] data = random(24 * MIB);
    AtomicReference<String> id = new AtomicReference<>();
    // Completed by the reader thread, whose abort call may return after the upload has failed.
    java.util.concurrent.CompletableFuture<AbortResult> aborted = new java.util.concurrent.CompletableFuture<>();
    Trigger source = new Trigger(data, 6 * MIB, () -> aborted.complete(abortWhenKnown(id.get())));
    RecgwException e = assertThrows(RecgwException.class,
        () -> client.upload(source, start(tenant), options().onUploadId(id::set).build()));
    assertEquals(UploadState.UPLOAD_STATE_ABORTED, aborted.get(30, TimeUnit.SECONDS).state(), e::toString);
    assertTrue(Set.of(Status.Code.ABORTED, Status.Code.FAILED_PRECONDITION).contains(e.code()), e.toString());
    assertTrue(Set.of("UPLOAD_ABORTED", "UPLOAD_ENDED").contains(e.reason()), e.toString());
    assertEquals(id.get(), e.uploadId());
    UploadStatus status = client.status(id.get());
    assertEquals(UploadState.UPLOAD_STATE_ABORTED, status.state());
  }

  @Test
  void aBadTokenIsUnauthenticated() throws Exception {
    String bad = "bad-CANARY-TOKEN-" + UUID.randomUUID();
    try (RecgwClient wrong = connect(bad)) {
      RecgwException e = assertThrows(RecgwException.class,
          () -> wrong.upload(new java.io.ByteArrayInputStream(new byte[10]), start(tenant), options().build()));
      assertEquals(Status.Code.UNAUTHENTICATED, e.code());
      assertEquals("TOKEN_INVALID", e.reason());
      assertFalse(e.getMessage().contains(bad));
      RecgwException status = assertThrows(RecgwException.class, () -> wrong.status(UUID.randomUUID().toString()));
      assertEquals("TOKEN_INVALID", status.reason());
    }
    assertFalse(logs().contains(bad), "the bad token is not logged");
    assertTrue(retries.isEmpty());
  }

  @Test
  void aTenantWithoutCredentialsIsAFailedPrecondition() {
    RecgwException e = assertThrows(RecgwException.class,
        () -> client.upload(new java.io.ByteArrayInputStream(new byte[10]), start("nocreds-" + UUID.randomUUID().toString().substring(0, 8)), options().build()));
    assertEquals(Status.Code.FAILED_PRECONDITION, e.code());
    assertEquals("CREDENTIALS_NOT_FOUND", e.reason());
    assertTrue(retries.isEmpty());
  }

  @Test
  void anExistingUploadContinuesFromAFile(@TempDir Path dir) throws Exception {
    byte[] data = random(12 * MIB);
    AtomicReference<String> id = new AtomicReference<>();
    Trigger crashing = new Trigger(data, 8 * MIB, () -> {
      // The recorder dies once the gateway has committed a part.
      long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
      while (committedOrZero(id.get()) < 5 * MIB) {
        assertTrue(System.nanoTime() < deadline, "no part was committed");
        Thread.sleep(50); // polling the gateway, with a deadline
      }
      throw new IOException("the recorder crashed");
    });
    UploadStart start = start(tenant);
    assertThrows(IOException.class, () -> client.upload(crashing, start, options().onUploadId(id::set).build()));
    UploadStart resume = start.toBuilder().setUploadId(id.get()).build();
    long committed = client.status(id.get()).committedSize();
    assertTrue(committed >= 5 * MIB);

    RecgwException refused = assertThrows(RecgwException.class,
        () -> client.upload(new java.io.ByteArrayInputStream(data), resume, options().build()));
    assertEquals(RecgwException.SOURCE_NOT_SEEKABLE, refused.reason());

    Path file = dir.resolve("call.webm");
    Files.write(file, data);
    AtomicReference<Long> firstSent = new AtomicReference<>();
    UploadResult r = client.upload(file, resume, options().onProgress((c, sent) -> firstSent.compareAndSet(null, sent)).build());
    assertStored(data, r);
    assertTrue(firstSent.get() > committed, "the file was sent from the committed size on");
  }

  // --- credentials ---------------------------------------------------------------------------

  @Test
  void credentialsAdminSetsDescribesVerifiesAndDeletesWithoutLeakingTheSecret() throws Exception {
    JsonObject t = JsonParser.parseString(new String(post("/tenant").body(), StandardCharsets.UTF_8)).getAsJsonObject();
    String tenantId = t.get("tenant_id").getAsString();
    String accessKeyId = t.get("access_key_id").getAsString();
    char[] secret = t.get("secret_access_key").getAsString().toCharArray();
    StorageTarget target = StorageTarget.newBuilder()
        .setRegion(t.get("region").getAsString())
        .setBucket(t.get("bucket").getAsString())
        .setEndpointUrl(t.get("endpoint_url").getAsString())
        .setForcePathStyle(true)
        .build();
    try (RecgwClient admin = connect(System.getenv("RECGW_E2E_ADMIN_TOKEN"))) {
      CredentialsAdmin credentials = admin.credentials();
      CredentialsView set = credentials.set(tenantId, accessKeyId, secret, target);
      assertEquals(tenantId, set.getTenantId());
      assertEquals("****" + accessKeyId.substring(accessKeyId.length() - 4), set.getAccessKeyIdHint());
      assertFalse(set.toString().contains(new String(secret)));

      CredentialsView described = credentials.describe(tenantId);
      assertEquals(set.getVersion(), described.getVersion());
      assertEquals(target.getBucket(), described.getTarget().getBucket());

      VerifyCredentialsResponse verified = credentials.verify(tenantId);
      assertTrue(verified.getOk(), verified.getErrorMessage());

      char[] canary = ("CANARY secret " + UUID.randomUUID()).toCharArray();
      RecgwException invalid = assertThrows(RecgwException.class, () -> credentials.set(tenantId, accessKeyId, canary, target));
      assertEquals(Status.Code.INVALID_ARGUMENT, invalid.code());
      assertFalse(invalid.getMessage().contains(new String(canary)));
      assertEquals(set.getVersion(), credentials.describe(tenantId).getVersion(), "a refused set stores nothing");

      credentials.delete(tenantId);
      RecgwException gone = assertThrows(RecgwException.class, () -> credentials.describe(tenantId));
      assertEquals(Status.Code.NOT_FOUND, gone.code());
      assertEquals("CREDENTIALS_NOT_FOUND", gone.reason());

      RecgwException notAdmin = assertThrows(RecgwException.class, () -> client.credentials().describe(tenantId));
      assertEquals(Status.Code.PERMISSION_DENIED, notAdmin.code());
      assertEquals("ROLE_NOT_ALLOWED", notAdmin.reason());

      String logs = logs();
      assertFalse(logs.contains(new String(secret)), "the secret is not logged");
      assertFalse(logs.contains(new String(canary)), "the refused secret is not logged");
      java.util.Arrays.fill(secret, '\0');
    }
  }
}
