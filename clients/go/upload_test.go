package recgw

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	recgwv1 "github.com/recgw/recgw/clients/go/gen/recgw/v1"
)

// Fast retries for the fake gateway.
var quick = WithBackoff(Backoff{Initial: time.Millisecond, Multiplier: 2, Max: 20 * time.Millisecond})

func mustUpload(t *testing.T, c *Client, r io.Reader, start Start, opts ...UploadOption) *Result {
	t.Helper()
	result, err := c.Upload(context.Background(), r, start, opts...)
	if err != nil {
		t.Fatalf("upload: %v", err)
	}
	return result
}

func asError(t *testing.T, err error) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not an *Error", err, err)
	}
	return e
}

func TestUploadResumesAfterAStreamFailsAndSendsTheRetainedBytesAgain(t *testing.T) {
	g, conn := newFakeGateway(t, 256<<10)
	data := ramp(3 * MiB)
	failed := false
	g.fault = func(stream int, msg *recgwv1.UploadRequest, u *fakeUpload) error {
		if !failed && msg.GetWriteOffset() == 1*MiB+128<<10 {
			failed = true
			return status.Error(codes.Unavailable, "connection reset")
		}
		return nil
	}
	var retries []codes.Code
	var ids []string
	result := mustUpload(t, NewClient(conn, g.token), bytes.NewReader(data), Start{Tenant: "acme", Object: "a.bin"},
		WithChunkSize(128<<10), quick,
		OnRetry(func(err *Error, stream int) { retries = append(retries, err.Code) }),
		OnUploadID(func(id string) { ids = append(ids, id) }))
	if result.Streams != 2 || len(retries) != 1 || retries[0] != codes.Unavailable {
		t.Fatalf("streams %d, retries %v", result.Streams, retries)
	}
	if !bytes.Equal(g.upload(result.UploadID).data, data) {
		t.Fatal("the gateway's bytes differ from the source")
	}
	second := g.streamMessages(1)
	if second[0].GetStart().GetUploadId() != result.UploadID || second[0].GetWriteOffset() != 1*MiB {
		t.Fatalf("the resumed stream starts with %v, want start of %s at the committed size", second[0], result.UploadID)
	}
	if len(second[1].GetData()) != 128<<10 || second[1].GetWriteOffset() != 1*MiB {
		t.Fatalf("the resumed stream does not resend the retained bytes from the committed size: %v", second[1].GetWriteOffset())
	}
	if len(ids) != 1 || ids[0] != result.UploadID {
		t.Fatalf("OnUploadID called with %v", ids)
	}
}

func TestAFinalErrorEndsTheUploadAtOnceWithItsReason(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	g.fault = func(int, *recgwv1.UploadRequest, *fakeUpload) error {
		return statusError(codes.PermissionDenied, "ACCESS_DENIED", "S3 denied UploadPart", map[string]string{"operation": "UploadPart"})
	}
	_, err := NewClient(conn, g.token).Upload(context.Background(), bytes.NewReader(ramp(10)),
		Start{Tenant: "acme", Object: "a.bin", UploadID: "11111111-2222-4333-8444-555555555555"}, quick)
	e := asError(t, err)
	if e.Code != codes.PermissionDenied || e.Reason != "ACCESS_DENIED" || e.Metadata["operation"] != "UploadPart" ||
		e.UploadID != "11111111-2222-4333-8444-555555555555" || e.Streams != 1 {
		t.Fatalf("error %+v", e)
	}
	if status.Code(err) != codes.PermissionDenied || status.Code(fmtWrap(err)) != codes.PermissionDenied {
		t.Fatalf("status.Code gives %s", status.Code(err))
	}
	if g.streamCount() != 1 {
		t.Fatalf("%d streams for a final error", g.streamCount())
	}
}

func fmtWrap(err error) error { return errors.Join(errors.New("context"), err) }

func TestRetriesStopAfterTheOutageToleranceWithoutProgress(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	g.fault = func(int, *recgwv1.UploadRequest, *fakeUpload) error {
		return statusError(codes.Unavailable, "STORAGE_UNAVAILABLE", "S3 unreachable", nil)
	}
	began := time.Now()
	_, err := NewClient(conn, g.token).Upload(context.Background(), bytes.NewReader(ramp(10)),
		Start{Tenant: "acme", Object: "a.bin"}, quick, WithOutageTolerance(300*time.Millisecond))
	e := asError(t, err)
	if e.Code != codes.Unavailable || e.Reason != "STORAGE_UNAVAILABLE" || !strings.Contains(e.Message, "without progress") {
		t.Fatalf("error %+v", e)
	}
	if took := time.Since(began); took < 300*time.Millisecond || took > 5*time.Second {
		t.Fatalf("gave up after %s", took)
	}
	if e.Streams < 3 {
		t.Fatalf("only %d streams in the tolerance", e.Streams)
	}
}

func TestProgressRestartsTheOutageClock(t *testing.T) {
	// Every stream commits one more part and then fails; each failure alone is within the
	// tolerance, all of them together are not.
	g, conn := newFakeGateway(t, 64<<10)
	seen := map[int]int{}
	g.fault = func(stream int, msg *recgwv1.UploadRequest, u *fakeUpload) error {
		seen[stream]++
		if stream < 6 && seen[stream] == 3 { // start, one part, then the cut
			time.Sleep(200 * time.Millisecond)
			return status.Error(codes.Unavailable, "cut")
		}
		return nil
	}
	data := ramp(1 * MiB)
	result := mustUpload(t, NewClient(conn, g.token), bytes.NewReader(data), Start{Tenant: "acme", Object: "p.bin"},
		WithChunkSize(64<<10), quick, WithOutageTolerance(800*time.Millisecond))
	if result.Streams != 7 || !bytes.Equal(g.upload(result.UploadID).data, data) {
		t.Fatalf("streams %d", result.Streams)
	}
}

func TestTheRetainedBufferIsTrimmedByStatusQueries(t *testing.T) {
	g, conn := newFakeGateway(t, 128<<10)
	data := ramp(8 * MiB)
	var progress [][2]int64
	result := mustUpload(t, NewClient(conn, g.token), bytes.NewReader(data), Start{Tenant: "acme", Object: "t.bin"},
		WithChunkSize(64<<10), WithRetainLimit(512<<10),
		OnProgress(func(committed, sent int64) { progress = append(progress, [2]int64{committed, sent}) }))
	if !bytes.Equal(g.upload(result.UploadID).data, data) || result.Streams != 1 {
		t.Fatal("upload differs")
	}
	if g.queries < 8 {
		t.Fatalf("%d status queries for 8 MiB through a 512 KiB buffer", g.queries)
	}
	for i := 1; i < len(progress); i++ {
		if progress[i][0] < progress[i-1][0] || progress[i][1] < progress[i-1][1] {
			t.Fatalf("progress went back: %v then %v", progress[i-1], progress[i])
		}
		if progress[i][1]-progress[i][0] > 512<<10+64<<10 {
			t.Fatalf("sent %d with only %d committed: more than the retain limit ahead", progress[i][1], progress[i][0])
		}
	}
	if last := progress[len(progress)-1]; last != [2]int64{8 * MiB, 8 * MiB} {
		t.Fatalf("last progress %v", last)
	}
}

func TestARetainLimitBelowThePartSizeFailsClearly(t *testing.T) {
	g, conn := newFakeGateway(t, 4*MiB)
	client := NewClient(conn, g.token)
	_, err := client.Upload(context.Background(), bytes.NewReader(ramp(2*MiB)), Start{Tenant: "acme", Object: "r.bin"},
		WithChunkSize(64<<10), WithRetainLimit(256<<10), func(c *uploadConfig) { c.stallTimeout = 200 * time.Millisecond })
	e := asError(t, err)
	if e.Code != codes.ResourceExhausted || e.Reason != ReasonRetainLimit || !strings.Contains(e.Message, "WithRetainLimit") {
		t.Fatalf("error %+v", e)
	}
}

// gatedReader yields data, pausing once at offset until released.
type gatedReader struct {
	data     []byte
	offset   int
	at       int
	paused   bool
	reached  chan struct{}
	release  chan struct{}
	failWith error
}

func newGatedReader(data []byte, at int) *gatedReader {
	return &gatedReader{data: data, at: at, reached: make(chan struct{}), release: make(chan struct{})}
}

func (r *gatedReader) Read(p []byte) (int, error) {
	if r.offset == r.at && !r.paused {
		r.paused = true
		close(r.reached)
		<-r.release
		if r.failWith != nil {
			return 0, r.failWith
		}
	}
	if r.offset >= len(r.data) {
		return 0, io.EOF
	}
	end := len(r.data)
	if r.offset < r.at {
		end = min(end, r.at)
	}
	n := copy(p, r.data[r.offset:end])
	r.offset += n
	return n, nil
}

func TestASilentSourceKeepsTheStreamAliveWithEmptyMessages(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	data := ramp(200 << 10)
	source := newGatedReader(data, 100<<10)
	go func() {
		<-source.reached
		time.Sleep(350 * time.Millisecond)
		close(source.release)
	}()
	result := mustUpload(t, NewClient(conn, g.token), source, Start{Tenant: "acme", Object: "h.bin"},
		WithChunkSize(100<<10), func(c *uploadConfig) { c.heartbeat = 50 * time.Millisecond })
	beats := 0
	for _, m := range g.streamMessages(0) {
		if m.GetStart() == nil && !m.GetFinishWrite() && len(m.GetData()) == 0 {
			beats++
			if m.GetWriteOffset() != 100<<10 {
				t.Fatalf("heartbeat at offset %d", m.GetWriteOffset())
			}
		}
	}
	if beats < 3 || !bytes.Equal(g.upload(result.UploadID).data, data) {
		t.Fatalf("%d heartbeats in 350 ms at a 50 ms interval", beats)
	}
}

func TestALostResponseAfterTheFinishIsAnsweredByTheStatus(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	g.loseResponse = true
	data := ramp(3000)
	result := mustUpload(t, NewClient(conn, g.token), bytes.NewReader(data), Start{Tenant: "acme", Object: "f.bin"}, quick)
	if result.Size != 3000 || result.Streams != 1 || result.Key != "uploads/f.bin" {
		t.Fatalf("result %+v", result)
	}
}

func TestChecksumMismatchOfTheResultIsDataLoss(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	g.fault = func(_ int, msg *recgwv1.UploadRequest, _ *fakeUpload) error {
		if len(msg.Data) > 0 {
			msg.Data = append([]byte{msg.Data[0] ^ 1}, msg.Data[1:]...)
			msg.DataCrc32C = nil // corrupted past the per-message check: only the object checksums see it
		}
		return nil
	}
	_, err := NewClient(conn, g.token).Upload(context.Background(), bytes.NewReader(ramp(1000)), Start{Tenant: "acme", Object: "c.bin"}, quick)
	if e := asError(t, err); e.Code != codes.DataLoss || e.Reason != "OBJECT_CHECKSUM_MISMATCH" {
		t.Fatalf("error %+v", e)
	}
}

func TestResumingAnExistingUploadIDFromASeekableSource(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	client := NewClient(conn, g.token)
	data := ramp(3*MiB + 17)
	const id = "0f0f0f0f-1111-4222-8333-444444444444"
	// A first attempt whose source fails after 1.5 MiB: 1 MiB is committed.
	failing := newGatedReader(data, 3*MiB/2)
	failing.failWith = errors.New("disk unplugged")
	close(failing.release)
	_, err := client.Upload(context.Background(), failing, Start{Tenant: "acme", Object: "s.bin", UploadID: id}, quick)
	if e := asError(t, err); e.Reason != ReasonSourceFailed || !errors.Is(err, failing.failWith) || e.UploadID != id {
		t.Fatalf("error %+v", e)
	}
	if u := g.upload(id); u.committed != MiB || len(u.data) != MiB {
		t.Fatalf("committed %d received %d", u.committed, len(u.data))
	}

	// A live (non-seekable) source cannot continue: the caller is told what to pass.
	_, err = client.Upload(context.Background(), io.MultiReader(bytes.NewReader(data)), Start{Tenant: "acme", Object: "s.bin", UploadID: id})
	if e := asError(t, err); e.Code != codes.FailedPrecondition || e.Reason != ReasonSourceNotSeekable ||
		!strings.Contains(e.Message, "WithSourceOffset(1048576)") {
		t.Fatalf("error %+v", e)
	}

	streams := g.streamCount()
	result := mustUpload(t, client, bytes.NewReader(data), Start{Tenant: "acme", Object: "s.bin", UploadID: id})
	first := g.streamMessages(streams)[0]
	if first.GetWriteOffset() != MiB || result.Streams != 1 {
		t.Fatalf("resumed at %d with %d streams", first.GetWriteOffset(), result.Streams)
	}
	if !bytes.Equal(g.upload(id).data, data) || result.Checksums.CRC32C == nil || *result.Checksums.CRC32C != CRC32C(0, data) {
		t.Fatal("resumed object differs")
	}

	// Resuming a complete upload returns its result without reading.
	again := mustUpload(t, client, failing, Start{Tenant: "acme", Object: "s.bin", UploadID: id})
	if again.Size != int64(len(data)) {
		t.Fatalf("result %+v", again)
	}
}

func TestResumingFromTheCommittedBytesOfANonSeekableSource(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	client := NewClient(conn, g.token)
	data := ramp(2*MiB + 5)
	const id = "0f0f0f0f-1111-4222-8333-555555555555"
	failing := newGatedReader(data, MiB+10)
	failing.failWith = errors.New("pipe closed")
	close(failing.release)
	if _, err := client.Upload(context.Background(), failing, Start{Tenant: "acme", Object: "n.bin", UploadID: id}); err == nil {
		t.Fatal("the failing source did not fail the upload")
	}
	// The source holds the bytes from 512 KiB on; the client skips to the committed 1 MiB.
	rest := io.MultiReader(bytes.NewReader(data[512<<10:]))
	mustUpload(t, client, rest, Start{Tenant: "acme", Object: "n.bin", UploadID: id}, WithSourceOffset(512<<10))
	if !bytes.Equal(g.upload(id).data, data) {
		t.Fatal("object differs")
	}
	last := g.streamMessages(g.streamCount() - 1)
	if sums := last[len(last)-1].GetObjectChecksums(); sums != nil {
		t.Fatalf("object checksums %v sent without having seen the first bytes", sums)
	}
}

func TestCancellingTheContextStopsTheUpload(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	source := newGatedReader(ramp(MiB), 1000)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-source.reached
		cancel()
	}()
	_, err := NewClient(conn, g.token).Upload(ctx, source, Start{Tenant: "acme", Object: "x.bin"})
	close(source.release)
	if e := asError(t, err); e.Code != codes.Canceled || !errors.Is(err, context.Canceled) || e.UploadID == "" {
		t.Fatalf("error %+v", e)
	}
}

func TestAnotherWriterIsRetried(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	var once sync.Once
	g.fault = func(int, *recgwv1.UploadRequest, *fakeUpload) error {
		var err error
		once.Do(func() { err = statusError(codes.Aborted, "ANOTHER_WRITER", "another stream is writing", nil) })
		return err
	}
	result := mustUpload(t, NewClient(conn, g.token), bytes.NewReader(ramp(10)), Start{Tenant: "acme", Object: "w.bin"}, quick)
	if result.Streams != 2 {
		t.Fatalf("streams %d", result.Streams)
	}
}

func TestTheTokenIsSentAndNeverShownInAnError(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	bad := "wrong-token-CANARY-4242"
	g.fault = nil
	_, err := NewClient(conn, bad).Status(context.Background(), "id")
	if e := asError(t, err); e.Code != codes.Unauthenticated || e.Reason != "TOKEN_INVALID" {
		t.Fatalf("error %+v", e)
	}
	// A peer that echoes the token gets it redacted.
	g.statusFault = func(int) error { return status.Error(codes.Internal, "saw Bearer "+g.token) }
	_, err = NewClient(conn, g.token).Status(context.Background(), "id")
	if strings.Contains(err.Error(), g.token) || !strings.Contains(err.Error(), redacted) {
		t.Fatalf("error %q", err)
	}
	if _, err := NewClient(conn, "two words").Status(context.Background(), "id"); asError(t, err).Code != codes.InvalidArgument ||
		strings.Contains(err.Error(), "two words") {
		t.Fatalf("error %v", err)
	}
}

func TestInvalidOptionsAreRefusedBeforeAnyCall(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	client := NewClient(conn, g.token)
	for _, opts := range [][]UploadOption{
		{WithChunkSize(MaxChunkSize + 1)},
		{WithChunkSize(0)},
		{WithRetainLimit(1000), WithChunkSize(2000)},
		{WithSourceOffset(5)},
	} {
		_, err := client.Upload(context.Background(), bytes.NewReader(nil), Start{Tenant: "acme", Object: "o"}, opts...)
		if e := asError(t, err); e.Code != codes.InvalidArgument {
			t.Fatalf("error %+v", e)
		}
	}
	if g.streamCount() != 0 {
		t.Fatal("an invalid upload opened a stream")
	}
}

func TestCredentialsNeverFormatTheirSecret(t *testing.T) {
	secret := []byte("SECRET-CANARY-wJalrXUtnFEMI")
	creds := Credentials{AccessKeyID: "AKIAEXAMPLEWXYZ", SecretAccessKey: secret, Target: StorageTarget{Bucket: "b"}}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x"} {
		out := fmt.Sprintf(verb, creds)
		if strings.Contains(out, string(secret)) || strings.Contains(out, "AKIAEXAMPLE") || !strings.Contains(out, "****WXYZ") {
			t.Fatalf("%s shows %q", verb, out)
		}
	}
}

func TestAnUnconfirmedCompletionIsDoneWithTheFlag(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	g.loseResponse, g.unconfirmed = true, true
	result := mustUpload(t, NewClient(conn, g.token), bytes.NewReader(ramp(5000)), Start{Tenant: "acme", Object: "u.bin"}, quick)
	if !result.Unconfirmed || result.Size != 5000 {
		t.Fatalf("result %+v", result)
	}
}

func TestSalvagedAndAbortedUploadsCannotBeResumed(t *testing.T) {
	g, conn := newFakeGateway(t, MiB)
	client := NewClient(conn, g.token)
	data := ramp(2*MiB + 100)
	for _, end := range []string{"salvage", "abort"} {
		id := NewUploadID()
		failing := newGatedReader(data, MiB+50)
		failing.failWith = errors.New("source gone")
		close(failing.release)
		if _, err := client.Upload(context.Background(), failing, Start{Tenant: "acme", Object: end, UploadID: id}); err == nil {
			t.Fatal("the failing source did not fail the upload")
		}
		if end == "salvage" {
			salvaged, err := client.Salvage(context.Background(), id)
			if err != nil || salvaged.State != StateSalvaged || salvaged.Result.Size != MiB {
				t.Fatalf("salvage %+v, %v", salvaged, err)
			}
			_, err = client.Salvage(context.Background(), id)
			if e := asError(t, err); e.Code != codes.FailedPrecondition || e.Reason != "UPLOAD_ENDED" || e.UploadID != id {
				t.Fatalf("second salvage: %+v", e)
			}
		} else if aborted, err := client.Abort(context.Background(), id); err != nil || aborted.State != StateAborted {
			t.Fatalf("abort %+v, %v", aborted, err)
		}
		_, err := client.Upload(context.Background(), bytes.NewReader(data), Start{Tenant: "acme", Object: end, UploadID: id})
		if e := asError(t, err); e.Code != codes.FailedPrecondition || e.Reason != "UPLOAD_ENDED" {
			t.Fatalf("resuming a %sd upload: %+v", end, e)
		}
	}
}

func TestAFailingStatusQueryOfAResumeIsRetried(t *testing.T) {
	g, conn := newFakeGateway(t, 64<<10)
	var once sync.Once
	g.fault = func(_ int, msg *recgwv1.UploadRequest, _ *fakeUpload) error {
		var err error
		if msg.GetWriteOffset() == 128<<10 {
			once.Do(func() { err = status.Error(codes.Unavailable, "cut") })
		}
		return err
	}
	g.statusFault = func(query int) error {
		if query <= 2 {
			return statusError(codes.Unavailable, "SHUTTING_DOWN", "restarting", nil)
		}
		return nil
	}
	data := ramp(300 << 10)
	result := mustUpload(t, NewClient(conn, g.token), bytes.NewReader(data), Start{Tenant: "acme", Object: "q.bin"},
		WithChunkSize(64<<10), quick)
	if result.Streams != 2 || g.queries != 3 || !bytes.Equal(g.upload(result.UploadID).data, data) {
		t.Fatalf("streams %d, queries %d", result.Streams, g.queries)
	}
	second := g.streamMessages(1)
	if second[0].GetWriteOffset() != 128<<10 {
		t.Fatalf("resumed at %d", second[0].GetWriteOffset())
	}
}

// sendFailure fails the client's Send of the data message at offset once, as a connection that
// died while the client was handing over its last chunk.
type sendFailure struct {
	grpc.ClientStream
	cancel context.CancelFunc
	offset int64
	once   *sync.Once
}

func (s *sendFailure) SendMsg(m any) error {
	if msg, ok := m.(*recgwv1.UploadRequest); ok && len(msg.GetData()) > 0 && msg.GetWriteOffset() == s.offset {
		failed := false
		s.once.Do(func() { failed = true })
		if failed {
			s.cancel()
			return status.Error(codes.Unavailable, "injected: the connection died during Send")
		}
	}
	return s.ClientStream.SendMsg(m)
}

func TestASendFailureOnTheLastChunkStillFinishesTheUpload(t *testing.T) {
	g, _ := newFakeGateway(t, 64<<10)
	var once sync.Once
	conn, err := grpc.NewClient("passthrough:///fake",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return g.listener.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string,
			streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			ctx, cancel := context.WithCancel(ctx)
			cs, err := streamer(ctx, desc, cc, method, opts...)
			if err != nil {
				cancel()
				return nil, err
			}
			return &sendFailure{ClientStream: cs, cancel: cancel, offset: 192 << 10, once: &once}, nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	data := ramp(200 << 10) // the last chunk (8 KiB at 192 KiB) comes with the end of the source
	result, err := NewClient(conn, g.token).Upload(ctx, bytes.NewReader(data), Start{Tenant: "acme", Object: "l.bin"},
		WithChunkSize(64<<10), quick)
	if err != nil {
		t.Fatal(err)
	}
	if result.Streams != 2 || !bytes.Equal(g.upload(result.UploadID).data, data) {
		t.Fatalf("streams %d", result.Streams)
	}
}
