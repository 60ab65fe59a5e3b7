package dev.recgw.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import io.grpc.Status;
import java.time.Duration;
import java.util.Locale;
import org.junit.jupiter.api.Test;

/** The client's retry rules and backoff against testdata/retry_table.json. */
class RetryTableTest {
  private static RetryRules.Action action(String name) {
    return RetryRules.Action.valueOf(name.toUpperCase(Locale.ROOT));
  }

  @Test
  void everyCaseGetsItsAction() throws Exception {
    int cases = 0;
    for (JsonElement e : Testdata.load("retry_table.json").getAsJsonArray("cases")) {
      JsonObject c = e.getAsJsonObject();
      Status.Code code = Status.Code.valueOf(c.get("code").getAsString());
      String reason = c.get("reason").getAsString();
      assertEquals(action(c.get("action").getAsString()), RetryRules.actionFor(code, reason), c.toString());
      cases++;
    }
    assertTrue(cases > 30);
  }

  @Test
  void theRulesAreTheTablesRules() throws Exception {
    var rules = Testdata.load("retry_table.json").getAsJsonArray("rules").asList();
    assertEquals(rules.size(), RetryRules.RULES.size());
    for (int i = 0; i < rules.size(); i++) {
      JsonObject r = rules.get(i).getAsJsonObject();
      RetryRules.Rule mine = RetryRules.RULES.get(i);
      assertEquals(r.get("code").getAsString(), mine.code());
      assertEquals(r.get("reason").getAsString(), mine.reason());
      assertEquals(action(r.get("action").getAsString()), mine.action());
    }
  }

  @Test
  void clientSideErrorsAreFinal() {
    RecgwException e = RecgwException.client(Status.Code.UNAVAILABLE, RecgwException.RESUME_IMPOSSIBLE, "x", "id");
    assertEquals(RetryRules.Action.FAIL, RetryRules.actionFor(e));
  }

  @Test
  void backoffAndToleranceDefaultsAreTheTables() throws Exception {
    JsonObject b = Testdata.load("retry_table.json").getAsJsonObject("backoff");
    Backoff mine = UploadOptions.defaults().backoff;
    assertEquals(Duration.ofMillis((long) (b.get("initial_seconds").getAsDouble() * 1000)), mine.initial());
    assertEquals(b.get("multiplier").getAsDouble(), mine.multiplier());
    assertEquals(Duration.ofMillis((long) (b.get("max_seconds").getAsDouble() * 1000)), mine.max());
    assertEquals(b.get("jitter").getAsDouble(), mine.jitter());
    assertEquals(Duration.ofSeconds(b.get("outage_tolerance_seconds").getAsLong()), UploadOptions.defaults().outageTolerance);
  }

  @Test
  void backoffGrowsWithJitterUpToTheMax() {
    Backoff b = Backoff.DEFAULT;
    assertEquals(200_000_000L, b.delayNanos(1, () -> 0.5));
    assertEquals(400_000_000L, b.delayNanos(2, () -> 0.5));
    assertEquals(160_000_000L, b.delayNanos(1, () -> 0.0)); // -20 %
    assertEquals(240_000_000L, b.delayNanos(1, () -> 1.0)); // +20 %
    assertEquals(10_000_000_000L, b.delayNanos(30, () -> 0.5));
    assertEquals(10_000_000_000L, b.delayNanos(30, () -> 1.0)); // never above the max
    assertEquals(8_000_000_000L, b.delayNanos(30, () -> 0.0));
  }
}
