package recgw

import (
	"context"
	"crypto/rand"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/timestamppb"

	recgwv1 "github.com/recgw/recgw/clients/go/gen/recgw/v1"
)

// UploadIDHeader is the response header that carries the upload id.
const UploadIDHeader = "x-recgw-upload-id"

// DefaultCallTimeout bounds the unary calls the upload makes by itself (status queries).
const DefaultCallTimeout = 30 * time.Second

// Client calls the gateway's UploadService with an uploader's bearer token. It is safe for
// concurrent use; one Client may run many uploads at once.
type Client struct {
	rpc     recgwv1.UploadServiceClient
	auth    bearer
	secrets redactor
}

// NewClient makes a Client on conn (from Dial, or any gRPC connection) that sends token as
// `authorization: Bearer <token>` on every call. The token never appears in an error.
func NewClient(conn grpc.ClientConnInterface, token string) *Client {
	return &Client{
		rpc:     recgwv1.NewUploadServiceClient(conn),
		auth:    newBearer(token),
		secrets: redactor{[]byte(token)},
	}
}

// bearer is the authorization metadata of a token, checked once.
type bearer struct {
	value string
	err   *Error
}

func newBearer(token string) bearer {
	if token == "" {
		return bearer{err: invalidArgument("the bearer token is empty")}
	}
	for i := 0; i < len(token); i++ {
		if token[i] < 0x21 || token[i] > 0x7e {
			return bearer{err: invalidArgument("the bearer token must be printable ASCII without spaces")}
		}
	}
	return bearer{value: "Bearer " + token}
}

func (b bearer) context(ctx context.Context) (context.Context, error) {
	if b.err != nil {
		return nil, b.err
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", b.value), nil
}

// NewUploadID returns a new random upload id (a UUID version 4, canonical lower case).
func NewUploadID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// State is the life-cycle state of an upload.
type State int32

const (
	StateUnspecified           State = State(recgwv1.UploadState_UPLOAD_STATE_UNSPECIFIED)
	StateOpen                  State = State(recgwv1.UploadState_UPLOAD_STATE_OPEN)
	StateFinishing             State = State(recgwv1.UploadState_UPLOAD_STATE_FINISHING)
	StateComplete              State = State(recgwv1.UploadState_UPLOAD_STATE_COMPLETE)
	StateAborted               State = State(recgwv1.UploadState_UPLOAD_STATE_ABORTED)
	StateExpired               State = State(recgwv1.UploadState_UPLOAD_STATE_EXPIRED)
	StateCompletionUnconfirmed State = State(recgwv1.UploadState_UPLOAD_STATE_COMPLETION_UNCONFIRMED)
	StateSalvaged              State = State(recgwv1.UploadState_UPLOAD_STATE_SALVAGED)
)

func (s State) String() string {
	switch s {
	case StateOpen:
		return "open"
	case StateFinishing:
		return "finishing"
	case StateComplete:
		return "complete"
	case StateAborted:
		return "aborted"
	case StateExpired:
		return "expired"
	case StateCompletionUnconfirmed:
		return "completion unconfirmed"
	case StateSalvaged:
		return "salvaged"
	}
	return "unspecified"
}

// ended reports whether the upload can no longer be written (and has no object of this upload).
func (s State) ended() bool {
	return s == StateAborted || s == StateExpired || s == StateSalvaged
}

// Checksums are checksums of a whole object; a nil CRC32C or SHA256 was not given.
type Checksums struct {
	CRC32C *uint32
	SHA256 []byte
}

// Result describes a finished object.
type Result struct {
	UploadID  string
	Bucket    string
	Key       string
	Size      int64
	ETag      string
	VersionID string
	// PartCount is 0 when the object was written with a single PutObject.
	PartCount int32
	// Checksums the gateway computed over the bytes it received (Upload checks they match).
	Checksums Checksums
	// Unconfirmed: S3's answer to the completion was lost and could not be confirmed without a
	// metadata read; the object is very likely complete (see recgw.v1.UploadResponse.unconfirmed).
	Unconfirmed bool
	// Streams is the number of Upload streams the upload needed (1 without interruptions).
	Streams int
}

// UploadStatus is what GetUploadStatus reports about an upload.
type UploadStatus struct {
	UploadID      string
	State         State
	CommittedSize int64
	ReceivedSize  int64
	TenantID      string
	Key           string
	// Result is the finished (or salvaged) object, else nil.
	Result       *Result
	ErrorMessage string
	CreateTime   time.Time
	UpdateTime   time.Time
}

// AbortResult tells what AbortUpload did.
type AbortResult struct {
	State State
	// StorageAborted: S3 confirmed the multipart upload was aborted (or none existed).
	StorageAborted bool
	// Detail explains what is left in S3, if anything.
	Detail string
}

// SalvageResult describes the object SalvageUpload made from the committed bytes.
type SalvageResult struct {
	State  State
	Result *Result
}

func checksumsFromProto(m *recgwv1.ObjectChecksums) Checksums {
	var c Checksums
	if m == nil {
		return c
	}
	if m.Crc32C != nil {
		crc := *m.Crc32C
		c.CRC32C = &crc
	}
	if len(m.GetSha256()) > 0 {
		c.SHA256 = m.GetSha256()
	}
	return c
}

func resultFromProto(m *recgwv1.UploadResponse) *Result {
	if m == nil {
		return nil
	}
	return &Result{
		UploadID:    m.GetUploadId(),
		Bucket:      m.GetBucket(),
		Key:         m.GetKey(),
		Size:        m.GetSize(),
		ETag:        m.GetEtag(),
		VersionID:   m.GetVersionId(),
		PartCount:   m.GetPartCount(),
		Checksums:   checksumsFromProto(m.GetChecksums()),
		Unconfirmed: m.GetUnconfirmed(),
	}
}

func timeFromProto(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

func statusFromProto(m *recgwv1.GetUploadStatusResponse) *UploadStatus {
	return &UploadStatus{
		UploadID:      m.GetUploadId(),
		State:         State(m.GetState()),
		CommittedSize: m.GetCommittedSize(),
		ReceivedSize:  m.GetReceivedSize(),
		TenantID:      m.GetTenantId(),
		Key:           m.GetKey(),
		Result:        resultFromProto(m.GetResult()),
		ErrorMessage:  m.GetErrorMessage(),
		CreateTime:    timeFromProto(m.GetCreateTime()),
		UpdateTime:    timeFromProto(m.GetUpdateTime()),
	}
}

func (c *Client) fail(err error, uploadID string) *Error {
	e := toError(err, c.secrets)
	if e.UploadID == "" {
		e.UploadID = uploadID
	}
	return e
}

// Status reports the state and committed size of an upload.
func (c *Client) Status(ctx context.Context, uploadID string) (*UploadStatus, error) {
	ctx, err := c.auth.context(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := c.rpc.GetUploadStatus(ctx, &recgwv1.GetUploadStatusRequest{UploadId: uploadID})
	if err != nil {
		return nil, c.fail(err, uploadID)
	}
	return statusFromProto(resp), nil
}

// Abort cancels an upload; nothing of it becomes visible. An Upload still writing it fails with
// codes.Aborted (reason UPLOAD_ABORTED).
func (c *Client) Abort(ctx context.Context, uploadID string) (*AbortResult, error) {
	ctx, err := c.auth.context(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := c.rpc.AbortUpload(ctx, &recgwv1.AbortUploadRequest{UploadId: uploadID})
	if err != nil {
		return nil, c.fail(err, uploadID)
	}
	return &AbortResult{
		State:          State(resp.GetState()),
		StorageAborted: resp.GetStorageAborted(),
		Detail:         resp.GetDetail(),
	}, nil
}

// Salvage keeps what an open upload has committed as an object (marked as salvaged) and ends
// the upload in state StateSalvaged. It fails with codes.FailedPrecondition (UPLOAD_ENDED) when
// the upload has already ended.
func (c *Client) Salvage(ctx context.Context, uploadID string) (*SalvageResult, error) {
	ctx, err := c.auth.context(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := c.rpc.SalvageUpload(ctx, &recgwv1.SalvageUploadRequest{UploadId: uploadID})
	if err != nil {
		return nil, c.fail(err, uploadID)
	}
	return &SalvageResult{State: State(resp.GetState()), Result: resultFromProto(resp.GetResult())}, nil
}

// isNotFound reports an upload the gateway does not know.
func isNotFound(e *Error) bool { return e.Code == codes.NotFound }
