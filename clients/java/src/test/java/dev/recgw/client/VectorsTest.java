package dev.recgw.client;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.protobuf.util.JsonFormat;
import dev.recgw.v1.UploadRequest;
import dev.recgw.v1.UploadStart;
import java.io.ByteArrayInputStream;
import java.util.HexFormat;
import java.util.List;
import java.util.zip.CRC32C;
import org.junit.jupiter.api.Test;

/** The client against testdata/vectors.json, shared by every client library. */
class VectorsTest {
  private static long crc(byte[] data) {
    CRC32C crc = new CRC32C();
    crc.update(data);
    return crc.getValue();
  }

  @Test
  void crc32cOfStandardPatterns() throws Exception {
    for (JsonElement e : Testdata.load("vectors.json").getAsJsonArray("crc32c")) {
      JsonObject v = e.getAsJsonObject();
      byte[] data = Testdata.materialize(v.getAsJsonObject("input"));
      assertEquals(v.get("crc32c").getAsLong(), crc(data), v.toString());
      assertEquals(v.get("crc32c").getAsLong(), Integer.toUnsignedLong(ObjectHasher.crc32c(data, 0, data.length)));
    }
  }

  @Test
  void crc32cContinuedAcrossBuffers() throws Exception {
    for (JsonElement e : Testdata.load("vectors.json").getAsJsonArray("crc32c_continued")) {
      JsonObject v = e.getAsJsonObject();
      byte[] first = Testdata.materialize(v.getAsJsonObject("first"));
      byte[] second = Testdata.materialize(v.getAsJsonObject("second"));
      ObjectHasher hasher = new ObjectHasher();
      hasher.update(first, 0, first.length);
      assertEquals(v.get("crc32c_first").getAsLong(), Integer.toUnsignedLong(hasher.crc32c()));
      hasher.update(second, 0, second.length);
      assertEquals(v.get("crc32c_both").getAsLong(), Integer.toUnsignedLong(hasher.crc32c()), v.toString());
    }
  }

  @Test
  void messagesEncodeToTheExactBytes() throws Exception {
    for (JsonElement e : Testdata.load("vectors.json").getAsJsonArray("messages")) {
      JsonObject v = e.getAsJsonObject();
      UploadRequest.Builder message = UploadRequest.newBuilder();
      JsonFormat.parser().merge(v.getAsJsonObject("fields").toString(), message);
      assertEquals(v.get("hex").getAsString(), HexFormat.of().formatHex(message.build().toByteArray()), v.get("name").getAsString());
    }
  }

  /** The messages the client really sends (through an in-process gateway) match each vector. */
  @Test
  void uploadsAreCutIntoTheVectorsMessages() throws Exception {
    try (FakeGateway gateway = new FakeGateway(); RecgwClient client = gateway.client()) {
      for (JsonElement e : Testdata.load("vectors.json").getAsJsonArray("chunking")) {
        JsonObject v = e.getAsJsonObject();
        byte[] data = Testdata.materialize(v.getAsJsonObject("input"));
        UploadOptions opts = UploadOptions.builder().chunkSize(v.get("chunk_size").getAsInt()).build();
        UploadStart start = UploadStart.newBuilder().setTenantId("acme").setObjectName("vector").build();
        int before = gateway.streams.size();
        UploadResult result = client.upload(new ByteArrayInputStream(data), start, opts);

        assertEquals(before + 1, gateway.streams.size(), "one stream");
        List<UploadRequest> sent = gateway.streams.get(before);
        List<JsonElement> expected = v.getAsJsonArray("messages").asList();
        assertEquals(expected.size(), sent.size(), "messages for " + data.length + " bytes");
        for (int i = 0; i < sent.size(); i++) {
          JsonObject want = expected.get(i).getAsJsonObject();
          UploadRequest got = sent.get(i);
          assertEquals(want.get("write_offset").getAsLong(), got.getWriteOffset());
          assertEquals(want.get("length").getAsInt(), got.getData().size());
          assertEquals(want.get("data_crc32c").getAsLong(), Integer.toUnsignedLong(got.getDataCrc32C()));
          assertEquals(i == 0, got.hasStart(), "start only on the first message");
          boolean last = i == sent.size() - 1;
          assertEquals(last, got.getFinishWrite(), "finish_write only on the last message");
          assertEquals(last, got.hasObjectChecksums());
        }
        UploadRequest last = sent.get(sent.size() - 1);
        assertEquals(v.get("object_crc32c").getAsLong(), Integer.toUnsignedLong(last.getObjectChecksums().getCrc32C()));
        assertEquals(v.get("object_sha256").getAsString(), HexFormat.of().formatHex(last.getObjectChecksums().getSha256().toByteArray()));
        assertEquals(data.length, result.size());
        assertEquals(v.get("object_sha256").getAsString(), result.sha256Hex());
        assertArrayEquals(data, gateway.uploads.get(result.uploadId()).bytes.toByteArray());
      }
    }
  }

  @Test
  void checksumsOffSendsNoneOfThem() throws Exception {
    try (FakeGateway gateway = new FakeGateway(); RecgwClient client = gateway.client()) {
      byte[] data = Testdata.ramp(200_000);
      UploadOptions opts = UploadOptions.builder().chunkSize(65536).checksums(false).build();
      client.upload(new ByteArrayInputStream(data), UploadStart.newBuilder().setTenantId("t").setObjectName("o").build(), opts);
      for (UploadRequest m : gateway.streams.get(0)) {
        assertFalse(m.hasDataCrc32C());
        assertFalse(m.hasObjectChecksums());
      }
      assertTrue(gateway.streams.get(0).get(3).getFinishWrite());
    }
  }
}
