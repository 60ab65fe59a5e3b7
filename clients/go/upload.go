package recgw

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	recgwv1 "github.com/recgw/recgw/clients/go/gen/recgw/v1"
)

const (
	MiB = 1 << 20
	// DefaultChunkSize is the data per message.
	DefaultChunkSize = 1 * MiB
	// MaxChunkSize is the most data per message the gateway accepts.
	MaxChunkSize = 4 * MiB
	// DefaultRetainLimit bounds the bytes an upload keeps to send again. The gateway commits
	// whole parts (8 MiB by default, a few written at once), so its committed size lags the
	// bytes sent by up to about 40 MiB.
	DefaultRetainLimit = 64 * MiB
)

// How long a silent source may keep the stream without a message: the gateway lets a new stream
// take over one that delivered nothing for 5 s.
const defaultHeartbeat = 2 * time.Second

// Polling GetUploadStatus while the retained buffer is full.
const (
	pollInitial = 50 * time.Millisecond
	pollMax     = time.Second
	// The gateway holds every byte sent and commits none for this long while the buffer is full:
	// it waits for a part larger than the retain limit.
	defaultStallTimeout = 30 * time.Second
)

// Start describes the object an upload writes.
type Start struct {
	// Tenant whose credentials and bucket receive the object.
	Tenant string
	// Object is the name relative to the tenant's prefix, for example "2026/11/28/call-42.webm".
	Object string
	// ContentType is the MIME type stored with the object, e.g. "video/webm" (empty: the store's
	// default).
	ContentType string
	// Metadata is stored as x-amz-meta-* headers.
	Metadata map[string]string
	// ExpectedSize is the total size when known in advance (the gateway then refuses more or
	// fewer bytes); 0 means unknown.
	ExpectedSize int64
	// UploadID names the upload; empty chooses a new one (NewUploadID). Naming an existing
	// upload resumes it: see Client.Upload.
	UploadID string
}

// UploadOption configures one Upload.
type UploadOption func(*uploadConfig)

type uploadConfig struct {
	chunkSize       int
	retainLimit     int64
	outageTolerance time.Duration
	backoff         Backoff
	checksums       bool
	sourceOffset    int64
	onUploadID      func(string)
	onProgress      func(committed, sent int64)
	onRetry         func(err *Error, attempt int)
	callTimeout     time.Duration
	heartbeat       time.Duration
	stallTimeout    time.Duration
}

// WithChunkSize sets the data per message (default 1 MiB, at most 4 MiB).
func WithChunkSize(n int) UploadOption { return func(c *uploadConfig) { c.chunkSize = n } }

// WithRetainLimit bounds the bytes kept to send again after a failure (default 64 MiB). It must
// exceed the gateway's part size plus the parts it writes at once; reading the source pauses
// while it is reached.
func WithRetainLimit(n int64) UploadOption { return func(c *uploadConfig) { c.retainLimit = n } }

// WithOutageTolerance sets how long the upload keeps retrying while no byte is newly committed
// (default 5 minutes); the clock restarts whenever the committed size grows.
func WithOutageTolerance(d time.Duration) UploadOption {
	return func(c *uploadConfig) { c.outageTolerance = d }
}

// WithBackoff sets the wait between retries (default DefaultBackoff).
func WithBackoff(b Backoff) UploadOption { return func(c *uploadConfig) { c.backoff = b } }

// WithoutChecksums turns off the per-message CRC32C and the whole-object CRC32C and SHA-256.
func WithoutChecksums() UploadOption { return func(c *uploadConfig) { c.checksums = false } }

// WithSourceOffset says the source starts at byte n of the object: for resuming an existing
// upload (Start.UploadID) from a source that cannot seek, with the bytes from the committed size
// (or earlier) on. The whole-object checksums are then not sent, since the client never saw the
// first n bytes; per-message CRC32C still is.
func WithSourceOffset(n int64) UploadOption { return func(c *uploadConfig) { c.sourceOffset = n } }

// OnUploadID calls f once with the upload id, as soon as the gateway accepted the start message.
func OnUploadID(f func(uploadID string)) UploadOption {
	return func(c *uploadConfig) { c.onUploadID = f }
}

// OnProgress calls f with the bytes the gateway has committed (durably written) and the bytes
// sent at least once, after every message and every status query; both only grow.
func OnProgress(f func(committed, sent int64)) UploadOption {
	return func(c *uploadConfig) { c.onProgress = f }
}

// OnRetry calls f before each resumed stream with the error that ended the previous one and the
// number of the stream about to open (2 or more).
func OnRetry(f func(err *Error, stream int)) UploadOption {
	return func(c *uploadConfig) { c.onRetry = f }
}

// WithCallTimeout bounds each status query the upload makes (default 30 s).
func WithCallTimeout(d time.Duration) UploadOption {
	return func(c *uploadConfig) { c.callTimeout = d }
}

// Upload streams r into the tenant's bucket as start.Object and returns the finished object.
//
// r is read exactly once, in chunks of the chunk size, by a goroutine of the upload; if Upload
// returns early, a Read in progress ends in the background (close the source to end it). Bytes
// the gateway has not yet committed are kept (at most the retain limit; reading pauses while it is
// reached, plus one chunk read ahead) and sent again on a new stream when a stream fails with a
// retryable status (testdata/retry_table.json), after a backoff and a GetUploadStatus, for as long
// as the outage tolerance allows without progress. A source that stays silent is kept alive with
// empty messages every 2 s. Send blocks while gRPC's flow control is full, so a slow gateway slows
// the reading.
//
// Resuming an existing upload: with start.UploadID naming an open upload, Upload asks
// GetUploadStatus first and continues from the committed size. r must then be an io.Seeker
// positioned at byte 0 of the object (with checksums on, the committed bytes are read again to
// hash them; otherwise r seeks past them), or be the bytes from WithSourceOffset on. A complete
// upload returns its result without reading r.
//
// Errors are *Error: the gateway's status, or the client's own (ReasonSourceFailed wraps a
// read error, a cancelled ctx gives codes.Canceled wrapping ctx.Err()). The upload id is in
// Error.UploadID so the upload can be resumed or aborted later.
func (c *Client) Upload(ctx context.Context, r io.Reader, start Start, opts ...UploadOption) (*Result, error) {
	cfg := uploadConfig{
		chunkSize:       DefaultChunkSize,
		retainLimit:     DefaultRetainLimit,
		outageTolerance: DefaultOutageTolerance,
		backoff:         DefaultBackoff,
		checksums:       true,
		callTimeout:     DefaultCallTimeout,
		heartbeat:       defaultHeartbeat,
		stallTimeout:    defaultStallTimeout,
	}
	for _, opt := range opts {
		opt(&cfg)
	}
	if err := cfg.check(start); err != nil {
		return nil, err
	}
	if _, err := c.auth.context(ctx); err != nil {
		return nil, err
	}
	u := newUploadRun(c, cfg, start)
	defer close(u.done)
	result, err := u.run(ctx, r)
	if err != nil {
		e := u.wrap(err)
		e.Streams = u.streams
		return nil, e
	}
	result.Streams = u.streams
	return result, nil
}

func (cfg *uploadConfig) check(start Start) error {
	switch {
	case cfg.chunkSize <= 0 || cfg.chunkSize > MaxChunkSize:
		return invalidArgument("the chunk size must be between 1 and %d bytes", MaxChunkSize)
	case cfg.retainLimit < int64(cfg.chunkSize):
		return invalidArgument("the retain limit must be at least the chunk size")
	case start.ExpectedSize < 0:
		return invalidArgument("ExpectedSize must not be negative")
	case cfg.sourceOffset < 0:
		return invalidArgument("the source offset must not be negative")
	case cfg.sourceOffset > 0 && start.UploadID == "":
		return invalidArgument("WithSourceOffset resumes an existing upload: set Start.UploadID")
	case cfg.outageTolerance < 0:
		return invalidArgument("the outage tolerance must not be negative")
	}
	return nil
}

type uploadRun struct {
	c        *Client
	cfg      uploadConfig
	start    *recgwv1.UploadStart
	uploadID string
	resuming bool // the caller named the upload id: it may exist already

	retained retainedBuffer
	digest   *objectDigest // nil without whole-object checksums
	source   *sourceFeed
	eof      bool // the source is exhausted; retained.end is the object's size

	position   int64 // where the current stream has got to; trimming never passes it
	sent       int64 // the most bytes sent at least once
	committed  int64 // the largest committed size the gateway reported
	progressAt time.Time
	retries    int // retries in a row without progress
	finishSent bool
	streams    int
	announced  bool

	polling     bool
	polledAt    int64 // retained.end when the last trim query started
	pollResults chan *UploadStatus
	done        chan struct{}
}

func newUploadRun(c *Client, cfg uploadConfig, start Start) *uploadRun {
	id := start.UploadID
	if id == "" {
		id = NewUploadID()
	}
	msg := &recgwv1.UploadStart{
		TenantId:    start.Tenant,
		ObjectName:  start.Object,
		ContentType: start.ContentType,
		Metadata:    start.Metadata,
		UploadId:    id,
		// The gateway computes the SHA-256 the client verifies only when asked.
		ComputeSha256: cfg.checksums,
	}
	if start.ExpectedSize > 0 {
		size := start.ExpectedSize
		msg.ExpectedSize = &size
	}
	u := &uploadRun{
		c:           c,
		cfg:         cfg,
		start:       msg,
		uploadID:    id,
		resuming:    start.UploadID != "",
		progressAt:  time.Now(),
		pollResults: make(chan *UploadStatus, 1),
		done:        make(chan struct{}),
	}
	if cfg.checksums && cfg.sourceOffset == 0 {
		u.digest = newObjectDigest()
	}
	return u
}

// wrap makes any error of the upload an *Error that names the upload.
func (u *uploadRun) wrap(err error) *Error {
	e := toError(err, u.c.secrets)
	if e.UploadID == "" {
		e.UploadID = u.uploadID
	}
	return e
}

func (u *uploadRun) fail(code codes.Code, reason, format string, args ...any) *Error {
	e := clientError(code, reason, fmt.Sprintf(format, args...))
	e.UploadID = u.uploadID
	return e
}

// --- progress ---------------------------------------------------------------------------------

func (u *uploadRun) reportProgress() {
	if u.cfg.onProgress != nil {
		u.cfg.onProgress(u.committed, u.sent)
	}
}

func (u *uploadRun) advance(offset int64) {
	u.position = offset
	if offset > u.sent {
		u.sent = offset
	}
	u.reportProgress()
}

// noteCommitted records a committed size the gateway reported; growth restarts the outage clock
// and the backoff.
func (u *uploadRun) noteCommitted(size int64) {
	if size <= u.committed {
		return
	}
	u.committed = size
	u.progressAt = time.Now()
	u.retries = 0
	u.reportProgress()
}

func (u *uploadRun) announce(md map[string][]string) {
	if u.announced {
		return
	}
	values := md[UploadIDHeader]
	if len(values) == 0 {
		return
	}
	u.announced = true
	if id := values[0]; id != u.uploadID {
		// The gateway's word decides which upload to resume.
		u.uploadID = id
		u.start.UploadId = id
	}
	if u.cfg.onUploadID != nil {
		u.cfg.onUploadID(u.uploadID)
	}
}

// --- the whole upload -------------------------------------------------------------------------

func (u *uploadRun) run(ctx context.Context, r io.Reader) (*Result, error) {
	resumeAt := int64(0)
	if u.resuming {
		at, result, err := u.locate(ctx, r)
		if err != nil || result != nil {
			return result, err
		}
		resumeAt = at
	}
	u.source = startSource(r, u.cfg.chunkSize, u.digest, u.done)
	for {
		response, err := u.attempt(ctx, resumeAt)
		if err == nil {
			result, err := u.checked(resultFromProto(response))
			if err == nil {
				u.noteCommitted(result.Size)
			}
			return result, err
		}
		if ctx.Err() != nil {
			return nil, &Error{Code: toError(ctx.Err(), nil).Code, Message: "the upload was cancelled: " + ctx.Err().Error(), cause: ctx.Err()}
		}
		e := u.wrap(err)
		if !retryable(e) {
			return nil, e
		}
		at, result, err := u.recover(ctx, e)
		if err != nil || result != nil {
			return result, err
		}
		resumeAt = at
	}
}

// locate finds where an upload the caller named stands, and positions the source there.
func (u *uploadRun) locate(ctx context.Context, r io.Reader) (int64, *Result, error) {
	st, err := u.settledStatus(ctx, nil)
	if err != nil {
		return 0, nil, err
	}
	base := u.cfg.sourceOffset
	if st == nil { // a new upload with the caller's id
		if base > 0 {
			return 0, nil, u.fail(codes.NotFound, ReasonResumeGap,
				"upload %s does not exist, so the source cannot start at byte %d", u.uploadID, base)
		}
		return 0, nil, nil
	}
	switch {
	case st.State == StateComplete || st.State == StateCompletionUnconfirmed:
		if st.Result == nil {
			return 0, nil, u.fail(codes.Unknown, "", "upload %s is complete but the gateway gave no result", u.uploadID)
		}
		result := *st.Result
		result.Unconfirmed = result.Unconfirmed || st.State == StateCompletionUnconfirmed
		return 0, &result, nil
	case st.State.ended():
		return 0, nil, u.endedError(st, nil)
	}
	committed := st.CommittedSize
	u.noteCommitted(committed)
	switch {
	case committed < base:
		return 0, nil, u.fail(codes.FailedPrecondition, ReasonResumeGap,
			"upload %s has committed %d bytes but the source starts at byte %d; supply the bytes from %d on",
			u.uploadID, committed, base, committed)
	case committed == base:
	case base > 0:
		if _, err := io.CopyN(io.Discard, r, committed-base); err != nil {
			return 0, nil, u.sourceError(err)
		}
	default:
		if err := u.skipCommitted(r, committed); err != nil {
			return 0, nil, err
		}
	}
	u.retained.start, u.retained.end = committed, committed
	u.position, u.sent = committed, committed
	return committed, nil, nil
}

// skipCommitted positions a seekable source at byte committed of the object.
func (u *uploadRun) skipCommitted(r io.Reader, committed int64) error {
	seeker, ok := r.(io.Seeker)
	if ok {
		_, err := seeker.Seek(0, io.SeekCurrent) // a pipe is an *os.File that cannot seek
		ok = err == nil
	}
	if !ok {
		return u.fail(codes.FailedPrecondition, ReasonSourceNotSeekable,
			"upload %s has committed %d bytes and the source cannot seek; pass an io.Seeker at byte 0 "+
				"of the object, or the bytes from %d on with WithSourceOffset(%d)",
			u.uploadID, committed, committed, committed)
	}
	if u.digest != nil {
		// The whole-object checksums cover the committed bytes too: hash them again.
		n, err := io.CopyN(digestWriter{u.digest}, r, committed)
		if err != nil && !errors.Is(err, io.EOF) {
			return u.sourceError(err)
		}
		if n < committed {
			return u.fail(codes.FailedPrecondition, ReasonResumeGap,
				"upload %s has committed %d bytes but the source has only %d", u.uploadID, committed, n)
		}
		return nil
	}
	if _, err := seeker.Seek(committed, io.SeekCurrent); err != nil {
		return u.sourceError(err)
	}
	return nil
}

type digestWriter struct{ d *objectDigest }

func (w digestWriter) Write(p []byte) (int, error) { w.d.write(p); return len(p), nil }

func (u *uploadRun) sourceError(err error) *Error {
	e := u.fail(codes.Unknown, ReasonSourceFailed, "reading the source failed: %v", err)
	e.cause = err
	return e
}

// recover waits and asks where the upload stands after a stream failed with cause; it returns
// the offset to resume from, or the result of an upload that is complete.
func (u *uploadRun) recover(ctx context.Context, cause *Error) (int64, *Result, error) {
	st, err := u.settledStatus(ctx, cause)
	if err != nil {
		return 0, nil, err
	}
	if st == nil { // the gateway never accepted the start (or forgot the upload)
		if u.retained.start > 0 || u.cfg.sourceOffset > 0 {
			return 0, nil, u.fail(codes.NotFound, ReasonResumeGap,
				"the gateway no longer knows upload %s, and its first %d bytes are no longer held to send again",
				u.uploadID, u.retained.start)
		}
		if u.cfg.onRetry != nil {
			u.cfg.onRetry(cause, u.streams+1)
		}
		return 0, nil, nil
	}
	switch {
	case st.State == StateComplete || st.State == StateCompletionUnconfirmed:
		if !u.finishSent {
			return 0, nil, u.fail(codes.FailedPrecondition, "",
				"upload %s was completed by another stream before this client sent all its data", u.uploadID)
		}
		if st.Result == nil {
			return 0, nil, u.fail(codes.Unknown, "", "upload %s is complete but the gateway gave no result", u.uploadID)
		}
		result, err := u.checked(st.Result)
		if err == nil {
			result.Unconfirmed = result.Unconfirmed || st.State == StateCompletionUnconfirmed
		}
		return 0, result, err
	case st.State.ended():
		return 0, nil, u.endedError(st, cause)
	}
	committed := st.CommittedSize
	if committed < u.retained.start || committed > u.retained.end {
		return 0, nil, u.fail(codes.DataLoss, ReasonResumeGap,
			"cannot resume upload %s: the gateway committed %d bytes, the client holds bytes %d to %d",
			u.uploadID, committed, u.retained.start, u.retained.end)
	}
	u.retained.release(committed)
	if u.cfg.onRetry != nil {
		u.cfg.onRetry(cause, u.streams+1)
	}
	return committed, nil, nil
}

// settledStatus waits the backoff (when cause is set) and asks GetUploadStatus until it answers
// with an upload that is not finishing; nil means the gateway does not know the upload. Retryable
// failures of the query are retried until the outage tolerance passes without progress.
func (u *uploadRun) settledStatus(ctx context.Context, cause *Error) (*UploadStatus, error) {
	wait := cause != nil
	for {
		if wait {
			if time.Since(u.progressAt) > u.cfg.outageTolerance {
				if cause == nil {
					cause = u.fail(codes.DeadlineExceeded, "", "upload %s is still finishing", u.uploadID)
				}
				cause.Message = fmt.Sprintf("gave up after %s without progress: %s",
					u.cfg.outageTolerance, cause.Message)
				return nil, cause
			}
			u.retries++
			if err := sleep(ctx, u.cfg.backoff.next(u.retries)); err != nil {
				return nil, err
			}
		}
		wait = true
		st, err := u.status(ctx)
		if err == nil {
			if st.State == StateOpen || st.State == StateFinishing {
				u.noteCommitted(st.CommittedSize)
			}
			if st.State == StateFinishing {
				continue // it becomes complete, or open again
			}
			return st, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		e := u.wrap(err)
		if isNotFound(e) {
			return nil, nil
		}
		if !retryable(e) {
			return nil, e
		}
		cause = e
	}
}

func (u *uploadRun) endedError(st *UploadStatus, cause *Error) *Error {
	why := st.ErrorMessage
	if why == "" {
		why = "no reason given"
	}
	msg := fmt.Sprintf("upload %s is %s (%s); start a new upload with a new upload id", u.uploadID, st.State, why)
	if cause != nil {
		msg += "; the last stream had failed with: " + cause.Error()
	}
	return &Error{Code: codes.FailedPrecondition, Reason: "UPLOAD_ENDED", Message: msg, UploadID: u.uploadID}
}

func (u *uploadRun) status(ctx context.Context) (*UploadStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, u.cfg.callTimeout)
	defer cancel()
	return u.c.Status(ctx, u.uploadID)
}

// checked returns result if it describes the bytes read and hashed.
func (u *uploadRun) checked(result *Result) (*Result, error) {
	if result.UploadID == "" {
		result.UploadID = u.uploadID
	}
	if u.eof && result.Size != u.retained.end {
		return nil, u.fail(codes.DataLoss, ReasonResultMismatch,
			"upload %s: the gateway stored %d bytes, the client sent %d", u.uploadID, result.Size, u.retained.end)
	}
	if u.digest != nil && u.eof {
		want := u.digest.checksums()
		got := result.Checksums
		if (got.CRC32C != nil && *got.CRC32C != *want.CRC32C) || (got.SHA256 != nil && !bytes.Equal(got.SHA256, want.SHA256)) {
			return nil, u.fail(codes.DataLoss, ReasonResultMismatch,
				"upload %s: the gateway's checksums differ from those of the bytes sent", u.uploadID)
		}
	}
	return result, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// --- memory -----------------------------------------------------------------------------------

func (u *uploadRun) room() bool {
	return u.retained.size()+int64(u.cfg.chunkSize) <= u.cfg.retainLimit
}

// maybeTrim asks for the committed size in the background once half the limit is retained
// (at most once per eighth of the limit read), so committed bytes are dropped.
func (u *uploadRun) maybeTrim(ctx context.Context) {
	step := max(int64(u.cfg.chunkSize), u.cfg.retainLimit/8)
	if !u.polling && u.retained.size() > u.cfg.retainLimit/2 && u.retained.end-u.polledAt >= step {
		u.poll(ctx)
	}
}

func (u *uploadRun) poll(ctx context.Context) {
	if u.polling {
		return
	}
	u.polling = true
	u.polledAt = u.retained.end
	go func() {
		st, err := u.status(ctx)
		if err != nil {
			st = nil // a broken stream reports the real problem
		}
		u.pollResults <- st
	}()
}

// trimmed applies a trim query's answer.
func (u *uploadRun) trimmed(st *UploadStatus) {
	u.polling = false
	if st == nil || (st.State != StateOpen && st.State != StateFinishing) {
		return
	}
	u.noteCommitted(st.CommittedSize)
	u.retained.release(min(st.CommittedSize, u.position, u.retained.end))
}

// --- one stream -------------------------------------------------------------------------------

type streamEnd struct {
	response *recgwv1.UploadResponse
	err      error
}

// stream is one Upload call: its sending side runs in the upload's goroutine, its receiving
// side in a goroutine of its own, so a gateway error is seen while the source is silent.
type stream struct {
	call    grpc.ClientStreamingClient[recgwv1.UploadRequest, recgwv1.UploadResponse]
	headers chan map[string][]string
	ended   chan streamEnd
	end     *streamEnd
}

func (s *stream) receive() {
	if md, err := s.call.Header(); err == nil {
		s.headers <- md
	}
	response := new(recgwv1.UploadResponse)
	err := s.call.RecvMsg(response)
	if err != nil {
		response = nil
	}
	s.ended <- streamEnd{response, err}
}

// attempt runs one stream from resumeAt: the gateway's response, or the error that ended it.
func (u *uploadRun) attempt(ctx context.Context, resumeAt int64) (*recgwv1.UploadResponse, error) {
	streamCtx, cancel := context.WithCancel(ctx)
	defer cancel() // on any early return this resets the stream; the upload stays resumable
	callCtx, err := u.c.auth.context(streamCtx)
	if err != nil {
		return nil, err
	}
	u.streams++
	call, err := u.c.rpc.Upload(callCtx)
	if err != nil {
		return nil, err
	}
	s := &stream{call: call, headers: make(chan map[string][]string, 1), ended: make(chan streamEnd, 1)}
	go s.receive()
	heartbeat := time.NewTimer(u.cfg.heartbeat)
	defer heartbeat.Stop()

	// send hands one message to gRPC (blocking while flow control is full); when the stream has
	// ended, it returns the gateway's status.
	send := func(msg *recgwv1.UploadRequest) error {
		if err := call.Send(msg); err != nil {
			if errors.Is(err, io.EOF) {
				return u.awaitEnd(ctx, s)
			}
			return err
		}
		heartbeat.Reset(u.cfg.heartbeat)
		return nil
	}
	offset := resumeAt
	u.advance(offset)
	first := &recgwv1.UploadRequest{Start: u.start, WriteOffset: offset}
	if u.eof && offset == u.retained.end {
		// Every byte is committed: finish at once (a complete upload answers with its result).
		return u.finish(ctx, s, first)
	}
	if err := send(first); err != nil {
		return nil, err
	}
	for offset < u.retained.end { // what the gateway had received but not committed
		data := u.retained.read(offset, u.cfg.chunkSize)
		if err := send(u.dataMessage(offset, data)); err != nil {
			return nil, err
		}
		offset += int64(len(data))
		u.advance(offset)
	}
	pollDelay := pollInitial
	var stallSince time.Time
	var pollTimer *time.Timer
	defer func() {
		if pollTimer != nil {
			pollTimer.Stop()
		}
	}()
	for !u.eof {
		select { // the upload id first: the caller may need it to resume or abort
		case md := <-s.headers:
			u.announce(md)
		default:
		}
		var chunks <-chan sourceChunk
		var pollDue <-chan time.Time
		if u.room() {
			chunks = u.source.chunks
			pollDelay, stallSince = pollInitial, time.Time{}
		} else if !u.polling {
			if pollTimer == nil {
				pollTimer = time.NewTimer(pollDelay)
			} else {
				pollTimer.Reset(pollDelay)
			}
			pollDue = pollTimer.C
		}
		select {
		case chunk := <-chunks:
			if chunk.err != nil && !errors.Is(chunk.err, io.EOF) {
				u.closeWithoutFinish(ctx, s)
				return nil, u.sourceError(chunk.err)
			}
			// Recorded before sending: if the send fails, the next stream must still know that
			// the source has ended (its reader is gone).
			u.eof = chunk.err != nil
			if len(chunk.data) > 0 {
				u.retained.add(chunk.data)
				if err := send(u.dataMessage(offset, chunk.data)); err != nil {
					return nil, err
				}
				offset += int64(len(chunk.data))
				u.advance(offset)
				u.maybeTrim(ctx)
			}
		case <-heartbeat.C:
			if err := send(&recgwv1.UploadRequest{WriteOffset: offset}); err != nil {
				return nil, err
			}
		case <-pollDue:
			pollDelay = min(pollDelay*2, pollMax)
			u.poll(ctx)
		case st := <-u.pollResults:
			before := u.retained.start
			u.trimmed(st)
			if !u.room() && st != nil && u.retained.start == before && st.ReceivedSize >= u.retained.end {
				if stallSince.IsZero() {
					stallSince = time.Now()
				} else if time.Since(stallSince) > u.cfg.stallTimeout {
					return nil, u.fail(codes.ResourceExhausted, ReasonRetainLimit,
						"upload %s: the gateway has received all %d bytes sent but committed none of the last %d "+
							"for %s; the retain limit (%d bytes) must exceed the gateway's part size: raise WithRetainLimit",
						u.uploadID, u.retained.end, u.retained.size(), u.cfg.stallTimeout, u.cfg.retainLimit)
				}
			} else {
				stallSince = time.Time{}
			}
		case md := <-s.headers:
			u.announce(md)
		case end := <-s.ended:
			s.end = &end
			if end.err == nil {
				return nil, u.fail(codes.Unknown, "", "the gateway ended upload %s before all data was sent", u.uploadID)
			}
			return nil, end.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return u.finish(ctx, s, &recgwv1.UploadRequest{WriteOffset: offset})
}

func (u *uploadRun) dataMessage(offset int64, data []byte) *recgwv1.UploadRequest {
	msg := &recgwv1.UploadRequest{WriteOffset: offset, Data: data}
	if u.cfg.checksums {
		crc := CRC32C(0, data)
		msg.DataCrc32C = &crc
	}
	return msg
}

// finish sends finish_write (with the whole-object checksums) on msg and waits for the response.
func (u *uploadRun) finish(ctx context.Context, s *stream, msg *recgwv1.UploadRequest) (*recgwv1.UploadResponse, error) {
	u.finalize(msg)
	u.finishSent = true
	if err := s.call.Send(msg); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if err := s.call.CloseSend(); err != nil {
		return nil, err
	}
	if err := u.awaitEnd(ctx, s); err != nil {
		return nil, err
	}
	return s.end.response, nil
}

// closeWithoutFinish ends the stream without finish_write, so the gateway keeps every whole part
// of what it received (the upload stays open for resuming) instead of losing it to a reset.
func (u *uploadRun) closeWithoutFinish(ctx context.Context, s *stream) {
	if s.call.CloseSend() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, u.cfg.callTimeout)
	defer cancel()
	_ = u.awaitEnd(ctx, s) // ABORTED (STREAM_ENDED_WITHOUT_FINISH) is the expected answer
}

// finalize makes msg the last message: finish_write and the whole-object checksums.
func (u *uploadRun) finalize(msg *recgwv1.UploadRequest) {
	msg.FinishWrite = true
	if u.digest != nil {
		sums := u.digest.checksums()
		msg.ObjectChecksums = &recgwv1.ObjectChecksums{Crc32C: sums.CRC32C, Sha256: sums.SHA256}
	}
}

// awaitEnd waits for the stream's end (announcing the upload id on the way) and returns its error.
func (u *uploadRun) awaitEnd(ctx context.Context, s *stream) error {
	for s.end == nil {
		select {
		case md := <-s.headers:
			u.announce(md)
		case end := <-s.ended:
			s.end = &end
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	select {
	case md := <-s.headers:
		u.announce(md)
	default:
	}
	return s.end.err
}

// --- the source -------------------------------------------------------------------------------

type sourceChunk struct {
	data []byte
	err  error // io.EOF after the last bytes, or the read error
}

// sourceFeed reads the source once, one chunk ahead of the sender, hashing each chunk as it is
// read so every byte enters the whole-object checksums exactly once however often it is sent.
type sourceFeed struct {
	chunks chan sourceChunk
}

func startSource(r io.Reader, chunkSize int, digest *objectDigest, done <-chan struct{}) *sourceFeed {
	f := &sourceFeed{chunks: make(chan sourceChunk)}
	go func() {
		for {
			buf := make([]byte, chunkSize)
			n, err := io.ReadFull(r, buf)
			if errors.Is(err, io.ErrUnexpectedEOF) {
				err = io.EOF
			}
			chunk := sourceChunk{data: buf[:n], err: err}
			if n > 0 && digest != nil {
				digest.write(chunk.data)
			}
			select {
			case f.chunks <- chunk:
			case <-done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return f
}
