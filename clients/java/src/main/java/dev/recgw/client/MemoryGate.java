package dev.recgw.client;

/**
 * Bounds the bytes an upload holds: the producer acquires room for each chunk before handing it
 * over and the upload releases it once the gateway has committed the chunk. Thread-safe.
 */
final class MemoryGate {
  private final long limit;
  private long used;
  private RuntimeException failure;
  private Runnable onBlocked = () -> {};
  private Runnable roomWaiter;
  private long roomWanted;
  private boolean blocked;

  MemoryGate(long limit) {
    this.limit = limit;
  }

  long limit() {
    return limit;
  }

  synchronized long used() {
    return used;
  }

  /** Called (outside the lock) each time a producer finds no room and starts waiting. */
  synchronized void onBlocked(Runnable hook) {
    this.onBlocked = hook;
  }

  /** True while a producer waits for room. */
  synchronized boolean isBlocked() {
    return blocked || roomWaiter != null;
  }

  /** Waits until {@code n} more bytes fit (or nothing is held), then takes them. */
  void acquire(long n) throws InterruptedException {
    Runnable hook;
    synchronized (this) {
      throwIfFailed();
      if (fits(n)) {
        used += n;
        return;
      }
      blocked = true;
      hook = onBlocked;
    }
    hook.run();
    synchronized (this) {
      try {
        while (!fits(n)) {
          throwIfFailed();
          wait();
        }
        throwIfFailed();
        used += n;
      } finally {
        blocked = false;
      }
    }
  }

  /** Takes {@code n} bytes whether they fit or not (an asynchronous producer already has them). */
  synchronized void force(long n) {
    throwIfFailed();
    used += n;
  }

  /**
   * Runs {@code task} once {@code n} more bytes fit: at once (on this thread) if they do now,
   * else on the thread that releases enough.
   */
  void whenRoom(long n, Runnable task) {
    Runnable hook;
    synchronized (this) {
      if (failure != null) {
        return;
      }
      if (fits(n)) {
        hook = null;
      } else {
        roomWaiter = task;
        roomWanted = n;
        hook = onBlocked;
      }
    }
    if (hook == null) {
      task.run();
    } else {
      hook.run();
    }
  }

  void release(long n) {
    Runnable ready = null;
    synchronized (this) {
      used -= n;
      notifyAll();
      if (roomWaiter != null && fits(roomWanted)) {
        ready = roomWaiter;
        roomWaiter = null;
      }
    }
    if (ready != null) {
      ready.run();
    }
  }

  /** Wakes every waiting producer with {@code error}; later acquisitions throw it too. */
  synchronized void fail(RuntimeException error) {
    if (failure == null) {
      failure = error;
    }
    roomWaiter = null;
    notifyAll();
  }

  private boolean fits(long n) {
    return used == 0 || used + n <= limit;
  }

  private void throwIfFailed() {
    if (failure != null) {
      throw failure;
    }
  }
}
