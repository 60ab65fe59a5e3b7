package recgw

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"

	recgwv1 "github.com/recgw/recgw/clients/go/gen/recgw/v1"
)

// fakeGateway is a small in-memory UploadService for the client's unit tests: it follows the
// protocol (offsets, whole-part commits, checksums, resuming, idempotent finish) and lets a test
// fail streams at chosen points. The end-to-end tests run against the real gateway.
type fakeGateway struct {
	recgwv1.UnimplementedUploadServiceServer

	partSize int64
	token    string
	listener *bufconn.Listener

	mu      sync.Mutex
	uploads map[string]*fakeUpload
	streams [][]*recgwv1.UploadRequest // every message of every stream, in order
	queries int
	// fault, if set, is asked (with mu held) before each message is applied; an error ends the
	// stream with it.
	fault func(stream int, msg *recgwv1.UploadRequest, u *fakeUpload) error
	// statusFault, if set, can fail GetUploadStatus.
	statusFault func(query int) error
	// loseResponse ends a stream that completed the upload with UNAVAILABLE instead of the result.
	loseResponse bool
	// unconfirmed completes uploads in state COMPLETION_UNCONFIRMED.
	unconfirmed bool
}

type fakeUpload struct {
	id        string
	start     *recgwv1.UploadStart
	data      []byte
	committed int64
	state     recgwv1.UploadState
	result    *recgwv1.UploadResponse
}

func newFakeGateway(t testing.TB, partSize int64) (*fakeGateway, *grpc.ClientConn) {
	t.Helper()
	g := &fakeGateway{partSize: partSize, token: "unit-test-token-0123456789", uploads: map[string]*fakeUpload{}}
	listener := bufconn.Listen(1 << 20)
	g.listener = listener
	server := grpc.NewServer()
	recgwv1.RegisterUploadServiceServer(server, g)
	go func() { _ = server.Serve(listener) }()
	conn, err := grpc.NewClient("passthrough:///fake",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return listener.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		server.Stop()
	})
	return g, conn
}

func statusError(code codes.Code, reason, message string, md map[string]string) error {
	st, err := status.New(code, message).WithDetails(&errdetails.ErrorInfo{Domain: ErrorDomain, Reason: reason, Metadata: md})
	if err != nil {
		panic(err)
	}
	return st.Err()
}

func (g *fakeGateway) authorized(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("authorization"); len(v) != 1 || v[0] != "Bearer "+g.token {
		return statusError(codes.Unauthenticated, "TOKEN_INVALID", "unknown bearer token", nil)
	}
	return nil
}

func (g *fakeGateway) upload(id string) *fakeUpload {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.uploads[id]
}

func (g *fakeGateway) streamMessages(i int) []*recgwv1.UploadRequest {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.streams[i]
}

func (g *fakeGateway) streamCount() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.streams)
}

func (g *fakeGateway) Upload(stream grpc.ClientStreamingServer[recgwv1.UploadRequest, recgwv1.UploadResponse]) error {
	if err := g.authorized(stream.Context()); err != nil {
		return err
	}
	g.mu.Lock()
	index := len(g.streams)
	g.streams = append(g.streams, nil)
	g.mu.Unlock()
	var u *fakeUpload
	defer func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		if u != nil && u.state == recgwv1.UploadState_UPLOAD_STATE_OPEN {
			u.data = u.data[:u.committed] // uncommitted bytes die with the stream
		}
	}()
	for first := true; ; first = false {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return statusError(codes.Aborted, "STREAM_ENDED_WITHOUT_FINISH", "the stream ended without finish_write", nil)
		}
		if err != nil {
			return err
		}
		g.mu.Lock()
		g.streams[index] = append(g.streams[index], proto.Clone(msg).(*recgwv1.UploadRequest))
		if first {
			id := msg.GetStart().GetUploadId()
			if u = g.uploads[id]; u == nil {
				u = &fakeUpload{id: id, start: msg.GetStart(), state: recgwv1.UploadState_UPLOAD_STATE_OPEN}
				g.uploads[id] = u
			}
		}
		var faulted error
		if g.fault != nil {
			faulted = g.fault(index, msg, u) // under the lock: it may read u
		}
		g.mu.Unlock()
		if first {
			if err := stream.SendHeader(metadata.Pairs(UploadIDHeader, u.id)); err != nil {
				return err
			}
		}
		if faulted != nil {
			return faulted
		}
		done, err := g.apply(u, msg)
		if err != nil || done == nil {
			if err != nil {
				return err
			}
			continue
		}
		if g.loseResponse {
			return status.Error(codes.Unavailable, "connection lost after the completion")
		}
		return stream.SendAndClose(done)
	}
}

// apply takes one message; it returns the response once the upload is complete.
func (g *fakeGateway) apply(u *fakeUpload, msg *recgwv1.UploadRequest) (*recgwv1.UploadResponse, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if u.state == recgwv1.UploadState_UPLOAD_STATE_COMPLETE || u.state == recgwv1.UploadState_UPLOAD_STATE_COMPLETION_UNCONFIRMED {
		if !msg.GetFinishWrite() || len(msg.GetData()) > 0 {
			return nil, statusError(codes.FailedPrecondition, "UPLOAD_COMPLETE", "complete", nil)
		}
		return u.result, nil
	}
	if u.state != recgwv1.UploadState_UPLOAD_STATE_OPEN {
		return nil, statusError(codes.FailedPrecondition, "UPLOAD_ENDED", "ended", nil)
	}
	received := int64(len(u.data))
	if msg.GetWriteOffset() != received {
		return nil, statusError(codes.OutOfRange, "OFFSET_MISMATCH", "wrong offset", map[string]string{
			"committed_size": strconv.FormatInt(u.committed, 10), "received_size": strconv.FormatInt(received, 10),
		})
	}
	if msg.DataCrc32C != nil && CRC32C(0, msg.GetData()) != msg.GetDataCrc32C() {
		return nil, statusError(codes.DataLoss, "CHUNK_CHECKSUM_MISMATCH", "bad chunk", nil)
	}
	u.data = append(u.data, msg.GetData()...)
	u.committed = int64(len(u.data)) / g.partSize * g.partSize
	if !msg.GetFinishWrite() {
		return nil, nil
	}
	crc := CRC32C(0, u.data)
	sha := sha256.Sum256(u.data)
	if sums := msg.GetObjectChecksums(); sums != nil && ((sums.Crc32C != nil && *sums.Crc32C != crc) ||
		(len(sums.GetSha256()) > 0 && !bytes.Equal(sums.GetSha256(), sha[:]))) {
		return nil, statusError(codes.DataLoss, "OBJECT_CHECKSUM_MISMATCH", "object checksums differ", nil)
	}
	u.committed = int64(len(u.data))
	u.state = recgwv1.UploadState_UPLOAD_STATE_COMPLETE
	if g.unconfirmed {
		u.state = recgwv1.UploadState_UPLOAD_STATE_COMPLETION_UNCONFIRMED
	}
	u.result = g.describe(u, u.data)
	u.result.Unconfirmed = g.unconfirmed
	return u.result, nil
}

func (g *fakeGateway) describe(u *fakeUpload, data []byte) *recgwv1.UploadResponse {
	crc := CRC32C(0, data)
	sha := sha256.Sum256(data)
	return &recgwv1.UploadResponse{
		UploadId: u.id, Bucket: "bucket", Key: "uploads/" + u.start.GetObjectName(), Size: int64(len(data)),
		Checksums: &recgwv1.ObjectChecksums{Crc32C: &crc, Sha256: sha[:]},
	}
}

func (g *fakeGateway) SalvageUpload(ctx context.Context, req *recgwv1.SalvageUploadRequest) (*recgwv1.SalvageUploadResponse, error) {
	if err := g.authorized(ctx); err != nil {
		return nil, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	u := g.uploads[req.GetUploadId()]
	if u == nil {
		return nil, statusError(codes.NotFound, "UPLOAD_NOT_FOUND", "no such upload", nil)
	}
	if u.state != recgwv1.UploadState_UPLOAD_STATE_OPEN {
		return nil, statusError(codes.FailedPrecondition, "UPLOAD_ENDED", "the upload has ended", nil)
	}
	u.state = recgwv1.UploadState_UPLOAD_STATE_SALVAGED
	u.result = g.describe(u, u.data[:u.committed])
	return &recgwv1.SalvageUploadResponse{State: u.state, Result: u.result}, nil
}

func (g *fakeGateway) GetUploadStatus(ctx context.Context, req *recgwv1.GetUploadStatusRequest) (*recgwv1.GetUploadStatusResponse, error) {
	if err := g.authorized(ctx); err != nil {
		return nil, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.queries++
	if g.statusFault != nil {
		if err := g.statusFault(g.queries); err != nil {
			return nil, err
		}
	}
	u := g.uploads[req.GetUploadId()]
	if u == nil {
		return nil, statusError(codes.NotFound, "UPLOAD_NOT_FOUND", "no such upload", nil)
	}
	return &recgwv1.GetUploadStatusResponse{
		UploadId: u.id, State: u.state, CommittedSize: u.committed, ReceivedSize: int64(len(u.data)), Result: u.result,
	}, nil
}

func (g *fakeGateway) AbortUpload(ctx context.Context, req *recgwv1.AbortUploadRequest) (*recgwv1.AbortUploadResponse, error) {
	if err := g.authorized(ctx); err != nil {
		return nil, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	u := g.uploads[req.GetUploadId()]
	if u == nil {
		return nil, statusError(codes.NotFound, "UPLOAD_NOT_FOUND", "no such upload", nil)
	}
	u.state = recgwv1.UploadState_UPLOAD_STATE_ABORTED
	return &recgwv1.AbortUploadResponse{State: u.state, StorageAborted: true}, nil
}
