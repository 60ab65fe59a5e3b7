package dev.recgw.client;

import dev.recgw.v1.UploadResponse;
import java.util.HexFormat;
import java.util.OptionalLong;

/**
 * The finished object. {@code crc32c} and {@code sha256} are what the gateway computed over the
 * bytes it received (the client has checked they match what it sent, when checksums are on).
 * {@code unconfirmed} is true when S3's answer to the completion was lost: the object is very
 * likely complete, {@code etag} is then the expected ETag (see {@code UploadResponse}).
 */
public record UploadResult(
    String uploadId,
    String bucket,
    String key,
    long size,
    String etag,
    String versionId,
    int partCount,
    OptionalLong crc32c,
    byte[] sha256,
    boolean unconfirmed) {

  /** SHA-256 as lower-case hex, {@code ""} when the gateway gave none. */
  public String sha256Hex() {
    return HexFormat.of().formatHex(sha256);
  }

  static UploadResult of(UploadResponse response, String uploadId, boolean unconfirmed) {
    var sums = response.getChecksums();
    return new UploadResult(
        response.getUploadId().isEmpty() ? uploadId : response.getUploadId(),
        response.getBucket(),
        response.getKey(),
        response.getSize(),
        response.getEtag(),
        response.getVersionId(),
        response.getPartCount(),
        sums.hasCrc32C() ? OptionalLong.of(Integer.toUnsignedLong(sums.getCrc32C())) : OptionalLong.empty(),
        sums.getSha256().toByteArray(),
        unconfirmed || response.getUnconfirmed());
  }

  @Override
  public String toString() {
    return "UploadResult[uploadId=" + uploadId + ", bucket=" + bucket + ", key=" + key
        + ", size=" + size + ", etag=" + etag + ", partCount=" + partCount
        + ", sha256=" + sha256Hex() + ", unconfirmed=" + unconfirmed + "]";
  }
}
