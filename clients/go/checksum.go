package recgw

import (
	"crypto/sha256"
	"hash"
	"hash/crc32"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// CRC32C is the CRC-32C (Castagnoli) of data continued from previous (0 for a fresh checksum),
// as in data_crc32c and ObjectChecksums.crc32c.
func CRC32C(previous uint32, data []byte) uint32 { return crc32.Update(previous, castagnoli, data) }

// objectDigest is the CRC32C and SHA-256 of a whole object, fed once per byte as it is read.
type objectDigest struct {
	crc    uint32
	sha    hash.Hash
	length int64
}

func newObjectDigest() *objectDigest { return &objectDigest{sha: sha256.New()} }

func (d *objectDigest) write(data []byte) {
	d.crc = CRC32C(d.crc, data)
	d.sha.Write(data)
	d.length += int64(len(data))
}

func (d *objectDigest) checksums() Checksums {
	crc := d.crc
	return Checksums{CRC32C: &crc, SHA256: d.sha.Sum(nil)}
}
