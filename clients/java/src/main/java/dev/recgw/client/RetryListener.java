package dev.recgw.client;

/** Told before an upload resumes on a new stream. Called on the upload's own thread. */
@FunctionalInterface
public interface RetryListener {
  /**
   * @param attempt the number of the stream about to open (2 or more)
   * @param cause what ended the previous stream
   * @param resumeAt the offset the new stream starts at (the gateway's committed size)
   */
  void onRetry(int attempt, RecgwException cause, long resumeAt);
}
