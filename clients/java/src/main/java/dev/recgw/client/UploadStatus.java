package dev.recgw.client;

import dev.recgw.v1.GetUploadStatusResponse;
import dev.recgw.v1.UploadState;
import java.time.Instant;
import java.util.Optional;

/** What GetUploadStatus reports about an upload. */
public record UploadStatus(
    String uploadId,
    UploadState state,
    long committedSize,
    long receivedSize,
    String tenantId,
    String key,
    Optional<UploadResult> result,
    String errorMessage,
    Optional<Instant> createTime,
    Optional<Instant> updateTime) {

  static UploadStatus of(GetUploadStatusResponse r) {
    boolean unconfirmed = r.getState() == UploadState.UPLOAD_STATE_COMPLETION_UNCONFIRMED;
    return new UploadStatus(
        r.getUploadId(),
        r.getState(),
        r.getCommittedSize(),
        r.getReceivedSize(),
        r.getTenantId(),
        r.getKey(),
        r.hasResult() ? Optional.of(UploadResult.of(r.getResult(), r.getUploadId(), unconfirmed)) : Optional.empty(),
        r.getErrorMessage(),
        r.hasCreateTime() ? Optional.of(instant(r.getCreateTime())) : Optional.empty(),
        r.hasUpdateTime() ? Optional.of(instant(r.getUpdateTime())) : Optional.empty());
  }

  private static Instant instant(com.google.protobuf.Timestamp t) {
    return Instant.ofEpochSecond(t.getSeconds(), t.getNanos());
  }
}
