// Command recgw-bench uploads N MiB of generated data through a gateway with the Go client and
// prints the throughput and the CPU time this process spent on the upload (`make bench` reads
// both lines: "uploading" when the upload begins, then the result).
//
//	recgw-bench -addr 127.0.0.1:50051 -plaintext -token T -tenant acme -mib 256
//
// Flags default to the environment of tests/e2e_stack.py (RECGW_E2E_ADDRESS, ...).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"syscall"
	"time"

	recgw "github.com/recgw/recgw/clients/go"
)

// repeating yields n bytes by repeating block.
type repeating struct {
	block []byte
	left  int64
	at    int
}

func (r *repeating) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(int64(len(p)), r.left)], r.block[r.at:])
	r.at = (r.at + n) % len(r.block)
	r.left -= int64(n)
	return n, nil
}

func main() {
	addr := flag.String("addr", os.Getenv("RECGW_E2E_ADDRESS"), "gateway host:port")
	token := flag.String("token", os.Getenv("RECGW_E2E_UPLOADER_TOKEN"), "uploader bearer token")
	tenant := flag.String("tenant", os.Getenv("RECGW_E2E_TENANT"), "tenant id")
	plaintext := flag.Bool("plaintext", true, "connect without TLS")
	caFile := flag.String("ca", "", "CA file (TLS)")
	mib := flag.Int64("mib", 64, "MiB to upload")
	chunk := flag.Int("chunk", recgw.DefaultChunkSize, "bytes per message")
	noChecksums := flag.Bool("no-checksums", false, "turn the checksums off")
	warmupMiB := flag.Int64("warmup-mib", 0, "MiB to upload first, untimed")
	flag.Parse()
	if *addr == "" || *token == "" || *tenant == "" {
		fmt.Fprintln(os.Stderr, "recgw-bench: -addr, -token and -tenant are required")
		os.Exit(2)
	}
	var dial []recgw.Option
	if *plaintext && *caFile == "" {
		dial = append(dial, recgw.WithPlaintext())
	} else if *caFile != "" {
		dial = append(dial, recgw.WithCAFile(*caFile))
	}
	conn, err := recgw.Dial(*addr, dial...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer conn.Close()
	block := make([]byte, 4<<20)
	_, _ = rand.NewChaCha8([32]byte{42}).Read(block)
	opts := []recgw.UploadOption{recgw.WithChunkSize(*chunk)}
	if *noChecksums {
		opts = append(opts, recgw.WithoutChecksums())
	}
	size := *mib << 20
	client := recgw.NewClient(conn, *token)
	if *warmupMiB > 0 {
		_, err := client.Upload(context.Background(), &repeating{block: block, left: *warmupMiB << 20},
			recgw.Start{Tenant: *tenant, Object: fmt.Sprintf("bench/go-warmup-%d.bin", time.Now().UnixNano())}, opts...)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	fmt.Printf("client_go: uploading %d MiB\n", *mib)
	cpuBefore := cpuSeconds()
	began := time.Now()
	result, err := client.Upload(context.Background(), &repeating{block: block, left: size},
		recgw.Start{Tenant: *tenant, Object: fmt.Sprintf("bench/go-%d.bin", time.Now().UnixNano())}, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	seconds := time.Since(began).Seconds()
	cpu := cpuSeconds() - cpuBefore
	fmt.Printf("client_go: %d MiB in %.3f s = %.1f MiB/s, CPU %.3f s (checksums %v, %d streams)\n",
		result.Size>>20, seconds, float64(result.Size)/(1<<20)/seconds, cpu, !*noChecksums, result.Streams)
}

// cpuSeconds is the user plus system CPU time of this process so far.
func cpuSeconds() float64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		return 0
	}
	return float64(usage.Utime.Nano()+usage.Stime.Nano()) / 1e9
}
