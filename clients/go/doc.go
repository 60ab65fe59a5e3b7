// Package recgw is the Go client of recgw, the gRPC upload gateway that streams call recordings
// into a customer's own S3 bucket.
//
// A media server dials the gateway once and uploads each recording from an io.Reader while it is
// produced:
//
//	conn, err := recgw.Dial("recgw.example.com:443", recgw.WithCAFile("ca.pem"))
//	if err != nil { ... }
//	defer conn.Close()
//	client := recgw.NewClient(conn, token)
//	result, err := client.Upload(ctx, recording, recgw.Start{Tenant: "acme", Object: "2026/call-42.webm"})
//
// Upload survives dropped connections and gateway restarts: it keeps every byte the gateway has not
// yet made durable (the retained buffer), asks GetUploadStatus where the upload stands, and
// continues on a new stream from the committed size, for as long as the outage tolerance allows
// (time without progress, 5 minutes by default). The source is read exactly once.
//
// Every error the gateway returns is an *Error with the gRPC code, the gateway's message and its
// structured reason (google.rpc.ErrorInfo); status.Code(err) works on it too.
package recgw
