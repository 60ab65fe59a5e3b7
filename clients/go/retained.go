package recgw

import "fmt"

// retainedBuffer holds every byte read from the source from the gateway's committed size on.
//
// The source is read once (a live recording cannot be rewound), so the bytes the gateway has
// received but not yet made durable are kept here, in the chunks they were read in, until a status
// query shows them committed; a resumed stream sends them again from here.
type retainedBuffer struct {
	chunks [][]byte // chunks[0] starts at start
	start  int64
	end    int64
}

// size is the number of bytes held.
func (b *retainedBuffer) size() int64 { return b.end - b.start }

// add keeps the next bytes read from the source (not copied: the caller must not reuse data).
func (b *retainedBuffer) add(data []byte) {
	if len(data) == 0 {
		return
	}
	b.chunks = append(b.chunks, data)
	b.end += int64(len(data))
}

// release drops the bytes before offset, committed by the gateway; a no-op at or below start.
func (b *retainedBuffer) release(offset int64) {
	if offset <= b.start {
		return
	}
	if offset > b.end {
		panic(fmt.Sprintf("recgw: release(%d) beyond the %d bytes read", offset, b.end))
	}
	drop := 0
	for drop < len(b.chunks) && b.start+int64(len(b.chunks[drop])) <= offset {
		b.start += int64(len(b.chunks[drop]))
		b.chunks[drop] = nil
		drop++
	}
	b.chunks = b.chunks[drop:]
	if b.start < offset {
		// A chunk that straddles the committed size: keep its tail (the slice still pins the
		// whole chunk's array until the chunk is dropped, at most one chunk more than counted).
		b.chunks[0] = b.chunks[0][offset-b.start:]
		b.start = offset
	}
	if len(b.chunks) == 0 {
		b.chunks = nil
	}
}

// read returns up to limit bytes from offset (start <= offset < end), without copying.
func (b *retainedBuffer) read(offset int64, limit int) []byte {
	if offset < b.start || offset >= b.end {
		panic(fmt.Sprintf("recgw: byte %d is not retained (%d to %d)", offset, b.start, b.end))
	}
	at := b.start
	for _, chunk := range b.chunks {
		next := at + int64(len(chunk))
		if offset < next {
			piece := chunk[offset-at:]
			if len(piece) > limit {
				piece = piece[:limit]
			}
			return piece
		}
		at = next
	}
	panic("unreachable")
}
