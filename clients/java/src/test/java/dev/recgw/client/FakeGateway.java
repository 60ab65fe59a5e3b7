package dev.recgw.client;

import com.google.protobuf.Any;
import com.google.protobuf.ByteString;
import com.google.rpc.ErrorInfo;
import dev.recgw.v1.AbortUploadRequest;
import dev.recgw.v1.AbortUploadResponse;
import dev.recgw.v1.GetUploadStatusRequest;
import dev.recgw.v1.GetUploadStatusResponse;
import dev.recgw.v1.ObjectChecksums;
import dev.recgw.v1.SalvageUploadRequest;
import dev.recgw.v1.SalvageUploadResponse;
import dev.recgw.v1.UploadRequest;
import dev.recgw.v1.UploadResponse;
import dev.recgw.v1.UploadServiceGrpc;
import dev.recgw.v1.UploadState;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.Server;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.ServerInterceptors;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.inprocess.InProcessChannelBuilder;
import io.grpc.inprocess.InProcessServerBuilder;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.StreamObserver;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.zip.CRC32C;

/**
 * An in-process stand-in for the gateway, for unit tests of the client's own logic (framing,
 * resume decisions, memory): it keeps each upload's bytes, "commits" them a part at a time,
 * checks offsets and CRCs like the gateway, and fails streams where a test's {@link Fault} says.
 * The real gateway is exercised by the end-to-end tests.
 */
final class FakeGateway implements AutoCloseable {
  /** Decides, for each message a stream delivers, whether the stream fails there. */
  interface Fault {
    /** Null to accept the message, else the error the stream ends with. */
    StatusRuntimeException at(int stream, UploadRequest message, Upload upload);
  }

  static final String TOKEN = "unit-CANARY-TOKEN-0123456789";

  /** One upload's state. */
  static final class Upload {
    final String id;
    final ByteArrayOutputStream bytes = new ByteArrayOutputStream();
    // Volatile: tests poll these from their own thread while the stream's thread changes them.
    volatile long committed;
    UploadState state = UploadState.UPLOAD_STATE_OPEN;
    UploadResponse result;
    volatile Object writer;

    Upload(String id) {
      this.id = id;
    }

    long received() {
      return bytes.size();
    }

    void dropUncommitted() {
      byte[] all = bytes.toByteArray();
      bytes.reset();
      bytes.write(all, 0, (int) committed);
    }
  }

  final Map<String, Upload> uploads = new ConcurrentHashMap<>();
  /** Every message of every stream, in order, per stream. */
  final List<List<UploadRequest>> streams = new CopyOnWriteArrayList<>();
  final List<String> statusQueries = new CopyOnWriteArrayList<>();
  final List<String> authorizations = new CopyOnWriteArrayList<>();
  volatile long partSize = 64 * 1024;
  volatile Fault fault = (s, m, u) -> null;
  /** When false, parts are never committed (a gateway waiting for a bigger part). */
  volatile boolean committing = true;
  /** When true, a completed upload's response is replaced by UNAVAILABLE (a lost answer). */
  volatile boolean loseFinishResponse;
  /** Errors GetUploadStatus answers with before it answers normally. */
  final List<StatusRuntimeException> statusFailures = new CopyOnWriteArrayList<>();

  private final Server server;
  private final ManagedChannel channel;

  FakeGateway() throws IOException {
    String name = InProcessServerBuilder.generateName();
    ServerInterceptor recordAuth =
        new ServerInterceptor() {
          @Override
          public <Q, R> ServerCall.Listener<Q> interceptCall(
              ServerCall<Q, R> call, Metadata headers, ServerCallHandler<Q, R> next) {
            authorizations.add(
                String.valueOf(headers.get(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER))));
            return next.startCall(call, headers);
          }
        };
    server =
        InProcessServerBuilder.forName(name)
            .addService(ServerInterceptors.intercept(new Service(), recordAuth))
            .build()
            .start();
    channel = InProcessChannelBuilder.forName(name).build();
  }

  RecgwClient client() {
    return RecgwClient.builder().channel(channel).token(TOKEN).build();
  }

  static StatusRuntimeException error(Status.Code code, String reason, String message, Map<String, String> meta) {
    com.google.rpc.Status status =
        com.google.rpc.Status.newBuilder()
            .setCode(code.value())
            .setMessage(message)
            .addDetails(
                Any.pack(
                    ErrorInfo.newBuilder().setDomain("recgw.v1").setReason(reason).putAllMetadata(meta).build()))
            .build();
    return StatusProto.toStatusRuntimeException(status);
  }

  @Override
  public void close() {
    channel.shutdownNow();
    server.shutdownNow();
  }

  private final class Service extends UploadServiceGrpc.UploadServiceImplBase {
    @Override
    public StreamObserver<UploadRequest> upload(StreamObserver<UploadResponse> responses) {
      int number = streams.size() + 1;
      List<UploadRequest> seen = new CopyOnWriteArrayList<>();
      streams.add(seen);
      return new StreamObserver<>() {
        Upload upload;
        boolean over;

        @Override
        public void onNext(UploadRequest message) {
          if (over) {
            return;
          }
          seen.add(message);
          StatusRuntimeException problem;
          synchronized (FakeGateway.this) {
            problem = accept(message);
          }
          if (problem != null) {
            end(problem);
          }
        }

        private StatusRuntimeException accept(UploadRequest message) {
          if (upload == null) {
            if (!message.hasStart()) {
              return error(Status.Code.INVALID_ARGUMENT, "STREAM_OUT_OF_ORDER", "send start first", Map.of());
            }
            String id = message.getStart().getUploadId();
            upload = uploads.computeIfAbsent(id, Upload::new);
            if (upload.state == UploadState.UPLOAD_STATE_COMPLETE && message.getFinishWrite()) {
              responses.onNext(upload.result);
              responses.onCompleted();
              over = true;
              return null;
            }
            if (upload.state != UploadState.UPLOAD_STATE_OPEN) {
              return error(Status.Code.FAILED_PRECONDITION, "UPLOAD_ENDED", "upload ended", Map.of());
            }
            if (upload.writer != null) {
              return error(Status.Code.ABORTED, "ANOTHER_WRITER", "another stream is writing", Map.of());
            }
            upload.writer = this;
          }
          if (message.getWriteOffset() != upload.received()) {
            return error(
                Status.Code.OUT_OF_RANGE,
                "OFFSET_MISMATCH",
                "write_offset " + message.getWriteOffset() + " but the upload is at " + upload.committed,
                Map.of("committed_size", Long.toString(upload.committed)));
          }
          if (message.hasDataCrc32C() && message.getDataCrc32C() != crc(message.getData())) {
            return error(Status.Code.DATA_LOSS, "CHUNK_CHECKSUM_MISMATCH", "data_crc32c differs", Map.of());
          }
          StatusRuntimeException injected = fault.at(number, message, upload);
          if (injected != null) {
            return injected;
          }
          upload.bytes.writeBytes(message.getData().toByteArray());
          if (committing) {
            upload.committed = upload.received() / partSize * partSize;
          }
          if (message.getFinishWrite()) {
            byte[] all = upload.bytes.toByteArray();
            ByteString sha = ByteString.copyFrom(sha256(all));
            int crc = crc(ByteString.copyFrom(all));
            if (message.hasObjectChecksums()
                && (message.getObjectChecksums().getCrc32C() != crc || !message.getObjectChecksums().getSha256().equals(sha))) {
              return error(Status.Code.DATA_LOSS, "OBJECT_CHECKSUM_MISMATCH", "object checksums differ", Map.of());
            }
            upload.committed = all.length;
            upload.state = UploadState.UPLOAD_STATE_COMPLETE;
            upload.writer = null;
            upload.result =
                UploadResponse.newBuilder()
                    .setUploadId(upload.id)
                    .setBucket("bucket")
                    .setKey("uploads/" + upload.id)
                    .setSize(all.length)
                    .setEtag("etag")
                    .setChecksums(ObjectChecksums.newBuilder().setCrc32C(crc).setSha256(sha))
                    .build();
            if (loseFinishResponse) {
              over = true;
              responses.onError(Status.UNAVAILABLE.withDescription("connection lost").asRuntimeException());
              return null;
            }
            responses.onNext(upload.result);
            responses.onCompleted();
            over = true;
          }
          return null;
        }

        private void end(StatusRuntimeException problem) {
          synchronized (FakeGateway.this) {
            release();
          }
          over = true;
          responses.onError(problem);
        }

        private void release() {
          if (upload != null && upload.writer == this) {
            upload.writer = null;
            upload.dropUncommitted();
          }
        }

        @Override
        public void onError(Throwable t) {
          synchronized (FakeGateway.this) {
            release();
          }
        }

        @Override
        public void onCompleted() {
          if (!over) {
            end(error(Status.Code.ABORTED, "STREAM_ENDED_WITHOUT_FINISH", "no finish_write", Map.of()));
          }
        }
      };
    }

    @Override
    public void getUploadStatus(GetUploadStatusRequest request, StreamObserver<GetUploadStatusResponse> out) {
      statusQueries.add(request.getUploadId());
      if (!statusFailures.isEmpty()) {
        out.onError(statusFailures.remove(0));
        return;
      }
      Upload upload = uploads.get(request.getUploadId());
      if (upload == null) {
        out.onError(error(Status.Code.NOT_FOUND, "UPLOAD_NOT_FOUND", "no such upload", Map.of()));
        return;
      }
      GetUploadStatusResponse.Builder status;
      synchronized (FakeGateway.this) {
        status =
            GetUploadStatusResponse.newBuilder()
                .setUploadId(upload.id)
                .setState(upload.state)
                .setCommittedSize(upload.committed)
                .setReceivedSize(upload.received());
        if (upload.result != null) {
          status.setResult(upload.result);
        }
      }
      out.onNext(status.build());
      out.onCompleted();
    }

    @Override
    public void salvageUpload(SalvageUploadRequest request, StreamObserver<SalvageUploadResponse> out) {
      Upload upload = uploads.get(request.getUploadId());
      if (upload == null) {
        out.onError(error(Status.Code.NOT_FOUND, "UPLOAD_NOT_FOUND", "no such upload", Map.of()));
        return;
      }
      synchronized (FakeGateway.this) {
        if (upload.state != UploadState.UPLOAD_STATE_OPEN) {
          out.onError(error(Status.Code.FAILED_PRECONDITION, "UPLOAD_ENDED", "upload ended", Map.of()));
          return;
        }
        upload.state = UploadState.UPLOAD_STATE_SALVAGED;
        upload.dropUncommitted();
      }
      byte[] kept = upload.bytes.toByteArray();
      out.onNext(SalvageUploadResponse.newBuilder()
          .setState(UploadState.UPLOAD_STATE_SALVAGED)
          .setResult(UploadResponse.newBuilder().setUploadId(upload.id).setBucket("bucket")
              .setKey("uploads/" + upload.id + ".partial").setSize(kept.length)
              .setChecksums(ObjectChecksums.newBuilder().setCrc32C(crc(ByteString.copyFrom(kept)))
                  .setSha256(ByteString.copyFrom(sha256(kept)))))
          .build());
      out.onCompleted();
    }

    @Override
    public void abortUpload(AbortUploadRequest request, StreamObserver<AbortUploadResponse> out) {
      Upload upload = uploads.get(request.getUploadId());
      if (upload != null) {
        synchronized (FakeGateway.this) {
          upload.state = UploadState.UPLOAD_STATE_ABORTED;
        }
      }
      out.onNext(AbortUploadResponse.newBuilder().setState(UploadState.UPLOAD_STATE_ABORTED).setStorageAborted(true).build());
      out.onCompleted();
    }
  }

  static int crc(ByteString data) {
    CRC32C crc = new CRC32C();
    crc.update(data.asReadOnlyByteBuffer());
    return (int) crc.getValue();
  }

  static byte[] sha256(byte[] data) {
    try {
      return MessageDigest.getInstance("SHA-256").digest(data);
    } catch (java.security.NoSuchAlgorithmException e) {
      throw new IllegalStateException(e);
    }
  }

  /** The bytes of all data messages of one stream, for checks on what was re-sent. */
  static List<Long> offsets(List<UploadRequest> stream) {
    List<Long> out = new ArrayList<>();
    for (UploadRequest m : stream) {
      out.add(m.getWriteOffset());
    }
    return out;
  }
}
