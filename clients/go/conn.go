package recgw

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

// roundRobin sends every call (each upload stream, each status query) to the next address that
// is up: uploads spread over the replicas a DNS name or DialReplicas names, and a resume after a
// lost replica goes to a live one.
const roundRobin = `{"loadBalancingConfig": [{"round_robin": {}}]}`

// Keepalive pings on open streams, so a connection that dies without a reset is noticed and the
// upload resumes; the gateway permits pings every 10 s or more.
const (
	keepaliveTime    = 20 * time.Second
	keepaliveTimeout = 10 * time.Second
)

// Option configures Dial.
type Option func(*dialConfig)

type dialConfig struct {
	plaintext   bool
	caFile      string
	certFile    string
	keyFile     string
	serverName  string
	tlsConfig   *tls.Config
	dialOptions []grpc.DialOption
}

// WithPlaintext connects without TLS. Only for loopback or a trusted network: the bearer token
// travels in clear text.
func WithPlaintext() Option { return func(c *dialConfig) { c.plaintext = true } }

// WithCAFile trusts the PEM certificates in path (instead of the system roots) to verify the
// gateway.
func WithCAFile(path string) Option { return func(c *dialConfig) { c.caFile = path } }

// WithClientCertificate presents the PEM certificate and key (mutual TLS).
func WithClientCertificate(certFile, keyFile string) Option {
	return func(c *dialConfig) { c.certFile, c.keyFile = certFile, keyFile }
}

// WithServerName overrides the name the gateway's certificate is verified against.
func WithServerName(name string) Option { return func(c *dialConfig) { c.serverName = name } }

// WithTLSConfig uses cfg as the base TLS configuration (cloned); the file and name options above
// are applied on top of it.
func WithTLSConfig(cfg *tls.Config) Option { return func(c *dialConfig) { c.tlsConfig = cfg } }

// WithDialOptions adds gRPC dial options, for example interceptors.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *dialConfig) { c.dialOptions = append(c.dialOptions, opts...) }
}

// Dial opens a connection to the gateway at addr ("host:port"). It is TLS with the system's roots
// unless options say otherwise; plaintext needs WithPlaintext. The connection is established
// lazily and re-established after failures; close it when done. One connection serves any number
// of Clients and CredentialsAdmins.
func Dial(addr string, opts ...Option) (*grpc.ClientConn, error) {
	return dial(addr, nil, opts)
}

// DialReplicas opens one connection that balances over several gateway replicas (gRPC's
// round_robin over a static list of "host:port" addresses): each call goes to the next replica
// that is up. The replicas must share one PostgreSQL session store, so any of them resumes any
// upload. Over TLS each replica's certificate is checked against the host of its address unless
// WithServerName names one for all. For a DNS name resolving to every replica, Dial balances
// the same way.
func DialReplicas(addrs []string, opts ...Option) (*grpc.ClientConn, error) {
	if len(addrs) == 0 {
		return nil, errors.New("recgw: DialReplicas needs at least one address")
	}
	var cfg dialConfig
	for _, opt := range opts {
		opt(&cfg)
	}
	state := resolver.State{}
	for _, addr := range addrs {
		host, _, err := net.SplitHostPort(addr)
		if err != nil || host == "" {
			return nil, fmt.Errorf("recgw: replica address %q is not host:port", addr)
		}
		address := resolver.Address{Addr: addr}
		if !cfg.plaintext && cfg.serverName == "" {
			address.ServerName = host
		}
		state.Addresses = append(state.Addresses, address)
	}
	static := manual.NewBuilderWithScheme("recgw-replicas")
	static.InitialState(state)
	return dial(static.Scheme()+":///replicas", static, opts)
}

func dial(addr string, static resolver.Builder, opts []Option) (*grpc.ClientConn, error) {
	var cfg dialConfig
	for _, opt := range opts {
		opt(&cfg)
	}
	creds, err := cfg.transportCredentials()
	if err != nil {
		return nil, err
	}
	dialOptions := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultServiceConfig(roundRobin),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time:    keepaliveTime,
			Timeout: keepaliveTimeout,
		}),
		// gRPC's default reconnect backoff grows to 120 s; an upload that resumes after a
		// gateway restart should not wait that long for the connection.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  200 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   5 * time.Second,
			},
			MinConnectTimeout: 5 * time.Second,
		}),
	}
	if static != nil {
		dialOptions = append(dialOptions, grpc.WithResolvers(static))
	}
	dialOptions = append(dialOptions, cfg.dialOptions...)
	conn, err := grpc.NewClient(addr, dialOptions...)
	if err != nil {
		return nil, fmt.Errorf("recgw: dial %q: %w", addr, err)
	}
	return conn, nil
}

func (c *dialConfig) transportCredentials() (credentials.TransportCredentials, error) {
	if c.plaintext {
		if c.caFile != "" || c.certFile != "" || c.keyFile != "" || c.serverName != "" || c.tlsConfig != nil {
			return nil, errors.New("recgw: WithPlaintext cannot be combined with TLS options")
		}
		return insecure.NewCredentials(), nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.tlsConfig != nil {
		cfg = c.tlsConfig.Clone()
	}
	if c.caFile != "" {
		pem, err := os.ReadFile(c.caFile)
		if err != nil {
			return nil, fmt.Errorf("recgw: reading the CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("recgw: no PEM certificate found in CA file %q", c.caFile)
		}
		cfg.RootCAs = pool
	}
	if (c.certFile == "") != (c.keyFile == "") {
		return nil, errors.New("recgw: WithClientCertificate needs both a certificate and a key file")
	}
	if c.certFile != "" {
		// The key file's contents never reach an error message: tls only reports its own failure.
		pair, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
		if err != nil {
			return nil, fmt.Errorf("recgw: loading the client certificate %q: %w", c.certFile, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	if c.serverName != "" {
		cfg.ServerName = c.serverName
	}
	return credentials.NewTLS(cfg), nil
}
