package recgw

import (
	"math"
	"math/rand/v2"
	"time"

	"google.golang.org/grpc/codes"
)

// Action is what an upload does after a failed stream or status query.
type Action int

const (
	// Fail: the error is final.
	Fail Action = iota
	// Resume: wait the backoff, ask GetUploadStatus, continue on a new stream.
	Resume
)

func (a Action) String() string {
	if a == Resume {
		return "resume"
	}
	return "fail"
}

type retryRule struct {
	code   string // codes.Code's name as in the retry table, or "*"
	reason string // ErrorInfo reason, or "*" (matches a missing reason too)
	action Action
}

// retryRules is testdata/retry_table.json's rule list, matched in order; a unit test keeps the
// two equal.
var retryRules = []retryRule{
	{"UNAVAILABLE", "*", Resume},
	{"DEADLINE_EXCEEDED", "*", Resume},
	{"INTERNAL", "*", Resume},
	{"UNKNOWN", "*", Resume},
	{"ABORTED", "ANOTHER_WRITER", Resume},
	{"OUT_OF_RANGE", "OFFSET_MISMATCH", Resume},
	{"DATA_LOSS", "CHUNK_CHECKSUM_MISMATCH", Resume},
	{"RESOURCE_EXHAUSTED", "TENANT_LIMIT_EXCEEDED", Resume},
	{"RESOURCE_EXHAUSTED", "RATE_LIMITED", Resume},
	{"RESOURCE_EXHAUSTED", "SPOOL_EXHAUSTED", Resume},
	{"*", "*", Fail},
}

// codeNames spells codes.Code as the retry table does (codes.Code's String is CamelCase).
var codeNames = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

// Classify says what an upload does after a stream (or the status query of a resume) failed with
// code and the ErrorInfo reason ("" when there is none).
func Classify(code codes.Code, reason string) Action {
	name := codeNames[code]
	for _, rule := range retryRules {
		if (rule.code == "*" || rule.code == name) && (rule.reason == "*" || rule.reason == reason) {
			return rule.action
		}
	}
	return Fail
}

func retryable(e *Error) bool {
	// The client's own errors are final whatever their code.
	if len(e.Reason) > 7 && e.Reason[:7] == "CLIENT_" {
		return false
	}
	return Classify(e.Code, e.Reason) == Resume
}

// Backoff is the wait before each consecutive retry: Initial, times Multiplier per retry, at most
// Max, varied by Jitter (a fraction) either way.
type Backoff struct {
	Initial    time.Duration
	Multiplier float64
	Max        time.Duration
	Jitter     float64
}

// DefaultBackoff is the retry table's backoff.
var DefaultBackoff = Backoff{
	Initial:    200 * time.Millisecond,
	Multiplier: 2,
	Max:        10 * time.Second,
	Jitter:     0.2,
}

// DefaultOutageTolerance is how long an upload keeps retrying without any byte newly committed.
const DefaultOutageTolerance = 300 * time.Second

// Delay is the wait before the retry-th consecutive retry (1-based); random is in [0, 1).
func (b Backoff) Delay(retry int, random float64) time.Duration {
	exponent := float64(max(retry-1, 0))
	base := float64(b.Initial) * math.Pow(b.Multiplier, exponent)
	if math.IsInf(base, 0) || base > float64(b.Max) {
		base = float64(b.Max)
	}
	wait := base + base*b.Jitter*(2*random-1)
	return time.Duration(max(0, min(wait, float64(b.Max))))
}

func (b Backoff) next(retry int) time.Duration { return b.Delay(retry, rand.Float64()) }
