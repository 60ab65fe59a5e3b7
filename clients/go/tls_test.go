package recgw

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"

	recgwv1 "github.com/recgw/recgw/clients/go/gen/recgw/v1"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	dir  string
}

func newTestCA(t *testing.T) *testCA {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "recgw test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &testCA{cert: cert, key: key, dir: t.TempDir()}
	ca.write(t, "ca.pem", "CERTIFICATE", der)
	return ca
}

func (ca *testCA) write(t *testing.T, name, kind string, der []byte) string {
	path := filepath.Join(ca.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// issue writes a certificate and key signed by the CA; it returns their paths and the pair.
func (ca *testCA) issue(t *testing.T, name string, usage x509.ExtKeyUsage, dnsNames ...string) (string, string, tls.Certificate) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: dnsNames, ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPath := ca.write(t, name+".pem", "CERTIFICATE", der)
	keyPath := ca.write(t, name+".key", "PRIVATE KEY", keyDER)
	pair, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		t.Fatal(err)
	}
	return certPath, keyPath, pair
}

// A real TLS handshake over loopback: the options verify the gateway against the CA file under
// the overridden name and present the client certificate the gateway requires.
func TestTLSOptionsVerifyTheGatewayAndPresentTheClientCertificate(t *testing.T) {
	ca := newTestCA(t)
	_, _, serverPair := ca.issue(t, "gateway", x509.ExtKeyUsageServerAuth, "gateway.test")
	clientCert, clientKey, _ := ca.issue(t, "client", x509.ExtKeyUsageClientAuth)
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	server := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{serverPair}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert,
	})))
	g := &fakeGateway{partSize: MiB, token: "tls-test-token-0123456789", uploads: map[string]*fakeUpload{}}
	recgwv1.RegisterUploadServiceServer(server, g)
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	caFile := filepath.Join(ca.dir, "ca.pem")
	address := listener.Addr().String()

	status := func(opts ...Option) codes.Code {
		t.Helper()
		conn, err := Dial(address, opts...)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err = NewClient(conn, g.token).Status(ctx, "no-such-upload")
		return asError(t, err).Code
	}
	// NotFound comes from the gateway: the handshake succeeded.
	if code := status(WithCAFile(caFile), WithServerName("gateway.test"), WithClientCertificate(clientCert, clientKey)); code != codes.NotFound {
		t.Fatalf("with every option: %s", code)
	}
	if code := status(WithCAFile(caFile), WithServerName("gateway.test")); code != codes.Unavailable {
		t.Fatalf("without the client certificate: %s", code)
	}
	if code := status(WithCAFile(caFile), WithClientCertificate(clientCert, clientKey)); code != codes.Unavailable {
		t.Fatalf("without the server name the certificate names: %s", code)
	}
	if code := status(WithServerName("gateway.test"), WithClientCertificate(clientCert, clientKey)); code != codes.Unavailable {
		t.Fatalf("with the system roots instead of the CA: %s", code)
	}
	if code := status(WithPlaintext()); code != codes.Unavailable {
		t.Fatalf("plaintext to a TLS gateway: %s", code)
	}
	for _, opts := range [][]Option{
		{WithPlaintext(), WithCAFile(caFile)},
		{WithClientCertificate(clientCert, "")},
		{WithCAFile(filepath.Join(ca.dir, "missing.pem"))},
		{WithCAFile(clientKey)},
	} {
		if _, err := Dial(address, opts...); err == nil {
			t.Fatalf("Dial accepted %d conflicting or broken options", len(opts))
		}
	}
}
