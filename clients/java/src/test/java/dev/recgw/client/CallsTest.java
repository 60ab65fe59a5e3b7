package dev.recgw.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.recgw.v1.UploadState;
import io.grpc.Status;
import java.util.HexFormat;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** Status, abort and salvage against the in-process {@link FakeGateway}; errors carry the ErrorInfo. */
class CallsTest {
  @Test
  void statusAbortAndSalvageReportTheGatewaysAnswers() throws Exception {
    try (FakeGateway gateway = new FakeGateway(); RecgwClient client = gateway.client()) {
      FakeGateway.Upload open = new FakeGateway.Upload("u-open");
      open.bytes.writeBytes(Testdata.ramp(100_000));
      open.committed = 65536;
      gateway.uploads.put(open.id, open);

      UploadStatus status = client.status("u-open");
      assertEquals(UploadState.UPLOAD_STATE_OPEN, status.state());
      assertEquals(65536, status.committedSize());
      assertEquals(100_000, status.receivedSize());
      assertTrue(status.result().isEmpty());

      SalvageResult salvaged = client.salvage("u-open");
      assertEquals(UploadState.UPLOAD_STATE_SALVAGED, salvaged.state());
      assertEquals(65536, salvaged.result().size());
      assertEquals("uploads/u-open.partial", salvaged.result().key());
      assertEquals(HexFormat.of().formatHex(FakeGateway.sha256(java.util.Arrays.copyOf(Testdata.ramp(100_000), 65536))),
          salvaged.result().sha256Hex());

      RecgwException again = assertThrows(RecgwException.class, () -> client.salvage("u-open"));
      assertEquals(Status.Code.FAILED_PRECONDITION, again.code());
      assertEquals("UPLOAD_ENDED", again.reason());
      assertEquals("u-open", again.uploadId());

      gateway.uploads.put("u-2", new FakeGateway.Upload("u-2"));
      AbortResult aborted = client.abort("u-2");
      assertEquals(UploadState.UPLOAD_STATE_ABORTED, aborted.state());
      assertTrue(aborted.storageAborted());

      RecgwException missing = assertThrows(RecgwException.class, () -> client.status("nope"));
      assertEquals(Status.Code.NOT_FOUND, missing.code());
      assertEquals("UPLOAD_NOT_FOUND", missing.reason());
    }
  }

  @Test
  void errorInfoMetadataIsExposedAndSecretsAreRedactedFromIt() {
    RecgwException e = RecgwException.fromGrpc(
        FakeGateway.error(Status.Code.OUT_OF_RANGE, "OFFSET_MISMATCH", "at 5",
            Map.of("committed_size", "5242880", "upload_id", "u-9", "echo", "Bearer secret-token-123")),
        null, Redactor.of("secret-token-123"));
    assertEquals(Status.Code.OUT_OF_RANGE, e.code());
    assertEquals("OFFSET_MISMATCH", e.reason());
    assertEquals(5_242_880L, e.committedSize().getAsLong());
    assertEquals("u-9", e.uploadId(), "the upload id comes from the metadata when the call had none");
    assertEquals("Bearer [REDACTED]", e.metadata().get("echo"));
    assertEquals("OUT_OF_RANGE (OFFSET_MISMATCH): at 5", e.getMessage());

    RecgwException bare = RecgwException.fromGrpc(Status.UNAVAILABLE.withDescription("io").asRuntimeException(), "u", Redactor.of());
    assertEquals("", bare.reason());
    assertTrue(bare.committedSize().isEmpty());
  }

  @Test
  void aWipeableSecretIsRedactedWithoutBecomingAString() {
    char[] secret = "wJalrXUtnFEMI/K7MDENG".toCharArray();
    Redactor r = Redactor.of().with(secret);
    assertEquals("key [REDACTED] and [REDACTED].", r.redact("key wJalrXUtnFEMI/K7MDENG and wJalrXUtnFEMI/K7MDENG."));
    java.util.Arrays.fill(secret, '\0');
    assertEquals("short ok", Redactor.of("ok").redact("short ok"), "values under 8 characters are left alone");
  }
}
