package dev.recgw.client;

import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.zip.CRC32C;

/** CRC32C and SHA-256 of a whole object, fed each byte once, in order. */
final class ObjectHasher {
  private final CRC32C crc = new CRC32C();
  private final MessageDigest sha256;
  private byte[] digest;

  ObjectHasher() {
    try {
      sha256 = MessageDigest.getInstance("SHA-256");
    } catch (NoSuchAlgorithmException e) {
      throw new IllegalStateException("every Java runtime has SHA-256", e);
    }
  }

  void update(byte[] data, int offset, int length) {
    crc.update(data, offset, length);
    sha256.update(data, offset, length);
  }

  /** The CRC32C so far, as the unsigned value in an int (protobuf's fixed32). */
  int crc32c() {
    return (int) crc.getValue();
  }

  /** The SHA-256 of everything fed; call once, at the end. */
  byte[] sha256() {
    if (digest == null) {
      digest = sha256.digest();
    }
    return digest.clone();
  }

  static int crc32c(byte[] data, int offset, int length) {
    CRC32C crc = new CRC32C();
    crc.update(data, offset, length);
    return (int) crc.getValue();
  }
}
