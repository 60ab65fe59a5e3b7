package dev.recgw.client;

import dev.recgw.v1.UploadState;

/** What AbortUpload did; {@code detail} explains anything left in S3. */
public record AbortResult(UploadState state, boolean storageAborted, String detail) {}
