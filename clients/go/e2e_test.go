package recgw_test

// End-to-end tests against a live stack: a real gateway (`recgw serve`), OpenBao, moto with IAM
// enforced, behind a loopback proxy the tests can cut. Run them from the repository root with
//
//	.venv/bin/python -m tests.e2e_stack -- go -C clients/go test -run E2E ./...
//
// They skip when RECGW_E2E_ADDRESS is unset (see tests/e2e_stack.py for the environment).

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	recgw "github.com/recgw/recgw/clients/go"
	recgwv1 "github.com/recgw/recgw/clients/go/gen/recgw/v1"
)

const mib = 1 << 20

type stack struct {
	address, control, tenant, bucket string
	uploaderToken, adminToken        string
}

// The control API's cut and restart disrupt every stream through the stack, so a disruptive
// test runs alone; the others run in parallel.
var disruption sync.RWMutex

func liveStack(t *testing.T, disruptive bool) stack {
	t.Helper()
	address := os.Getenv("RECGW_E2E_ADDRESS")
	if address == "" {
		t.Skip("RECGW_E2E_ADDRESS is unset: run through `python -m tests.e2e_stack`")
	}
	t.Parallel()
	if disruptive {
		disruption.Lock()
		t.Cleanup(disruption.Unlock)
	} else {
		disruption.RLock()
		t.Cleanup(disruption.RUnlock)
	}
	return stack{
		address:       address,
		control:       os.Getenv("RECGW_E2E_CONTROL"),
		tenant:        os.Getenv("RECGW_E2E_TENANT"),
		bucket:        os.Getenv("RECGW_E2E_BUCKET"),
		uploaderToken: os.Getenv("RECGW_E2E_UPLOADER_TOKEN"),
		adminToken:    os.Getenv("RECGW_E2E_ADMIN_TOKEN"),
	}
}

// post calls the control API; on failure it marks the test failed and returns nil (it may run
// in a goroutine of the test, where t.Fatal must not be called).
func (s stack) post(t *testing.T, path string) []byte {
	t.Helper()
	resp, err := http.Post(s.control+path, "application/json", nil)
	if err != nil {
		t.Error(err)
		return nil
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("POST %s: %d %v", path, resp.StatusCode, err)
		return nil
	}
	return body
}

// object is the stored object (read with root credentials), or nil when there is none.
func (s stack) object(t *testing.T, bucket, key string) []byte {
	t.Helper()
	resp, err := http.Get(s.control + "/object?" + url.Values{"bucket": {bucket}, "key": {key}}.Encode())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode == http.StatusNotFound {
		return nil
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /object: %d", resp.StatusCode)
	}
	return body
}

func (s stack) logs(t *testing.T) string {
	t.Helper()
	resp, err := http.Get(s.control + "/logs")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

func (s stack) dial(t *testing.T, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	conn, err := recgw.Dial(s.address, recgw.WithPlaintext(), recgw.WithDialOptions(opts...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func (s stack) client(t *testing.T, opts ...grpc.DialOption) *recgw.Client {
	return recgw.NewClient(s.dial(t, opts...), s.uploaderToken)
}

func (s stack) start(t *testing.T) recgw.Start {
	name := strings.ReplaceAll(t.Name(), "/", "-")
	return recgw.Start{Tenant: s.tenant, Object: fmt.Sprintf("go-e2e/%s-%d.bin", name, rand.Int64()), ContentType: "video/webm"}
}

func randomBytes(n int) []byte {
	data := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(n), byte(n >> 8), byte(n >> 16)})
	_, _ = r.Read(data)
	return data
}

// assertStored checks the result and the object in the bucket against data.
func (s stack) assertStored(t *testing.T, result *recgw.Result, data []byte) {
	t.Helper()
	sum := sha256.Sum256(data)
	if result.Size != int64(len(data)) || !bytes.Equal(result.Checksums.SHA256, sum[:]) || result.Bucket != s.bucket {
		t.Fatalf("result %+v does not describe the %d bytes sent", result, len(data))
	}
	if stored := s.object(t, result.Bucket, result.Key); !bytes.Equal(stored, data) {
		t.Fatalf("the object holds %d bytes that differ from the %d sent", len(stored), len(data))
	}
}

func asError(t *testing.T, err error) *recgw.Error {
	t.Helper()
	var e *recgw.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not a *recgw.Error", err, err)
	}
	return e
}

// gatedReader yields data, pausing once at offset until released.
type gatedReader struct {
	data    []byte
	offset  int
	at      int
	paused  bool
	reached chan struct{}
	release chan struct{}
	fail    error
}

func newGatedReader(data []byte, at int) *gatedReader {
	return &gatedReader{data: data, at: at, reached: make(chan struct{}), release: make(chan struct{})}
}

func (r *gatedReader) Read(p []byte) (int, error) {
	if r.offset == r.at && !r.paused {
		r.paused = true
		close(r.reached)
		<-r.release
		if r.fail != nil {
			return 0, r.fail
		}
	}
	if r.offset >= len(r.data) {
		return 0, io.EOF
	}
	end := len(r.data)
	if r.offset < r.at {
		end = r.at
	}
	n := copy(p, r.data[r.offset:end])
	r.offset += n
	return n, nil
}

// tamper changes the UploadRequests of the Upload streams it is given, for faults a real
// network rarely produces on demand (the gateway sees exactly what a faulty client would send).
func tamper(change func(stream int, msg *recgwv1.UploadRequest) *recgwv1.UploadRequest) grpc.DialOption {
	var streams atomic.Int32
	return grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
		method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		cs, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return &tamperedStream{ClientStream: cs, stream: int(streams.Add(1)) - 1, change: change}, nil
	})
}

type tamperedStream struct {
	grpc.ClientStream
	stream int
	change func(int, *recgwv1.UploadRequest) *recgwv1.UploadRequest
}

func (s *tamperedStream) SendMsg(m any) error {
	if msg, ok := m.(*recgwv1.UploadRequest); ok {
		// A copy: the client's retained bytes must stay intact.
		m = s.change(s.stream, proto.Clone(msg).(*recgwv1.UploadRequest))
	}
	return s.ClientStream.SendMsg(m)
}

func TestE2ESmallAndMultipartUploadsAreByteExact(t *testing.T) {
	s := liveStack(t, false)
	client := s.client(t)
	for _, size := range []int{1000, 12 * mib} {
		data := randomBytes(size)
		var announced string
		start := s.start(t)
		start.Metadata = map[string]string{"room": "blue"}
		result, err := client.Upload(context.Background(), bytes.NewReader(data), start,
			recgw.OnUploadID(func(id string) { announced = id }))
		if err != nil {
			t.Fatalf("%d bytes: %v", size, err)
		}
		s.assertStored(t, result, data)
		if announced == "" || announced != result.UploadID || result.Streams != 1 {
			t.Fatalf("upload id %q announced, result %+v", announced, result)
		}
		if size > 5*mib && result.PartCount != 3 {
			t.Fatalf("%d bytes in %d parts, want 3 parts of 5 MiB", size, result.PartCount)
		}
		st, err := client.Status(context.Background(), result.UploadID)
		if err != nil || st.State != recgw.StateComplete || st.CommittedSize != int64(size) {
			t.Fatalf("status %+v, %v", st, err)
		}
	}
}

// resumeAcross pauses a 12 MiB upload at 7 MiB, once the gateway has committed its first 5 MiB
// part, runs disrupt, and checks that the upload finished byte-exact on a new stream that
// continued from the committed size.
func resumeAcross(t *testing.T, s stack, disrupt func()) {
	data := randomBytes(12*mib + 3)
	source := newGatedReader(data, 7*mib)
	var mu sync.Mutex
	var retried []string
	var startOffsets []int64
	client := s.client(t, tamper(func(_ int, msg *recgwv1.UploadRequest) *recgwv1.UploadRequest {
		if msg.GetStart() != nil {
			mu.Lock()
			startOffsets = append(startOffsets, msg.GetWriteOffset())
			mu.Unlock()
		}
		return msg
	}))
	start := s.start(t)
	start.UploadID = recgw.NewUploadID()
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(source.release)
		<-source.reached
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if st, err := client.Status(context.Background(), start.UploadID); err == nil && st.CommittedSize >= 5*mib {
				disrupt()
				return
			}
		}
		t.Error("the gateway did not commit the first part")
	}()
	result, err := client.Upload(context.Background(), source, start,
		recgw.OnRetry(func(err *recgw.Error, _ int) {
			mu.Lock()
			retried = append(retried, err.Code.String())
			mu.Unlock()
		}))
	<-done
	if err != nil {
		t.Fatal(err)
	}
	s.assertStored(t, result, data)
	mu.Lock()
	defer mu.Unlock()
	if result.Streams < 2 || len(retried) == 0 || len(startOffsets) < 2 || startOffsets[len(startOffsets)-1] < 5*mib {
		t.Fatalf("streams %d, retries %v, start offsets %v: the upload did not resume from the committed size",
			result.Streams, retried, startOffsets)
	}
}

func TestE2EACutConnectionIsResumedAutomatically(t *testing.T) {
	s := liveStack(t, true)
	resumeAcross(t, s, func() { s.post(t, "/cut") })
}

func TestE2EAnUploadSurvivesAGatewayRestart(t *testing.T) {
	s := liveStack(t, true)
	resumeAcross(t, s, func() { s.post(t, "/gateway/restart") })
}

func TestE2EAWrongOffsetIsAnsweredByAStatusQueryAndACorrectResume(t *testing.T) {
	s := liveStack(t, false)
	client := s.client(t, tamper(func(stream int, msg *recgwv1.UploadRequest) *recgwv1.UploadRequest {
		if stream == 0 && msg.GetWriteOffset() == 2*mib {
			msg.WriteOffset++ // a client that lost count
		}
		return msg
	}))
	data := randomBytes(6*mib + 11)
	var reasons []string
	result, err := client.Upload(context.Background(), bytes.NewReader(data), s.start(t),
		recgw.OnRetry(func(err *recgw.Error, _ int) { reasons = append(reasons, err.Code.String()+"/"+err.Reason) }))
	if err != nil {
		t.Fatal(err)
	}
	s.assertStored(t, result, data)
	if result.Streams != 2 || len(reasons) != 1 || reasons[0] != "OutOfRange/OFFSET_MISMATCH" {
		t.Fatalf("streams %d, retries %v", result.Streams, reasons)
	}
}

func TestE2EACorruptedChunkIsSentAgain(t *testing.T) {
	s := liveStack(t, false)
	client := s.client(t, tamper(func(stream int, msg *recgwv1.UploadRequest) *recgwv1.UploadRequest {
		if stream == 0 && msg.GetWriteOffset() == mib && len(msg.Data) > 0 {
			msg.Data[10] ^= 0xff // corrupted in transit; data_crc32c still describes the original
		}
		return msg
	}))
	data := randomBytes(3 * mib)
	var reasons []string
	result, err := client.Upload(context.Background(), bytes.NewReader(data), s.start(t),
		recgw.OnRetry(func(err *recgw.Error, _ int) { reasons = append(reasons, err.Reason) }))
	if err != nil {
		t.Fatal(err)
	}
	s.assertStored(t, result, data)
	if len(reasons) != 1 || reasons[0] != "CHUNK_CHECKSUM_MISMATCH" {
		t.Fatalf("retries %v", reasons)
	}
}

func TestE2EAnObjectChecksumMismatchIsDataLossAndNoObject(t *testing.T) {
	s := liveStack(t, false)
	client := s.client(t, tamper(func(_ int, msg *recgwv1.UploadRequest) *recgwv1.UploadRequest {
		if msg.GetWriteOffset() == 0 && len(msg.Data) > 0 {
			msg.Data[0] ^= 0xff // changed before the per-message checksum: only the object's sees it
			crc := recgw.CRC32C(0, msg.Data)
			msg.DataCrc32C = &crc
		}
		return msg
	}))
	start := s.start(t)
	_, err := client.Upload(context.Background(), bytes.NewReader(randomBytes(100_000)), start)
	e := asError(t, err)
	if e.Code != codes.DataLoss || e.Reason != "OBJECT_CHECKSUM_MISMATCH" || status.Code(err) != codes.DataLoss {
		t.Fatalf("error %+v", e)
	}
	if s.object(t, s.bucket, "uploads/"+start.Object) != nil {
		t.Fatal("an object with the wrong bytes became visible")
	}
}

// endless yields random bytes until the upload stops reading.
type endless struct{ r *rand.ChaCha8 }

func (e endless) Read(p []byte) (int, error) { return e.r.Read(p) }

func TestE2EAbortWhileDataFlows(t *testing.T) {
	s := liveStack(t, false)
	client := s.client(t)
	start := s.start(t)
	var once sync.Once
	aborted := make(chan error, 1)
	var uploadID string
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := client.Upload(ctx, endless{rand.NewChaCha8([32]byte{7})}, start,
		recgw.OnUploadID(func(id string) { uploadID = id }),
		recgw.OnProgress(func(_, sent int64) {
			if sent >= 3*mib && uploadID != "" {
				once.Do(func() {
					go func() {
						_, err := client.Abort(context.Background(), uploadID)
						aborted <- err
					}()
				})
			}
		}))
	if abortErr := <-aborted; abortErr != nil {
		t.Fatalf("abort: %v", abortErr)
	}
	e := asError(t, err)
	if !(e.Code == codes.Aborted && e.Reason == "UPLOAD_ABORTED") && !(e.Code == codes.FailedPrecondition && e.Reason == "UPLOAD_ENDED") {
		t.Fatalf("error %+v", e)
	}
	if e.UploadID != uploadID {
		t.Fatalf("error names upload %q, not %q", e.UploadID, uploadID)
	}
	st, err := client.Status(context.Background(), uploadID)
	if err != nil || st.State != recgw.StateAborted {
		t.Fatalf("status %+v, %v", st, err)
	}
	if s.object(t, s.bucket, "uploads/"+start.Object) != nil {
		t.Fatal("an aborted upload became visible")
	}
}

func TestE2EABadTokenIsUnauthenticated(t *testing.T) {
	s := liveStack(t, false)
	token := "bad-CANARY-" + fmt.Sprint(rand.Int64())
	_, err := recgw.NewClient(s.dial(t), token).Upload(context.Background(), bytes.NewReader([]byte("x")), s.start(t))
	e := asError(t, err)
	if e.Code != codes.Unauthenticated || e.Reason != "TOKEN_INVALID" || e.Streams != 1 {
		t.Fatalf("error %+v", e)
	}
	if strings.Contains(err.Error(), token) || strings.Contains(s.logs(t), token) {
		t.Fatal("the token shows in the error or the gateway's log")
	}
}

func TestE2EATenantWithoutCredentialsIsAFailedPrecondition(t *testing.T) {
	s := liveStack(t, false)
	start := s.start(t)
	start.Tenant = fmt.Sprintf("nocreds-%d", rand.Uint32())
	_, err := s.client(t).Upload(context.Background(), bytes.NewReader([]byte("x")), start)
	if e := asError(t, err); e.Code != codes.FailedPrecondition || e.Reason != "CREDENTIALS_NOT_FOUND" {
		t.Fatalf("error %+v", e)
	}
}

func TestE2EResumingAnExistingUploadIDContinuesFromTheCommittedSize(t *testing.T) {
	s := liveStack(t, false)
	var firstOffsets []int64
	var mu sync.Mutex
	client := s.client(t, tamper(func(_ int, msg *recgwv1.UploadRequest) *recgwv1.UploadRequest {
		if msg.GetStart() != nil {
			mu.Lock()
			firstOffsets = append(firstOffsets, msg.GetWriteOffset())
			mu.Unlock()
		}
		return msg
	}))
	data := randomBytes(8*mib + 5)
	start := s.start(t)
	start.UploadID = recgw.NewUploadID()
	// The first attempt's source fails after 6 MiB: the gateway keeps its first 5 MiB part.
	failing := newGatedReader(data, 6*mib)
	failing.fail = errors.New("recorder crashed")
	close(failing.release)
	_, err := client.Upload(context.Background(), failing, start)
	if e := asError(t, err); e.Reason != recgw.ReasonSourceFailed || !errors.Is(err, failing.fail) {
		t.Fatalf("error %+v", e)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := client.Status(context.Background(), start.UploadID)
		if err == nil && st.State == recgw.StateOpen && st.CommittedSize == 5*mib && st.ReceivedSize == st.CommittedSize {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the first part was not committed: %+v, %v", st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, err = client.Upload(context.Background(), io.MultiReader(bytes.NewReader(data)), start)
	if e := asError(t, err); e.Reason != recgw.ReasonSourceNotSeekable {
		t.Fatalf("error %+v", e)
	}
	result, err := client.Upload(context.Background(), bytes.NewReader(data), start)
	if err != nil {
		t.Fatal(err)
	}
	s.assertStored(t, result, data)
	if result.Streams != 1 || firstOffsets[len(firstOffsets)-1] != 5*mib {
		t.Fatalf("streams %d, start offsets %v", result.Streams, firstOffsets)
	}
}

func TestE2ECredentialsAdminNeverShowsTheSecret(t *testing.T) {
	s := liveStack(t, false)
	var keys struct {
		Bucket, Region  string
		AccessKeyID     string `json:"access_key_id"`
		SecretAccessKey string `json:"secret_access_key"`
		EndpointURL     string `json:"endpoint_url"`
	}
	body := s.post(t, "/tenant")
	if body == nil {
		t.FailNow()
	}
	if err := json.Unmarshal(body, &keys); err != nil {
		t.Fatal(err)
	}
	conn := s.dial(t)
	admin := recgw.NewCredentialsAdmin(conn, s.adminToken)
	ctx := context.Background()
	tenant := fmt.Sprintf("go-admin-%d", rand.Uint32())
	secret := []byte(keys.SecretAccessKey)
	creds := recgw.Credentials{AccessKeyID: keys.AccessKeyID, SecretAccessKey: secret, Target: recgw.StorageTarget{
		Region: keys.Region, Bucket: keys.Bucket, EndpointURL: keys.EndpointURL, ForcePathStyle: true,
	}}
	var seen []string
	view, err := admin.Set(ctx, tenant, creds)
	if err != nil {
		t.Fatal(err)
	}
	if view.TenantID != tenant || view.Version < 1 || view.AccessKeyIDHint != "****"+keys.AccessKeyID[len(keys.AccessKeyID)-4:] ||
		view.Target.Bucket != keys.Bucket || view.UpdateTime.IsZero() {
		t.Fatalf("view %+v", view)
	}
	described, err := admin.Describe(ctx, tenant)
	if err != nil || described.Version != view.Version {
		t.Fatalf("describe %+v, %v", described, err)
	}
	verified, err := admin.Verify(ctx, tenant)
	if err != nil || !verified.OK || verified.Key == "" {
		t.Fatalf("verify %+v, %v", verified, err)
	}
	// The uploader's token may not manage credentials.
	_, err = recgw.NewCredentialsAdmin(conn, s.uploaderToken).Set(ctx, tenant, creds)
	if e := asError(t, err); e.Code != codes.PermissionDenied || e.Reason != "ROLE_NOT_ALLOWED" {
		t.Fatalf("error %+v", e)
	}
	seen = append(seen, err.Error(), fmt.Sprintf("%+v", creds))
	// A wrong secret is stored but fails verification, with no secret in the answer.
	wrong := []byte("WRONG-SECRET-CANARY-" + fmt.Sprint(rand.Int64()))
	if _, err := admin.Set(ctx, tenant, recgw.Credentials{AccessKeyID: keys.AccessKeyID, SecretAccessKey: wrong, Target: creds.Target}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(15 * time.Second); ; { // the gateway caches credentials for 1 s
		verified, err = admin.Verify(ctx, tenant)
		if err != nil {
			t.Fatal(err)
		}
		if !verified.OK && verified.ErrorCode != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("verify with a wrong secret: %+v", verified)
		}
		time.Sleep(100 * time.Millisecond)
	}
	seen = append(seen, fmt.Sprintf("%+v", verified))
	if err := admin.Delete(ctx, tenant); err != nil {
		t.Fatal(err)
	}
	_, err = admin.Describe(ctx, tenant)
	if e := asError(t, err); e.Code != codes.NotFound || e.Reason != "CREDENTIALS_NOT_FOUND" {
		t.Fatalf("error %+v", e)
	}
	seen = append(seen, err.Error(), s.logs(t))
	for _, text := range seen {
		if strings.Contains(text, keys.SecretAccessKey) || strings.Contains(text, string(wrong)) {
			t.Fatalf("a secret shows in %q", text)
		}
	}
	clear(secret) // the caller can wipe its copy
	clear(wrong)
}
