package recgw

import (
	"context"
	"fmt"
	"time"
	"unsafe"

	"google.golang.org/grpc"

	recgwv1 "github.com/recgw/recgw/clients/go/gen/recgw/v1"
)

// EncryptionMode selects the server-side encryption S3 applies to each write.
type EncryptionMode int32

const (
	// EncryptionDefault is the bucket's default.
	EncryptionDefault = EncryptionMode(recgwv1.ServerSideEncryptionMode_SERVER_SIDE_ENCRYPTION_MODE_UNSPECIFIED)
	// EncryptionS3 is SSE-S3 (AES256).
	EncryptionS3 = EncryptionMode(recgwv1.ServerSideEncryptionMode_SERVER_SIDE_ENCRYPTION_MODE_S3)
	// EncryptionKMS is SSE-KMS with KMSKeyID (empty: the account's default key).
	EncryptionKMS = EncryptionMode(recgwv1.ServerSideEncryptionMode_SERVER_SIDE_ENCRYPTION_MODE_KMS)
)

// StorageTarget is where and how a tenant's objects are written (no secret).
type StorageTarget struct {
	Region string
	// Bucket is a bucket name, access point alias, or access point ARN.
	Bucket string
	// Prefix for every key; default "uploads/". Must end with "/".
	Prefix string
	// EndpointURL for S3-compatible stores; empty for AWS.
	EndpointURL    string
	ForcePathStyle bool
	Encryption     EncryptionMode
	KMSKeyID       string
	// AllowOverwrite turns off If-None-Match: * for stores without conditional writes.
	AllowOverwrite bool
	// EqualPartSizes makes all parts but the last the same size.
	EqualPartSizes bool
}

// Credentials are a tenant's S3 credentials for SetCredentials.
//
// SecretAccessKey is a byte slice so the caller can zero it after Set returns (Set never copies
// it into a string); it must not change while Set runs. Formatting Credentials with fmt never
// shows the secret.
type Credentials struct {
	AccessKeyID     string
	SecretAccessKey []byte
	Target          StorageTarget
}

// Format prints the credentials without the secret, whatever the verb.
func (c Credentials) Format(f fmt.State, _ rune) {
	fmt.Fprintf(f, "recgw.Credentials{AccessKeyID: %q, SecretAccessKey: [REDACTED], Target: %+v}",
		maskAccessKeyID(c.AccessKeyID), c.Target)
}

func maskAccessKeyID(id string) string {
	if len(id) <= 4 {
		return "****"
	}
	return "****" + id[len(id)-4:]
}

// CredentialsView is what may be shown about stored credentials.
type CredentialsView struct {
	TenantID string
	// Version grows with every overwrite.
	Version    int64
	UpdateTime time.Time
	// AccessKeyIDHint is the access key id masked to its last 4 characters, e.g. "****WXYZ".
	AccessKeyIDHint string
	Target          StorageTarget
}

// VerifyResult tells whether the gateway could write a test object with the stored credentials.
type VerifyResult struct {
	OK bool
	// Key of the test object (overwritten each time).
	Key string
	// ErrorCode is S3's error code when not OK, e.g. "AccessDenied".
	ErrorCode string
	// ErrorMessage says what to fix when not OK.
	ErrorMessage string
}

// CredentialsAdmin calls the gateway's CredentialsService with an admin's bearer token. No
// response carries a secret, and no error shows the token or a secret passed to Set.
type CredentialsAdmin struct {
	rpc     recgwv1.CredentialsServiceClient
	auth    bearer
	secrets redactor
}

// NewCredentialsAdmin makes a CredentialsAdmin on conn that sends token on every call.
func NewCredentialsAdmin(conn grpc.ClientConnInterface, token string) *CredentialsAdmin {
	return &CredentialsAdmin{
		rpc:     recgwv1.NewCredentialsServiceClient(conn),
		auth:    newBearer(token),
		secrets: redactor{[]byte(token)},
	}
}

// Set creates or overwrites the tenant's credentials and returns what was stored.
func (a *CredentialsAdmin) Set(ctx context.Context, tenantID string, creds Credentials) (*CredentialsView, error) {
	ctx, err := a.auth.context(ctx)
	if err != nil {
		return nil, err
	}
	req := &recgwv1.SetCredentialsRequest{
		TenantId:        tenantID,
		AccessKeyId:     creds.AccessKeyID,
		SecretAccessKey: unsafeString(creds.SecretAccessKey),
		Target:          targetToProto(creds.Target),
	}
	resp, err := a.rpc.SetCredentials(ctx, req)
	req.SecretAccessKey = ""
	if err != nil {
		secrets := append(redactor{creds.SecretAccessKey}, a.secrets...)
		return nil, toError(err, secrets)
	}
	return viewFromProto(resp.GetCredentials()), nil
}

// unsafeString views b as a string without copying, so that zeroing b afterwards wipes the only
// copy the client made (protobuf marshals it into gRPC's send buffer and keeps no reference).
func unsafeString(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(&b[0], len(b))
}

// Describe returns the non-secret view of the tenant's credentials (codes.NotFound, reason
// CREDENTIALS_NOT_FOUND, when there are none).
func (a *CredentialsAdmin) Describe(ctx context.Context, tenantID string) (*CredentialsView, error) {
	ctx, err := a.auth.context(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := a.rpc.DescribeCredentials(ctx, &recgwv1.DescribeCredentialsRequest{TenantId: tenantID})
	if err != nil {
		return nil, toError(err, a.secrets)
	}
	return viewFromProto(resp.GetCredentials()), nil
}

// Delete removes the tenant's credentials, all versions.
func (a *CredentialsAdmin) Delete(ctx context.Context, tenantID string) error {
	ctx, err := a.auth.context(ctx)
	if err != nil {
		return err
	}
	if _, err := a.rpc.DeleteCredentials(ctx, &recgwv1.DeleteCredentialsRequest{TenantId: tenantID}); err != nil {
		return toError(err, a.secrets)
	}
	return nil
}

// Verify has the gateway write a tiny test object with the stored credentials.
func (a *CredentialsAdmin) Verify(ctx context.Context, tenantID string) (*VerifyResult, error) {
	ctx, err := a.auth.context(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := a.rpc.VerifyCredentials(ctx, &recgwv1.VerifyCredentialsRequest{TenantId: tenantID})
	if err != nil {
		return nil, toError(err, a.secrets)
	}
	return &VerifyResult{
		OK:           resp.GetOk(),
		Key:          resp.GetKey(),
		ErrorCode:    resp.GetErrorCode(),
		ErrorMessage: resp.GetErrorMessage(),
	}, nil
}

func targetToProto(t StorageTarget) *recgwv1.StorageTarget {
	return &recgwv1.StorageTarget{
		Region:         t.Region,
		Bucket:         t.Bucket,
		Prefix:         t.Prefix,
		EndpointUrl:    t.EndpointURL,
		ForcePathStyle: t.ForcePathStyle,
		Encryption: &recgwv1.ServerSideEncryption{
			Mode:     recgwv1.ServerSideEncryptionMode(t.Encryption),
			KmsKeyId: t.KMSKeyID,
		},
		AllowOverwrite: t.AllowOverwrite,
		EqualPartSizes: t.EqualPartSizes,
	}
}

func targetFromProto(m *recgwv1.StorageTarget) StorageTarget {
	return StorageTarget{
		Region:         m.GetRegion(),
		Bucket:         m.GetBucket(),
		Prefix:         m.GetPrefix(),
		EndpointURL:    m.GetEndpointUrl(),
		ForcePathStyle: m.GetForcePathStyle(),
		Encryption:     EncryptionMode(m.GetEncryption().GetMode()),
		KMSKeyID:       m.GetEncryption().GetKmsKeyId(),
		AllowOverwrite: m.GetAllowOverwrite(),
		EqualPartSizes: m.GetEqualPartSizes(),
	}
}

func viewFromProto(m *recgwv1.CredentialsView) *CredentialsView {
	return &CredentialsView{
		TenantID:        m.GetTenantId(),
		Version:         m.GetVersion(),
		UpdateTime:      timeFromProto(m.GetUpdateTime()),
		AccessKeyIDHint: m.GetAccessKeyIdHint(),
		Target:          targetFromProto(m.GetTarget()),
	}
}
