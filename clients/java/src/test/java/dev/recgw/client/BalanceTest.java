package dev.recgw.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.recgw.v1.GetUploadStatusRequest;
import dev.recgw.v1.GetUploadStatusResponse;
import dev.recgw.v1.UploadServiceGrpc;
import dev.recgw.v1.UploadState;
import io.grpc.EquivalentAddressGroup;
import io.grpc.Grpc;
import io.grpc.InsecureServerCredentials;
import io.grpc.NameResolver;
import io.grpc.Server;
import io.grpc.Status;
import io.grpc.StatusOr;
import io.grpc.stub.StreamObserver;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.URI;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;

/**
 * Several replicas' addresses: the client balances round_robin over two real grpc-netty servers
 * on loopback (a fake UploadService that counts GetUploadStatus calls), and sends everything to
 * the one left when the other stops.
 */
class BalanceTest {
  private final List<Server> servers = new ArrayList<>();

  /** A loopback server whose GetUploadStatus answers OPEN and counts into {@code calls}. */
  static Server counting(AtomicInteger calls, io.grpc.ServerCredentials credentials) throws IOException {
    return Grpc.newServerBuilderForPort(0, credentials)
        .addService(new UploadServiceGrpc.UploadServiceImplBase() {
          @Override
          public void getUploadStatus(GetUploadStatusRequest request, StreamObserver<GetUploadStatusResponse> out) {
            calls.incrementAndGet();
            out.onNext(GetUploadStatusResponse.newBuilder()
                .setUploadId(request.getUploadId()).setState(UploadState.UPLOAD_STATE_OPEN).build());
            out.onCompleted();
          }
        })
        .build()
        .start();
  }

  private Server start(AtomicInteger calls) throws IOException {
    Server server = counting(calls, InsecureServerCredentials.create());
    servers.add(server);
    return server;
  }

  @AfterEach
  void stop() throws InterruptedException {
    for (Server server : servers) {
      server.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  @Test
  void callsSpreadOverTheReplicasAndGoToTheOneLeftWhenOneStops() throws Exception {
    AtomicInteger a = new AtomicInteger();
    AtomicInteger b = new AtomicInteger();
    Server serverA = start(a);
    start(b);
    String addresses = "127.0.0.1:" + serverA.getPort() + ", 127.0.0.1:" + servers.get(1).getPort();
    try (RecgwClient client = RecgwClient.builder().address(addresses).token("balance-test-token")
        .plaintext().build()) {
      // round_robin picks among the replicas it is connected to; the second may connect later.
      long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
      while (a.get() == 0 || b.get() == 0) {
        assertEquals(UploadState.UPLOAD_STATE_OPEN, client.status("u-1").state());
        assertTrue(System.nanoTime() < deadline, "never reached both replicas: " + a + " and " + b);
      }
      a.set(0);
      b.set(0);
      for (int i = 0; i < 10; i++) {
        client.status("u-1");
      }
      assertTrue(a.get() >= 3 && b.get() >= 3, "round_robin should spread calls: A got " + a + ", B got " + b);

      serverA.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
      // Once the balancer has seen A go, every call goes to B (one may still fail on A's connection).
      deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
      while (true) {
        int before = b.get();
        try {
          client.status("u-1");
          if (b.get() == before + 1) {
            break;
          }
        } catch (RecgwException e) {
          assertEquals(Status.Code.UNAVAILABLE, e.code());
        }
        assertTrue(System.nanoTime() < deadline, "calls never all went to B after A stopped");
      }
      int before = b.get();
      for (int i = 0; i < 5; i++) {
        client.status("u-1");
      }
      assertEquals(5, b.get() - before, "B should get every call after A stopped");
    }
  }

  @Test
  void badListsAreRefusedWithTheReason() {
    RecgwClient.Builder builder = RecgwClient.builder();
    String empty = assertThrows(IllegalArgumentException.class,
        () -> builder.address("10.0.0.11:50051,,10.0.0.12:50051")).getMessage();
    assertTrue(empty.contains("empty gateway address"), empty);
    assertThrows(IllegalArgumentException.class, () -> builder.address("10.0.0.11:50051,"));
    assertThrows(IllegalArgumentException.class, () -> builder.addresses(List.of()));
    String name = assertThrows(IllegalArgumentException.class,
        () -> builder.addresses(List.of("10.0.0.11:50051", "gw-b:50051"))).getMessage();
    assertTrue(name.contains("must each be IP:port (\"gw-b:50051\" is not)") && name.contains("dns:///"), name);
    for (String bad : List.of("10.0.0.12", "10.0.0.256:50051", "10.0.0.12:65536", "[fd00::12]", "fd00::12:50051")) {
      assertThrows(IllegalArgumentException.class, () -> builder.addresses(List.of("10.0.0.11:50051", bad)), bad);
    }
    String control = assertThrows(IllegalArgumentException.class,
        () -> builder.addresses(List.of("10.0.0.11:50051", "gw\n:1"))).getMessage();
    assertTrue(control.contains("\"gw\\u000a:1\""), control);

    // TLS to IP addresses needs the name the replicas' certificates carry.
    String tls = assertThrows(IllegalStateException.class, () -> RecgwClient.builder()
        .address("10.0.0.11:50051,10.0.0.12:50051").token("t").build()).getMessage();
    assertTrue(tls.contains("needs the name their certificates carry"), tls);
    assertThrows(IllegalStateException.class, () -> RecgwClient.builder()
        .address("10.0.0.11:50051,10.0.0.12:50051").token("t").tls(null, null, null, null).build());
    // One address, a name, or a name with a server name override stay as they were.
    RecgwClient.builder().address("gw.example:50051").token("t").build().close();
    RecgwClient.builder().address("10.0.0.11:50051,10.0.0.12:50051").token("t")
        .tls(null, null, null, "gw.example").build().close();
  }

  @Test
  void theResolverGivesEachAddressItsOwnGroup() throws Exception {
    String target = Replicas.target(List.of("10.0.0.11:50051", "[fd00::12]:50052"));
    assertEquals("recgw-replicas:///10.0.0.11:50051,%5Bfd00::12%5D:50052", target);
    NameResolver resolver = new Replicas.Provider().newNameResolver(new URI(target), null);
    assertEquals("10.0.0.11:50051", resolver.getServiceAuthority());
    List<List<InetSocketAddress>> got = new ArrayList<>();
    resolver.start(new NameResolver.Listener2() {
      @Override
      public void onResult(NameResolver.ResolutionResult result) {
        StatusOr<List<EquivalentAddressGroup>> groups = result.getAddressesOrError();
        for (EquivalentAddressGroup group : groups.getValue()) {
          got.add(group.getAddresses().stream().map(InetSocketAddress.class::cast).toList());
        }
      }

      @Override
      public void onError(Status error) {
        throw new AssertionError(error.toString());
      }
    });
    assertEquals(List.of(
        List.of(new InetSocketAddress("10.0.0.11", 50051)),
        List.of(new InetSocketAddress("fd00::12", 50052))), got);
  }
}
