/**
 * The bytes of an upload from the gateway's committed size on, kept to be sent
 * again on a new stream; trimmed as the committed size grows.
 */
export class RetainedBuffer {
  private chunks: Uint8Array[] = [];
  private head = 0; // index of the first chunk still held
  private headSkip = 0; // bytes of chunks[head] already released
  /** Offset of the first byte held. */
  start: number;
  /** Offset after the last byte held (= bytes read from the source). */
  end: number;

  constructor(offset = 0) {
    this.start = offset;
    this.end = offset;
  }

  /** Bytes held. */
  get size(): number {
    return this.end - this.start;
  }

  append(data: Uint8Array): void {
    if (data.length === 0) return;
    this.chunks.push(data);
    this.end += data.length;
  }

  /** Forget everything before `offset` (clamped to what is held). */
  release(offset: number): void {
    const target = Math.min(offset, this.end);
    if (target <= this.start) return;
    while (target > this.start) {
      const chunk = this.chunks[this.head]!;
      const left = chunk.length - this.headSkip;
      const step = Math.min(left, target - this.start);
      this.start += step;
      this.headSkip += step;
      if (this.headSkip === chunk.length) {
        this.chunks[this.head] = EMPTY;
        this.head++;
        this.headSkip = 0;
      }
    }
    if (this.head > 64 && this.head * 2 > this.chunks.length) {
      this.chunks = this.chunks.slice(this.head);
      this.head = 0;
    }
  }

  /** Up to `length` bytes from `offset` (which must be held), without copying when possible. */
  read(offset: number, length: number): Uint8Array {
    if (offset < this.start || offset > this.end) {
      throw new RangeError(`offset ${offset} is not held (${this.start} to ${this.end})`);
    }
    const want = Math.min(length, this.end - offset);
    if (want === 0) return EMPTY;
    let position = this.start;
    let index = this.head;
    let skip = this.headSkip;
    // Find the chunk holding `offset`.
    for (;;) {
      const chunk = this.chunks[index]!;
      const available = chunk.length - skip;
      if (offset < position + available) {
        skip += offset - position;
        break;
      }
      position += available;
      index++;
      skip = 0;
    }
    const first = this.chunks[index]!;
    if (first.length - skip >= want) return first.subarray(skip, skip + want);
    const out = new Uint8Array(want);
    let filled = 0;
    while (filled < want) {
      const chunk = this.chunks[index]!;
      const piece = chunk.subarray(skip, skip + Math.min(chunk.length - skip, want - filled));
      out.set(piece, filled);
      filled += piece.length;
      index++;
      skip = 0;
    }
    return out;
  }
}

const EMPTY = new Uint8Array(0);
