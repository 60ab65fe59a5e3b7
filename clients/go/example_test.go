package recgw_test

import (
	"context"
	"io"
	"log"
	"os"

	recgw "github.com/recgw/recgw/clients/go"
)

// The README's example (compiled by go vet and go test, not run).
func ExampleClient_Upload() {
	upload := func(ctx context.Context, recording io.Reader) error {
		conn, err := recgw.Dial("recgw.example.com:443", recgw.WithCAFile("ca.pem")) // or recgw.WithPlaintext()
		if err != nil {
			return err
		}
		defer conn.Close()
		client := recgw.NewClient(conn, os.Getenv("RECGW_TOKEN"))
		result, err := client.Upload(ctx, recording, recgw.Start{Tenant: "acme", Object: "2026/11/28/call-42.webm", ContentType: "video/webm"},
			recgw.OnUploadID(func(id string) { log.Printf("upload id %s", id) }))
		if err != nil {
			return err // a *recgw.Error: Code, Reason, Metadata, UploadID
		}
		log.Printf("stored %s/%s, %d bytes, sha256 %x", result.Bucket, result.Key, result.Size, result.Checksums.SHA256)
		return nil
	}
	_ = upload
}
