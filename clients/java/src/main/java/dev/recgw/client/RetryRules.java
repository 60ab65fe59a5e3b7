package dev.recgw.client;

import io.grpc.Status;
import java.util.List;

/**
 * What an upload does after its stream (or the status query of a resume) failed: the retry table
 * of {@code testdata/retry_table.json}, rules matched in order on the code and the ErrorInfo
 * reason. The unit tests check this copy against every rule and case of that file.
 */
final class RetryRules {
  /** The two actions of the table. */
  enum Action {
    /** Wait the backoff, ask GetUploadStatus, continue from the committed size. */
    RESUME,
    /** Final: surface the error. */
    FAIL
  }

  record Rule(String code, String reason, Action action) {
    boolean matches(Status.Code c, String r) {
      return (code.equals("*") || code.equals(c.name()))
          && (reason.equals("*") || reason.equals(r == null ? "" : r));
    }
  }

  static final List<Rule> RULES =
      List.of(
          new Rule("UNAVAILABLE", "*", Action.RESUME),
          new Rule("DEADLINE_EXCEEDED", "*", Action.RESUME),
          new Rule("INTERNAL", "*", Action.RESUME),
          new Rule("UNKNOWN", "*", Action.RESUME),
          new Rule("ABORTED", "ANOTHER_WRITER", Action.RESUME),
          new Rule("OUT_OF_RANGE", "OFFSET_MISMATCH", Action.RESUME),
          new Rule("DATA_LOSS", "CHUNK_CHECKSUM_MISMATCH", Action.RESUME),
          new Rule("RESOURCE_EXHAUSTED", "TENANT_LIMIT_EXCEEDED", Action.RESUME),
          new Rule("RESOURCE_EXHAUSTED", "RATE_LIMITED", Action.RESUME),
          new Rule("RESOURCE_EXHAUSTED", "SPOOL_EXHAUSTED", Action.RESUME),
          new Rule("*", "*", Action.FAIL));

  private RetryRules() {}

  static Action actionFor(Status.Code code, String reason) {
    for (Rule rule : RULES) {
      if (rule.matches(code, reason)) {
        return rule.action();
      }
    }
    return Action.FAIL;
  }

  static Action actionFor(RecgwException error) {
    if (error.isClientSide()) {
      return Action.FAIL;
    }
    return actionFor(error.code(), error.reason());
  }
}
