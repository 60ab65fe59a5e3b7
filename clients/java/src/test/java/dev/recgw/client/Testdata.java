package dev.recgw.client;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

/** The shared, language-neutral files under testdata/ at the repository root. */
final class Testdata {
  private Testdata() {}

  static Path dir() {
    String configured = System.getProperty("recgw.testdata");
    return configured != null ? Path.of(configured) : Path.of("../../testdata");
  }

  static JsonObject load(String name) throws IOException {
    return JsonParser.parseString(Files.readString(dir().resolve(name))).getAsJsonObject();
  }

  /** The bytes a pattern of generate.py describes (ascii, fill, ramp). */
  static byte[] materialize(JsonObject spec) {
    String pattern = spec.get("pattern").getAsString();
    switch (pattern) {
      case "ascii":
        return spec.get("text").getAsString().getBytes(StandardCharsets.UTF_8);
      case "fill": {
        byte[] out = new byte[spec.get("length").getAsInt()];
        java.util.Arrays.fill(out, (byte) spec.get("byte").getAsInt());
        return out;
      }
      case "ramp":
        return ramp(spec.get("length").getAsInt());
      default:
        throw new IllegalArgumentException(pattern);
    }
  }

  /** Byte i is (i * 7 + 3) % 251. */
  static byte[] ramp(int length) {
    byte[] out = new byte[length];
    for (int i = 0; i < length; i++) {
      out[i] = (byte) ((i * 7L + 3) % 251);
    }
    return out;
  }
}
