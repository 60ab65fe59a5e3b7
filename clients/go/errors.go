package recgw

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// ErrorDomain is the google.rpc.ErrorInfo domain of the gateway's errors.
const ErrorDomain = "recgw.v1"

// Reasons the client itself gives to errors it raises (the gateway's reasons are the names of
// recgw.v1.ErrorReason without the ERROR_REASON_ prefix, for example "OFFSET_MISMATCH").
const (
	// ReasonRetainLimit: the gateway made no byte durable while the retained buffer was full;
	// raise WithRetainLimit above the gateway's part size (plus the parts it writes at once).
	ReasonRetainLimit = "CLIENT_RETAIN_LIMIT"
	// ReasonSourceNotSeekable: an existing upload id was named with a source that cannot be
	// positioned at the committed size; pass an io.Seeker, or the bytes from the committed size
	// on with WithSourceOffset.
	ReasonSourceNotSeekable = "CLIENT_SOURCE_NOT_SEEKABLE"
	// ReasonResumeGap: the gateway's committed size is outside the bytes the client still holds,
	// so the upload cannot continue from it.
	ReasonResumeGap = "CLIENT_RESUME_GAP"
	// ReasonResultMismatch: the gateway's result does not describe the bytes the client sent
	// (size or checksums differ).
	ReasonResultMismatch = "CLIENT_RESULT_MISMATCH"
	// ReasonSourceFailed: reading the source failed; errors.Unwrap gives the reader's error.
	ReasonSourceFailed = "CLIENT_SOURCE_FAILED"
	// ReasonInvalidArgument: the call's arguments are invalid; the message says which.
	ReasonInvalidArgument = "CLIENT_INVALID_ARGUMENT"
)

// Error is a failed call: the gateway's status, or a failure the client detected itself.
//
// Decide on Code and Reason, never on Message (meant for people). Metadata holds the facts of the
// gateway's google.rpc.ErrorInfo, such as "committed_size". UploadID names the upload an upload
// error is about, so it can be inspected, resumed or aborted. status.Code(err) and
// status.FromError(err) work on an *Error (also wrapped); errors.Unwrap gives the cause of a
// client-side error (a context's error, the source's read error).
type Error struct {
	Code     codes.Code
	Message  string
	Reason   string
	Metadata map[string]string
	UploadID string
	// Streams is the number of Upload streams the upload opened (0 for other calls).
	Streams int

	status *status.Status
	cause  error
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("recgw: ")
	b.WriteString(e.Code.String())
	if e.Reason != "" {
		b.WriteString(" (" + e.Reason + ")")
	}
	if e.Message != "" {
		b.WriteString(": " + e.Message)
	}
	return b.String()
}

// Unwrap gives the cause of a client-side error, or nil.
func (e *Error) Unwrap() error { return e.cause }

// GRPCStatus makes status.Code and status.FromError work on an *Error.
func (e *Error) GRPCStatus() *status.Status {
	if e.status != nil {
		return e.status
	}
	return status.New(e.Code, e.Message)
}

func clientError(code codes.Code, reason, message string) *Error {
	return &Error{Code: code, Reason: reason, Message: message}
}

func invalidArgument(format string, args ...any) *Error {
	return clientError(codes.InvalidArgument, ReasonInvalidArgument, fmt.Sprintf(format, args...))
}

// redactor removes secrets the client knows (the bearer token, a secret access key) from
// messages, should a peer or a library ever echo one.
type redactor [][]byte

const redacted = "[REDACTED]"

// Shorter values could match ordinary words of a message.
const minRedactLength = 8

func (r redactor) clean(s string) string {
	for _, secret := range r {
		if len(secret) >= minRedactLength && strings.Contains(s, string(secret)) {
			s = string(bytes.ReplaceAll([]byte(s), secret, []byte(redacted)))
		}
	}
	return s
}

// toError turns what a gRPC call returned into an *Error (nil stays nil).
func toError(err error, r redactor) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		code := codes.Canceled
		if errors.Is(err, context.DeadlineExceeded) {
			code = codes.DeadlineExceeded
		}
		return &Error{Code: code, Message: r.clean(err.Error()), cause: err}
	}
	st, ok := status.FromError(err)
	if !ok {
		return &Error{Code: codes.Unknown, Message: r.clean(err.Error()), cause: err}
	}
	e = &Error{Code: st.Code(), Message: r.clean(st.Message())}
	for _, detail := range st.Details() {
		info, ok := detail.(*errdetails.ErrorInfo)
		if !ok || info.GetDomain() != ErrorDomain {
			continue
		}
		e.Reason = info.GetReason()
		if md := info.GetMetadata(); len(md) > 0 {
			e.Metadata = make(map[string]string, len(md))
			for k, v := range md {
				e.Metadata[k] = r.clean(v)
			}
		}
		e.UploadID = e.Metadata["upload_id"]
		break
	}
	clean := st.Proto()
	clean.Message = e.Message
	e.status = status.FromProto(clean)
	return e
}
