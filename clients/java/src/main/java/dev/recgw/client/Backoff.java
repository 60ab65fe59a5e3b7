package dev.recgw.client;

import java.time.Duration;
import java.util.function.DoubleSupplier;

/**
 * Exponential backoff with jitter: the n-th consecutive retry waits {@code initial *
 * multiplier^(n-1)}, at most {@code max}, varied by up to {@code jitter} (a fraction) either way,
 * and never more than {@code max}.
 */
record Backoff(Duration initial, double multiplier, Duration max, double jitter) {
  static final Backoff DEFAULT = new Backoff(Duration.ofMillis(200), 2.0, Duration.ofSeconds(10), 0.2);

  Backoff {
    if (initial.isNegative() || max.isNegative()) {
      throw new IllegalArgumentException("backoff times must not be negative");
    }
    if (multiplier < 1) {
      throw new IllegalArgumentException("the backoff multiplier must be at least 1");
    }
    if (jitter < 0 || jitter > 1) {
      throw new IllegalArgumentException("jitter must be between 0 and 1");
    }
  }

  /** Nanoseconds to wait before the {@code retry}-th consecutive retry (1-based). */
  long delayNanos(int retry, DoubleSupplier random) {
    double maxNanos = max.toNanos();
    double base = Math.min(maxNanos, initial.toNanos() * Math.pow(multiplier, Math.max(retry - 1, 0)));
    double spread = base * jitter * (2 * random.getAsDouble() - 1);
    return (long) Math.max(0, Math.min(maxNanos, base + spread));
  }
}
