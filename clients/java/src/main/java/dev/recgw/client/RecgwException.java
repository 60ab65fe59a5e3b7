package dev.recgw.client;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.ErrorInfo;
import io.grpc.Status;
import io.grpc.protobuf.StatusProto;
import java.util.Map;
import java.util.OptionalLong;
import java.util.TreeMap;

/**
 * A call to the gateway failed, or the client gave up on an upload.
 *
 * <p>Unchecked, like grpc-java's own {@code StatusRuntimeException}, so it passes through
 * {@code CompletableFuture} stages and lambdas unchanged. Decide on {@link #code()} and
 * {@link #reason()}, never on the message text, which is meant for people.
 *
 * <p>{@link #reason()} is the gateway's {@code google.rpc.ErrorInfo} reason (an {@code
 * ErrorReason} name without the {@code ERROR_REASON_} prefix, for example {@code
 * "OFFSET_MISMATCH"}), or one of the client's own reasons (constants below) when the client
 * decided to fail; {@link #isClientSide()} tells which. {@link #metadata()} holds the ErrorInfo
 * facts such as {@code committed_size}. {@link #uploadId()} is set for every error of an upload,
 * so the upload can be inspected, resumed or aborted later.
 *
 * <p>No message of this exception ever carries the bearer token or a credentials secret: the
 * client redacts them from the gateway's text.
 */
public class RecgwException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  /** ErrorInfo domain of the gateway's errors. */
  public static final String GATEWAY_DOMAIN = "recgw.v1";

  /** Domain of the errors the client raises itself. */
  public static final String CLIENT_DOMAIN = "recgw.client";

  /** Client reason: the retained buffer is full and the gateway commits nothing more. */
  public static final String RETAINED_LIMIT_REACHED = "RETAINED_LIMIT_REACHED";

  /** Client reason: the gateway wants bytes the client no longer holds, so it cannot resume. */
  public static final String RESUME_IMPOSSIBLE = "RESUME_IMPOSSIBLE";

  /** Client reason: the upload already has committed bytes and the source cannot seek to them. */
  public static final String SOURCE_NOT_SEEKABLE = "SOURCE_NOT_SEEKABLE";

  /** Client reason: the upload ended (aborted, expired, salvaged) while the client resumed it. */
  public static final String UPLOAD_ENDED = "UPLOAD_ENDED";

  /** Client reason: the gateway's result does not describe the bytes the client sent. */
  public static final String RESULT_MISMATCH = "RESULT_MISMATCH";

  /** Client reason: no byte was committed for the whole outage tolerance. */
  public static final String OUTAGE_TOLERANCE_EXCEEDED = "OUTAGE_TOLERANCE_EXCEEDED";

  private final Status.Code code;
  private final String description;
  private final String reason;
  private final String domain;
  private final Map<String, String> metadata;
  private final String uploadId;

  RecgwException(
      Status.Code code,
      String description,
      String reason,
      String domain,
      Map<String, String> metadata,
      String uploadId,
      Throwable cause) {
    super(format(code, reason, description), cause);
    this.code = code;
    this.description = description == null ? "" : description;
    this.reason = reason == null ? "" : reason;
    this.domain = domain == null ? "" : domain;
    this.metadata = Map.copyOf(metadata == null ? Map.of() : metadata);
    this.uploadId = uploadId;
  }

  /** The gRPC status code. */
  public Status.Code code() {
    return code;
  }

  /** The gateway's (or the client's) explanation, for people. */
  public String description() {
    return description;
  }

  /** The structured reason, {@code ""} when the status carried none (a transport failure). */
  public String reason() {
    return reason;
  }

  /** {@link #GATEWAY_DOMAIN}, {@link #CLIENT_DOMAIN}, or {@code ""} without a reason. */
  public String domain() {
    return domain;
  }

  /** True when the client raised this error itself rather than relaying the gateway's. */
  public boolean isClientSide() {
    return CLIENT_DOMAIN.equals(domain);
  }

  /** The ErrorInfo metadata (for example {@code committed_size}); empty when none. */
  public Map<String, String> metadata() {
    return metadata;
  }

  /** The upload this error is about, or null for calls that are not about an upload. */
  public String uploadId() {
    return uploadId;
  }

  /** {@code committed_size} from the metadata, when present. */
  public OptionalLong committedSize() {
    String value = metadata.get("committed_size");
    if (value == null) {
      return OptionalLong.empty();
    }
    try {
      return OptionalLong.of(Long.parseLong(value));
    } catch (NumberFormatException e) {
      return OptionalLong.empty();
    }
  }

  private static String format(Status.Code code, String reason, String description) {
    StringBuilder text = new StringBuilder(code.name());
    if (reason != null && !reason.isEmpty()) {
      text.append(" (").append(reason).append(')');
    }
    if (description != null && !description.isEmpty()) {
      text.append(": ").append(description);
    }
    return text.toString();
  }

  /** An error the client raises itself. */
  static RecgwException client(Status.Code code, String reason, String message, String uploadId) {
    return new RecgwException(code, message, reason, CLIENT_DOMAIN, Map.of(), uploadId, null);
  }

  /** The same error, now naming the upload it is about. */
  RecgwException withUploadId(String id) {
    if (id == null || id.equals(uploadId)) {
      return this;
    }
    RecgwException copy =
        new RecgwException(code, description, reason, domain, metadata, id, getCause());
    copy.setStackTrace(getStackTrace());
    return copy;
  }

  /** The same error with a sentence added to its description. */
  RecgwException withNote(String note) {
    RecgwException copy =
        new RecgwException(
            code, description + " (" + note + ")", reason, domain, metadata, uploadId, getCause());
    copy.setStackTrace(getStackTrace());
    return copy;
  }

  /**
   * Converts any throwable of a gRPC call: the status, its ErrorInfo (domain recgw.v1) from the
   * {@code grpc-status-details-bin} trailer, with every secret of {@code redactor} removed.
   */
  static RecgwException fromGrpc(Throwable error, String uploadId, Redactor redactor) {
    if (error instanceof RecgwException recgw) {
      return recgw.withUploadId(uploadId);
    }
    Status status = Status.fromThrowable(error);
    String reason = "";
    String domain = "";
    Map<String, String> metadata = new TreeMap<>();
    com.google.rpc.Status details = StatusProto.fromThrowable(error);
    if (details != null) {
      for (Any any : details.getDetailsList()) {
        if (!any.is(ErrorInfo.class)) {
          continue;
        }
        try {
          ErrorInfo info = any.unpack(ErrorInfo.class);
          reason = info.getReason();
          domain = info.getDomain();
          info.getMetadataMap().forEach((k, v) -> metadata.put(k, redactor.redact(v)));
        } catch (InvalidProtocolBufferException ignored) {
          // A malformed detail: decide on the code alone.
        }
        break;
      }
    }
    String id = uploadId != null ? uploadId : metadata.get("upload_id");
    String description = redactor.redact(status.getDescription());
    // Keep the cause only when it is not the gRPC exception itself: its message repeats the
    // unredacted description.
    Throwable cause = status.getCause();
    return new RecgwException(status.getCode(), description, reason, domain, metadata, id, cause);
  }
}
