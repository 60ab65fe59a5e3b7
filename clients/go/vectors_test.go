package recgw

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	recgwv1 "github.com/recgw/recgw/clients/go/gen/recgw/v1"
)

// The shared, language-neutral vectors every recgw client checks itself against.
var testdata = filepath.Join("..", "..", "testdata")

type pattern struct {
	Pattern string `json:"pattern"`
	Text    string `json:"text"`
	Byte    int    `json:"byte"`
	Length  int    `json:"length"`
}

func (p pattern) bytes(t *testing.T) []byte {
	switch p.Pattern {
	case "ascii":
		return []byte(p.Text)
	case "fill":
		return bytes.Repeat([]byte{byte(p.Byte)}, p.Length)
	case "ramp":
		return ramp(p.Length)
	}
	t.Fatalf("unknown pattern %q", p.Pattern)
	return nil
}

// ramp is testdata's "ramp" pattern: byte i is (i*7+3) % 251.
func ramp(n int) []byte {
	out := make([]byte, n)
	for i := range out {
		out[i] = byte((i*7 + 3) % 251)
	}
	return out
}

type vectorFile struct {
	CRC32C []struct {
		Input  pattern `json:"input"`
		CRC32C uint32  `json:"crc32c"`
	} `json:"crc32c"`
	Continued []struct {
		First       pattern `json:"first"`
		Second      pattern `json:"second"`
		CRC32CFirst uint32  `json:"crc32c_first"`
		CRC32CBoth  uint32  `json:"crc32c_both"`
	} `json:"crc32c_continued"`
	Chunking []struct {
		Input     pattern `json:"input"`
		ChunkSize int     `json:"chunk_size"`
		Messages  []struct {
			WriteOffset int64  `json:"write_offset"`
			Length      int    `json:"length"`
			DataCRC32C  uint32 `json:"data_crc32c"`
		} `json:"messages"`
		ObjectCRC32C uint32 `json:"object_crc32c"`
		ObjectSHA256 string `json:"object_sha256"`
	} `json:"chunking"`
	Messages []struct {
		Name   string          `json:"name"`
		Fields json.RawMessage `json:"fields"`
		Hex    string          `json:"hex"`
	} `json:"messages"`
}

func loadJSON(t *testing.T, name string, into any) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(testdata, name))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, into); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func loadVectors(t *testing.T) vectorFile {
	var v vectorFile
	loadJSON(t, "vectors.json", &v)
	if len(v.CRC32C) == 0 || len(v.Continued) == 0 || len(v.Chunking) == 0 || len(v.Messages) == 0 {
		t.Fatal("vectors.json lacks a section")
	}
	return v
}

func TestCRC32CVectors(t *testing.T) {
	v := loadVectors(t)
	for _, c := range v.CRC32C {
		if got := CRC32C(0, c.Input.bytes(t)); got != c.CRC32C {
			t.Errorf("CRC32C(%+v) = %d, want %d", c.Input, got, c.CRC32C)
		}
	}
	for _, c := range v.Continued {
		first := CRC32C(0, c.First.bytes(t))
		if first != c.CRC32CFirst {
			t.Errorf("CRC32C(%+v) = %d, want %d", c.First, first, c.CRC32CFirst)
		}
		if got := CRC32C(first, c.Second.bytes(t)); got != c.CRC32CBoth {
			t.Errorf("CRC32C continued with %+v = %d, want %d", c.Second, got, c.CRC32CBoth)
		}
	}
}

// The upload cuts the object into exactly the vectors' messages (offsets, lengths, CRC32C) and
// sends the whole-object checksums with finish_write, in a message of its own after the data.
func TestChunkingVectors(t *testing.T) {
	v := loadVectors(t)
	for _, c := range v.Chunking {
		g, conn := newFakeGateway(t, 5*MiB)
		data := c.Input.bytes(t)
		result, err := NewClient(conn, g.token).Upload(context.Background(), bytes.NewReader(data),
			Start{Tenant: "acme", Object: "v.bin"}, WithChunkSize(c.ChunkSize))
		if err != nil {
			t.Fatalf("%d bytes: %v", len(data), err)
		}
		sent := g.streamMessages(0)
		if sent[0].GetStart() == nil || len(sent[0].GetData()) != 0 || sent[0].GetWriteOffset() != 0 {
			t.Fatalf("first message is not a bare start: %v", sent[0])
		}
		var got []*recgwv1.UploadRequest
		for _, m := range sent[1:] {
			if len(m.GetData()) > 0 {
				got = append(got, m)
			}
		}
		want := c.Messages
		if len(data) == 0 {
			want = nil // the one message of an empty object is the finish
		}
		if len(got) != len(want) {
			t.Fatalf("%d bytes: %d data messages, want %d", len(data), len(got), len(want))
		}
		for i, m := range got {
			if m.GetWriteOffset() != want[i].WriteOffset || len(m.GetData()) != want[i].Length ||
				m.DataCrc32C == nil || m.GetDataCrc32C() != want[i].DataCRC32C {
				t.Errorf("%d bytes, message %d: offset %d length %d crc %d, want %+v", len(data), i,
					m.GetWriteOffset(), len(m.GetData()), m.GetDataCrc32C(), want[i])
			}
		}
		last := sent[len(sent)-1]
		sums := last.GetObjectChecksums()
		if !last.GetFinishWrite() || last.GetWriteOffset() != int64(len(data)) || len(last.GetData()) != 0 {
			t.Fatalf("%d bytes: last message %v is not finish_write at the end", len(data), last)
		}
		if sums.GetCrc32C() != c.ObjectCRC32C || hex.EncodeToString(sums.GetSha256()) != c.ObjectSHA256 {
			t.Errorf("%d bytes: object checksums %d %x, want %d %s", len(data), sums.GetCrc32C(), sums.GetSha256(),
				c.ObjectCRC32C, c.ObjectSHA256)
		}
		if result.Size != int64(len(data)) || hex.EncodeToString(result.Checksums.SHA256) != c.ObjectSHA256 {
			t.Errorf("%d bytes: result %+v", len(data), result)
		}
	}
}

// Each named message, built from its fields, encodes to exactly the vector's bytes; the ones the
// upload builds itself (start, data, finish) are also built by the client's own code.
func TestMessageVectors(t *testing.T) {
	v := loadVectors(t)
	built := map[string]*recgwv1.UploadRequest{}
	for _, m := range v.Messages {
		msg := &recgwv1.UploadRequest{}
		if err := protojson.Unmarshal(m.Fields, msg); err != nil {
			t.Fatalf("%s: %v", m.Name, err)
		}
		built[m.Name] = msg
		encoded, err := proto.MarshalOptions{Deterministic: true}.Marshal(msg)
		if err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(encoded); got != m.Hex {
			t.Errorf("%s encodes to %s, want %s", m.Name, got, m.Hex)
		}
	}
	hexOf := func(msg *recgwv1.UploadRequest) string {
		encoded, err := proto.MarshalOptions{Deterministic: true}.Marshal(msg)
		if err != nil {
			t.Fatal(err)
		}
		return hex.EncodeToString(encoded)
	}
	want := map[string]string{}
	for _, m := range v.Messages {
		want[m.Name] = m.Hex
	}
	const id = "6f1c2a4e-8a47-4a53-9d2e-0c7b8f4e2d11"
	start := newUploadRun(nil, uploadConfig{checksums: true}, Start{
		Tenant: "acme", Object: "2026/11/28/call-42.webm", ContentType: "video/webm",
		Metadata: map[string]string{"room": "blue"}, ExpectedSize: 11, UploadID: id,
	})
	if got := hexOf(&recgwv1.UploadRequest{Start: start.start}); got != want["start"] {
		t.Errorf("client's start encodes to %s, want %s", got, want["start"])
	}
	live := newUploadRun(nil, uploadConfig{checksums: true}, Start{Tenant: "acme", Object: "live.webm", UploadID: id})
	if got := hexOf(&recgwv1.UploadRequest{Start: live.start}); got != want["start_unknown_length"] {
		t.Errorf("client's live start encodes to %s, want %s", got, want["start_unknown_length"])
	}
	body := []byte("hello world")
	if got := hexOf(start.dataMessage(0, body[:5])); got != want["data_first"] {
		t.Errorf("client's first data message encodes to %s, want %s", got, want["data_first"])
	}
	if got := hexOf(start.dataMessage(5, body[5:])); got != want["data_second"] {
		t.Errorf("client's second data message encodes to %s, want %s", got, want["data_second"])
	}
	start.digest.write(body)
	finish := &recgwv1.UploadRequest{WriteOffset: 11}
	start.finalize(finish)
	if got := hexOf(finish); got != want["finish"] {
		t.Errorf("client's finish encodes to %s, want %s", got, want["finish"])
	}
	resume := live.dataMessage(8388608, []byte{0, 1})
	resume.Start = live.start
	if got := hexOf(resume); got != want["resume_start_with_data"] {
		t.Errorf("client's resume message encodes to %s, want %s", got, want["resume_start_with_data"])
	}
	sha := sha256.Sum256(body)
	if !bytes.Equal(built["finish"].GetObjectChecksums().GetSha256(), sha[:]) {
		t.Error("the finish vector's SHA-256 is not that of hello world")
	}
}

type retryTable struct {
	Backoff struct {
		InitialSeconds  float64 `json:"initial_seconds"`
		Multiplier      float64 `json:"multiplier"`
		MaxSeconds      float64 `json:"max_seconds"`
		Jitter          float64 `json:"jitter"`
		OutageTolerance float64 `json:"outage_tolerance_seconds"`
	} `json:"backoff"`
	Rules []struct {
		Code   string `json:"code"`
		Reason string `json:"reason"`
		Action string `json:"action"`
	} `json:"rules"`
	Cases []struct {
		Code   string `json:"code"`
		Reason string `json:"reason"`
		Action string `json:"action"`
	} `json:"cases"`
}

func codeNamed(t *testing.T, name string) codes.Code {
	for code, n := range codeNames {
		if n == name {
			return code
		}
	}
	t.Fatalf("unknown code %q", name)
	return 0
}

func TestRetryTable(t *testing.T) {
	var table retryTable
	loadJSON(t, "retry_table.json", &table)
	if len(table.Rules) != len(retryRules) {
		t.Fatalf("the table has %d rules, the client %d", len(table.Rules), len(retryRules))
	}
	for i, rule := range table.Rules {
		mine := retryRules[i]
		if rule.Code != mine.code || rule.Reason != mine.reason || rule.Action != mine.action.String() {
			t.Errorf("rule %d: table %+v, client %+v", i, rule, mine)
		}
	}
	if len(table.Cases) == 0 {
		t.Fatal("no cases")
	}
	for _, c := range table.Cases {
		if got := Classify(codeNamed(t, c.Code), c.Reason).String(); got != c.Action {
			t.Errorf("%s %q: %s, want %s", c.Code, c.Reason, got, c.Action)
		}
	}
	b := table.Backoff
	seconds := func(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
	if DefaultBackoff.Initial != seconds(b.InitialSeconds) || DefaultBackoff.Multiplier != b.Multiplier ||
		DefaultBackoff.Max != seconds(b.MaxSeconds) || DefaultBackoff.Jitter != b.Jitter ||
		DefaultOutageTolerance != seconds(b.OutageTolerance) {
		t.Errorf("defaults %+v %s differ from the table's %+v", DefaultBackoff, DefaultOutageTolerance, b)
	}
}

func TestBackoffGrowsWithJitterUpToTheMaximum(t *testing.T) {
	b := DefaultBackoff
	cases := []struct {
		retry  int
		random float64
		want   time.Duration
	}{
		{1, 0.5, 200 * time.Millisecond},
		{2, 0.5, 400 * time.Millisecond},
		{3, 0.5, 800 * time.Millisecond},
		{1, 0, 160 * time.Millisecond},
		{1, 1, 240 * time.Millisecond},
		{6, 0.5, 6400 * time.Millisecond},
		{7, 0.5, 10 * time.Second},
		{7, 0, 8 * time.Second},
		{7, 0.999999, 10 * time.Second},
		{5000, 0.5, 10 * time.Second},
	}
	for _, c := range cases {
		got := b.Delay(c.retry, c.random)
		if diff := got - c.want; diff < -time.Microsecond || diff > time.Microsecond {
			t.Errorf("Delay(%d, %v) = %s, want %s", c.retry, c.random, got, c.want)
		}
	}
}
