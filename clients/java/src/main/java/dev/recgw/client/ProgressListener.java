package dev.recgw.client;

/** Told how far an upload got. Called on the upload's own thread: return quickly, never block. */
@FunctionalInterface
public interface ProgressListener {
  /**
   * @param committedBytes bytes the gateway has durably stored, as last reported by it
   * @param sentBytes bytes handed to gRPC so far (may fall back after a resume)
   */
  void onProgress(long committedBytes, long sentBytes);
}
