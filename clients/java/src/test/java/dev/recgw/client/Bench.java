package dev.recgw.client;

import dev.recgw.v1.UploadStart;
import java.io.InputStream;
import java.util.Random;
import java.util.UUID;

/**
 * Upload throughput of the Java client through a gateway: {@code Bench [MiB] [--no-checksums]}.
 * Reads the gateway, token and tenant from the environment tests.e2e_stack hands over
 * (RECGW_E2E_DIRECT_ADDRESS, else RECGW_E2E_ADDRESS; RECGW_E2E_UPLOADER_TOKEN; RECGW_E2E_TENANT),
 * plaintext. Prints {@code client_java: uploading N MiB} when the upload begins, then
 * {@code client_java: N MiB in S s = R MiB/s, CPU C s (checksums on)}, C being this process's
 * CPU time during the upload (JIT and GC threads included); {@code make bench} reads both lines.
 */
public final class Bench {
  private Bench() {}

  public static void main(String[] args) throws Exception {
    int mib = args.length > 0 && !args[0].startsWith("--") ? Integer.parseInt(args[0]) : 64;
    boolean checksums = !java.util.List.of(args).contains("--no-checksums");
    int warmupMib = 0; // --warmup-mib=N: an untimed upload first, so the JIT has compiled the path
    for (String arg : args) {
      if (arg.startsWith("--warmup-mib=")) {
        warmupMib = Integer.parseInt(arg.substring("--warmup-mib=".length()));
      }
    }
    String address = System.getenv("RECGW_E2E_DIRECT_ADDRESS");
    if (address == null) {
      address = System.getenv("RECGW_E2E_ADDRESS");
    }
    // One 8 MiB block repeated: generating the bytes is not part of what is measured.
    byte[] block = new byte[8 << 20];
    new Random(1).nextBytes(block);
    long total = (long) mib << 20;
    try (RecgwClient client = RecgwClient.builder()
        .address(address).token(System.getenv("RECGW_E2E_UPLOADER_TOKEN")).plaintext().build()) {
      UploadStart start = UploadStart.newBuilder()
          .setTenantId(System.getenv("RECGW_E2E_TENANT"))
          .setObjectName("bench/java-" + UUID.randomUUID())
          .setExpectedSize(total)
          .build();
      UploadOptions options = UploadOptions.builder().checksums(checksums).build();
      if (warmupMib > 0) {
        long warm = (long) warmupMib << 20;
        client.upload(new Repeat(block, warm), start.toBuilder().setExpectedSize(warm)
            .setObjectName("bench/java-warmup-" + UUID.randomUUID()).build(), options);
      }
      System.out.printf("client_java: uploading %d MiB%n", mib);
      System.out.flush();
      long cpuBefore = processCpuNanos();
      long began = System.nanoTime();
      UploadResult r = client.upload(new Repeat(block, total), start, options);
      double seconds = (System.nanoTime() - began) / 1e9;
      double cpu = (processCpuNanos() - cpuBefore) / 1e9;
      if (r.size() != total) {
        throw new IllegalStateException("stored " + r.size() + " bytes, sent " + total);
      }
      System.out.printf("client_java: %d MiB in %.3f s = %.1f MiB/s, CPU %.3f s (checksums %s)%n",
          mib, seconds, mib / seconds, cpu, checksums ? "on" : "off");
    }
  }

  /** CPU time of the whole process (every thread) so far, in nanoseconds; 0 if unknown. */
  private static long processCpuNanos() {
    if (java.lang.management.ManagementFactory.getOperatingSystemMXBean()
        instanceof com.sun.management.OperatingSystemMXBean os) {
      return Math.max(os.getProcessCpuTime(), 0);
    }
    return 0;
  }

  /** {@code total} bytes of {@code block} over and over. */
  private static final class Repeat extends InputStream {
    private final byte[] block;
    private final long total;
    private long position;

    Repeat(byte[] block, long total) {
      this.block = block;
      this.total = total;
    }

    @Override
    public int read() {
      throw new UnsupportedOperationException();
    }

    @Override
    public int read(byte[] b, int off, int len) {
      if (position == total) {
        return -1;
      }
      int at = (int) (position % block.length);
      int n = (int) Math.min(Math.min(len, block.length - at), total - position);
      System.arraycopy(block, at, b, off, n);
      position += n;
      return n;
    }
  }
}
