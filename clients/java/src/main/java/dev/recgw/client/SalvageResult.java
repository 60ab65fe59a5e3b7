package dev.recgw.client;

import dev.recgw.v1.UploadState;

/** What SalvageUpload kept: the state after the call and the salvaged object. */
public record SalvageResult(UploadState state, UploadResult result) {}
