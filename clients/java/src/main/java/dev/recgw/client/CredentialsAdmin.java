package dev.recgw.client;

import com.google.protobuf.UnsafeByteOperations;
import dev.recgw.v1.CredentialsServiceGrpc;
import dev.recgw.v1.CredentialsView;
import dev.recgw.v1.DeleteCredentialsRequest;
import dev.recgw.v1.DescribeCredentialsRequest;
import dev.recgw.v1.SetCredentialsRequest;
import dev.recgw.v1.StorageTarget;
import dev.recgw.v1.VerifyCredentialsRequest;
import dev.recgw.v1.VerifyCredentialsResponse;
import io.grpc.Channel;
import io.grpc.StatusRuntimeException;
import java.nio.ByteBuffer;
import java.nio.CharBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CharsetEncoder;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Arrays;
import java.util.concurrent.TimeUnit;

/**
 * The gateway's CredentialsService: stores each tenant's S3 credentials in Vault. Credentials
 * are written, described, verified and deleted, never read back. Needs a token of role {@code
 * admin}. Get one from {@link RecgwClient#credentials()}.
 */
public final class CredentialsAdmin {
  private final Channel channel;
  private final Redactor redactor;
  private final Duration callTimeout;

  CredentialsAdmin(Channel channel, Redactor redactor, Duration callTimeout) {
    this.channel = channel;
    this.redactor = redactor;
    this.callTimeout = callTimeout;
  }

  private CredentialsServiceGrpc.CredentialsServiceBlockingStub stub() {
    return CredentialsServiceGrpc.newBlockingStub(channel)
        .withDeadlineAfter(callTimeout.toNanos(), TimeUnit.NANOSECONDS);
  }

  /**
   * Creates or overwrites the tenant's credentials and returns the non-secret view stored.
   *
   * <p>{@code secretAccessKey} is encoded into a private byte array that is sent without a
   * String copy and zeroed when the call returns; the caller can wipe its own array afterwards
   * ({@code Arrays.fill(secret, '\0')}). The secret never appears in an exception: should the
   * gateway's message contain it, it is replaced by {@code [REDACTED]}.
   */
  public CredentialsView set(String tenantId, String accessKeyId, char[] secretAccessKey, StorageTarget target) {
    byte[] secret = encode(secretAccessKey);
    try {
      SetCredentialsRequest request =
          SetCredentialsRequest.newBuilder()
              .setTenantId(tenantId)
              .setAccessKeyId(accessKeyId)
              .setSecretAccessKeyBytes(UnsafeByteOperations.unsafeWrap(secret))
              .setTarget(target)
              .build();
      return stub().setCredentials(request).getCredentials();
    } catch (StatusRuntimeException e) {
      throw RecgwException.fromGrpc(e, null, redactor.with(secretAccessKey));
    } finally {
      Arrays.fill(secret, (byte) 0);
    }
  }

  /** The non-secret view of the tenant's credentials; NOT_FOUND (CREDENTIALS_NOT_FOUND) if none. */
  public CredentialsView describe(String tenantId) {
    try {
      return stub()
          .describeCredentials(DescribeCredentialsRequest.newBuilder().setTenantId(tenantId).build())
          .getCredentials();
    } catch (StatusRuntimeException e) {
      throw RecgwException.fromGrpc(e, null, redactor);
    }
  }

  /** Removes the tenant's credentials, all versions; NOT_FOUND if there were none. */
  public void delete(String tenantId) {
    try {
      stub().deleteCredentials(DeleteCredentialsRequest.newBuilder().setTenantId(tenantId).build());
    } catch (StatusRuntimeException e) {
      throw RecgwException.fromGrpc(e, null, redactor);
    }
  }

  /**
   * Writes a tiny object at one fixed key under the tenant's prefix to prove the stored
   * credentials can write; {@code ok} false with the S3 error code when they cannot.
   */
  public VerifyCredentialsResponse verify(String tenantId) {
    try {
      return stub().verifyCredentials(VerifyCredentialsRequest.newBuilder().setTenantId(tenantId).build());
    } catch (StatusRuntimeException e) {
      throw RecgwException.fromGrpc(e, null, redactor);
    }
  }

  @Override
  public String toString() {
    return "CredentialsAdmin";
  }

  private static byte[] encode(char[] secret) {
    CharsetEncoder encoder =
        StandardCharsets.UTF_8
            .newEncoder()
            .onMalformedInput(CodingErrorAction.REPORT)
            .onUnmappableCharacter(CodingErrorAction.REPORT);
    ByteBuffer buffer = null;
    try {
      buffer = encoder.encode(CharBuffer.wrap(secret));
      byte[] out = new byte[buffer.remaining()];
      buffer.get(out);
      return out;
    } catch (CharacterCodingException e) {
      throw new IllegalArgumentException("the secret access key is not valid text (unpaired surrogate)");
    } finally {
      if (buffer != null && buffer.hasArray()) {
        Arrays.fill(buffer.array(), (byte) 0);
      }
    }
  }
}
