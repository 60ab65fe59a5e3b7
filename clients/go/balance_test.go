package recgw

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	recgwv1 "github.com/recgw/recgw/clients/go/gen/recgw/v1"
)

// countingGateway answers GetUploadStatus and counts the calls it got.
type countingGateway struct {
	recgwv1.UnimplementedUploadServiceServer
	calls atomic.Int64
}

func (g *countingGateway) GetUploadStatus(context.Context, *recgwv1.GetUploadStatusRequest) (*recgwv1.GetUploadStatusResponse, error) {
	g.calls.Add(1)
	return &recgwv1.GetUploadStatusResponse{State: recgwv1.UploadState_UPLOAD_STATE_OPEN}, nil
}

func startCounting(t *testing.T) (*countingGateway, string, func()) {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &countingGateway{}
	server := grpc.NewServer()
	recgwv1.RegisterUploadServiceServer(server, g)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	return g, listener.Addr().String(), server.Stop
}

func TestDialReplicasBalancesAndSkipsAStoppedReplica(t *testing.T) {
	a, addrA, stopA := startCounting(t)
	b, addrB, _ := startCounting(t)
	conn, err := DialReplicas([]string{addrA, addrB}, WithPlaintext())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stub := recgwv1.NewUploadServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	status := func() error {
		_, err := stub.GetUploadStatus(ctx, &recgwv1.GetUploadStatusRequest{UploadId: NewUploadID()}, grpc.WaitForReady(true))
		return err
	}
	// round_robin uses the replicas it is connected to; the second may connect a moment later.
	for a.calls.Load() == 0 || b.calls.Load() == 0 {
		if err := status(); err != nil {
			t.Fatal(err)
		}
	}
	a.calls.Store(0)
	b.calls.Store(0)
	for i := 0; i < 10; i++ {
		if err := status(); err != nil {
			t.Fatal(err)
		}
	}
	if a.calls.Load() < 3 || b.calls.Load() < 3 {
		t.Fatalf("round_robin should spread calls: A got %d, B got %d", a.calls.Load(), b.calls.Load())
	}
	stopA()
	// Once the balancer has seen A go away, every call goes to B.
	deadline := time.Now().Add(20 * time.Second)
	for {
		before := b.calls.Load()
		if err := status(); err == nil && b.calls.Load() == before+1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("calls never all went to B after A stopped")
		}
	}
	before := b.calls.Load()
	for i := 0; i < 5; i++ {
		if err := status(); err != nil {
			t.Fatal(err)
		}
	}
	if got := b.calls.Load() - before; got != 5 {
		t.Fatalf("B got %d of 5 calls after A stopped", got)
	}
}

func TestDialReplicasRefusesBadAddresses(t *testing.T) {
	if _, err := DialReplicas(nil, WithPlaintext()); err == nil {
		t.Fatal("no addresses must be refused")
	}
	if _, err := DialReplicas([]string{"10.0.0.11:50051", "gw-b"}, WithPlaintext()); err == nil {
		t.Fatal("an address without a port must be refused")
	}
}
