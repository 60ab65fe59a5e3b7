package dev.recgw.client;

import java.util.List;

/** Removes secrets (the bearer token, a credentials secret) from text before it is shown. */
final class Redactor {
  static final String REDACTED = "[REDACTED]";
  // Shorter values could match ordinary words of a message.
  private static final int MIN_LENGTH = 8;

  private final List<char[]> secrets;

  private Redactor(List<char[]> secrets) {
    this.secrets = secrets;
  }

  static Redactor of(String... secrets) {
    return new Redactor(
        java.util.Arrays.stream(secrets)
            .filter(s -> s != null && s.length() >= MIN_LENGTH)
            .map(String::toCharArray)
            .toList());
  }

  /** This redactor plus one more secret, held by reference (the caller may wipe it later). */
  Redactor with(char[] secret) {
    if (secret == null || secret.length < MIN_LENGTH) {
      return this;
    }
    java.util.ArrayList<char[]> all = new java.util.ArrayList<>(secrets);
    all.add(secret);
    return new Redactor(List.copyOf(all));
  }

  String redact(String text) {
    if (text == null || text.isEmpty()) {
      return text == null ? "" : text;
    }
    String out = text;
    for (char[] secret : secrets) {
      out = replaceAll(out, secret);
    }
    return out;
  }

  // Searches for the secret without turning it into a String, which could not be wiped.
  private static String replaceAll(String text, char[] secret) {
    StringBuilder out = null;
    int from = 0;
    int i = 0;
    while (i <= text.length() - secret.length) {
      if (matchesAt(text, i, secret)) {
        if (out == null) {
          out = new StringBuilder(text.length());
        }
        out.append(text, from, i).append(REDACTED);
        i += secret.length;
        from = i;
      } else {
        i++;
      }
    }
    if (out == null) {
      return text;
    }
    return out.append(text, from, text.length()).toString();
  }

  private static boolean matchesAt(String text, int at, char[] secret) {
    for (int j = 0; j < secret.length; j++) {
      if (text.charAt(at + j) != secret[j]) {
        return false;
      }
    }
    return true;
  }
}
