package dev.recgw.client;

import java.nio.ByteBuffer;
import java.util.concurrent.Flow;

/** The producers: read a source once, cut it into chunks, take room for them, hand them over. */
final class Feeds {
  private Feeds() {}

  /** A chunker whose chunks wait for room in the gate (blocking) before going to the run. */
  static Chunker blockingChunker(UploadRun run, int chunkSize, long offset, boolean checksums, ObjectHasher hasher) {
    return new Chunker(
        chunkSize,
        offset,
        checksums,
        hasher,
        run.pool(),
        chunk -> {
          try {
            run.gate().acquire(chunk.length());
          } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new UploadRun.Ended();
          }
          run.offer(chunk);
        });
  }

  /** Reads {@code reader} to its end on a daemon thread of its own. */
  static void startReader(UploadRun run, Chunker chunker, Chunker.Reader reader, String uploadId) {
    Thread thread =
        new Thread(
            () -> {
              try {
                while (!run.isDone() && chunker.readFrom(reader)) {
                  // each read hands over the chunks it completed
                }
                if (!run.isDone()) {
                  chunker.finish();
                }
              } catch (UploadRun.Ended e) {
                // the upload ended while this thread read or waited for room
              } catch (Throwable e) { // the source's failure, whatever it is, ends the upload
                run.sourceFailed(e);
              }
            },
            "recgw-reader-" + uploadId);
    thread.setDaemon(true);
    thread.start();
  }

  /**
   * Subscribes to a publisher: requests one buffer at a time, and the next only while the
   * retained buffer has room for another chunk.
   */
  static final class PublisherFeed implements Flow.Subscriber<ByteBuffer> {
    private final UploadRun run;
    private final int chunkSize;
    private final Chunker chunker;
    private volatile Flow.Subscription subscription;

    PublisherFeed(UploadRun run, int chunkSize, long offset, boolean checksums, ObjectHasher hasher) {
      this.run = run;
      this.chunkSize = chunkSize;
      this.chunker =
          new Chunker(
              chunkSize,
              offset,
              checksums,
              hasher,
              run.pool(),
              chunk -> {
                run.gate().force(chunk.length());
                run.offer(chunk);
              });
    }

    @Override
    public void onSubscribe(Flow.Subscription s) {
      if (subscription != null) {
        s.cancel();
        return;
      }
      subscription = s;
      run.result.whenComplete((r, t) -> s.cancel());
      requestNext();
    }

    @Override
    public void onNext(ByteBuffer buffer) {
      try {
        chunker.write(buffer);
      } catch (UploadRun.Ended e) {
        subscription.cancel();
        return;
      }
      requestNext();
    }

    @Override
    public void onError(Throwable error) {
      run.sourceFailed(error);
    }

    @Override
    public void onComplete() {
      try {
        chunker.finish();
      } catch (UploadRun.Ended e) {
        // already over
      }
    }

    private void requestNext() {
      run.gate().whenRoom(chunkSize, () -> subscription.request(1));
    }
  }
}
