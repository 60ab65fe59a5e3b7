package dev.recgw.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.recgw.v1.GetUploadStatusRequest;
import dev.recgw.v1.GetUploadStatusResponse;
import dev.recgw.v1.UploadServiceGrpc;
import dev.recgw.v1.UploadState;
import io.grpc.Grpc;
import io.grpc.Server;
import io.grpc.Status;
import io.grpc.TlsServerCredentials;
import io.grpc.stub.StreamObserver;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.util.Base64;
import java.util.concurrent.TimeUnit;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.TrustManagerFactory;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/**
 * Real TLS and mTLS handshakes over loopback between the client's TLS options and a grpc-netty
 * server that requires a client certificate. The certificates are made by the JDK's keytool.
 */
class TlsTest {
  private static final char[] PASSWORD = "changeit".toCharArray();

  @TempDir static Path dir;
  private static Server server;
  private static io.grpc.ServerCredentials serverCredentials;
  private static Path serverCa;
  private static Path clientCert;
  private static Path clientKey;
  private static Path strangerCert;
  private static Path strangerKey;

  @BeforeAll
  static void serve() throws Exception {
    // Two keytool runs at once (each is a JVM start).
    Process serverKeys = keytool("server", "CN=gateway.test", "SAN=dns:gateway.test");
    Process clientKeys = keytool("client", "CN=media-server", null);
    KeyStore serverStore = load("server", serverKeys);
    KeyStore clientStore = load("client", clientKeys);
    serverCa = pem(dir.resolve("server.pem"), serverStore.getCertificate("server"));
    clientCert = pem(dir.resolve("client.pem"), clientStore.getCertificate("client"));
    clientKey = key(dir.resolve("client.key"), clientStore, "client");
    // The server's own key pair is a client certificate the server does not trust.
    strangerCert = serverCa;
    strangerKey = key(dir.resolve("stranger.key"), serverStore, "server");

    KeyManagerFactory keys = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
    keys.init(serverStore, PASSWORD);
    KeyStore trusted = KeyStore.getInstance("PKCS12");
    trusted.load(null, null);
    trusted.setCertificateEntry("client", clientStore.getCertificate("client"));
    TrustManagerFactory trust = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
    trust.init(trusted);
    TlsServerCredentials.Builder tls = TlsServerCredentials.newBuilder()
        .keyManager(keys.getKeyManagers())
        .trustManager(trust.getTrustManagers())
        .clientAuth(TlsServerCredentials.ClientAuth.REQUIRE);
    serverCredentials = tls.build();
    server = Grpc.newServerBuilderForPort(0, serverCredentials)
        .addService(new UploadServiceGrpc.UploadServiceImplBase() {
          @Override
          public void getUploadStatus(GetUploadStatusRequest request, StreamObserver<GetUploadStatusResponse> out) {
            out.onNext(GetUploadStatusResponse.newBuilder()
                .setUploadId(request.getUploadId()).setState(UploadState.UPLOAD_STATE_OPEN).build());
            out.onCompleted();
          }
        })
        .build()
        .start();
  }

  @AfterAll
  static void stop() throws InterruptedException {
    server.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
  }

  private static Process keytool(String alias, String dname, String san) throws IOException {
    Path store = dir.resolve(alias + ".p12");
    var command = new java.util.ArrayList<>(java.util.List.of(
        Path.of(System.getProperty("java.home"), "bin", "keytool").toString(),
        "-J-XX:TieredStopAtLevel=1", // a short-lived JVM: the quick compiler is enough
        "-genkeypair", "-alias", alias, "-keyalg", "EC", "-groupname", "secp256r1", "-sigalg", "SHA256withECDSA",
        "-validity", "2", "-dname", dname, "-storetype", "PKCS12",
        "-keystore", store.toString(), "-storepass", new String(PASSWORD)));
    if (san != null) {
      command.addAll(java.util.List.of("-ext", san));
    }
    return new ProcessBuilder(command).redirectErrorStream(true).start();
  }

  private static KeyStore load(String alias, Process p) throws Exception {
    Path store = dir.resolve(alias + ".p12");
    String output = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
    assertEquals(0, p.waitFor(), output);
    KeyStore ks = KeyStore.getInstance("PKCS12");
    try (InputStream in = Files.newInputStream(store)) {
      ks.load(in, PASSWORD);
    }
    return ks;
  }

  private static Path pem(Path file, Certificate cert) throws Exception {
    Files.writeString(file, "-----BEGIN CERTIFICATE-----\n"
        + Base64.getMimeEncoder(64, "\n".getBytes(StandardCharsets.US_ASCII)).encodeToString(cert.getEncoded())
        + "\n-----END CERTIFICATE-----\n");
    return file;
  }

  private static Path key(Path file, KeyStore store, String alias) throws Exception {
    byte[] pkcs8 = store.getKey(alias, PASSWORD).getEncoded();
    Files.writeString(file, "-----BEGIN PRIVATE KEY-----\n"
        + Base64.getMimeEncoder(64, "\n".getBytes(StandardCharsets.US_ASCII)).encodeToString(pkcs8)
        + "\n-----END PRIVATE KEY-----\n");
    return file;
  }

  private static RecgwClient client(Path cert, Path key, String serverName) {
    return RecgwClient.builder()
        .address("localhost:" + server.getPort())
        .token("tls-test-token")
        .tls(serverCa, cert, key, serverName)
        .build();
  }

  @Test
  void mutualTlsWithTheServerNameOverride() {
    try (RecgwClient client = client(clientCert, clientKey, "gateway.test")) {
      assertEquals(UploadState.UPLOAD_STATE_OPEN, client.status("u-1").state());
    }
  }

  @Test
  void aServerNameTheCertificateDoesNotNameIsRefused() {
    try (RecgwClient client = client(clientCert, clientKey, "other.test")) {
      RecgwException e = assertThrows(RecgwException.class, () -> client.status("u-1"));
      assertEquals(Status.Code.UNAVAILABLE, e.code());
    }
  }

  @Test
  void aClientCertificateTheServerDoesNotTrustIsRefused() {
    try (RecgwClient client = client(strangerCert, strangerKey, "gateway.test")) {
      RecgwException e = assertThrows(RecgwException.class, () -> client.status("u-1"));
      assertEquals(Status.Code.UNAVAILABLE, e.code());
    }
  }

  @Test
  void severalReplicasAreCheckedAgainstTheServerName() throws Exception {
    java.util.concurrent.atomic.AtomicInteger a = new java.util.concurrent.atomic.AtomicInteger();
    java.util.concurrent.atomic.AtomicInteger b = new java.util.concurrent.atomic.AtomicInteger();
    Server serverA = BalanceTest.counting(a, serverCredentials);
    Server serverB = BalanceTest.counting(b, serverCredentials);
    java.util.List<String> both = java.util.List.of("127.0.0.1:" + serverA.getPort(), "127.0.0.1:" + serverB.getPort());
    try {
      try (RecgwClient client = RecgwClient.builder().addresses(both).token("tls-test-token")
          .tls(serverCa, clientCert, clientKey, "gateway.test").build()) {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
        while (a.get() == 0 || b.get() == 0) {
          assertEquals(UploadState.UPLOAD_STATE_OPEN, client.status("u-1").state());
          assertTrue(System.nanoTime() < deadline, "never reached both replicas over TLS");
        }
      }
      try (RecgwClient client = RecgwClient.builder().addresses(both).token("tls-test-token")
          .tls(serverCa, clientCert, clientKey, "other.test").build()) {
        assertEquals(Status.Code.UNAVAILABLE, assertThrows(RecgwException.class, () -> client.status("u-1")).code());
      }
    } finally {
      serverA.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
      serverB.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  @Test
  void plaintextIsOnlyUsedWhenAskedForAndTlsFilesMustPair() throws IOException {
    assertThrows(IllegalArgumentException.class,
        () -> RecgwClient.builder().tls(serverCa, clientCert, null, null));
    assertThrows(IllegalStateException.class,
        () -> RecgwClient.builder().address("localhost:1").token("t").plaintext().tls(serverCa, null, null, null).build());
    // Without plaintext() the client speaks TLS: a handshake with this server fails without a client cert.
    try (RecgwClient client = RecgwClient.builder().address("localhost:" + server.getPort()).token("t")
        .tls(serverCa, null, null, "gateway.test").build()) {
      assertEquals(Status.Code.UNAVAILABLE, assertThrows(RecgwException.class, () -> client.status("u")).code());
    }
  }
}
