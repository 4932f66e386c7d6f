//! Framing: `u32 length | u8 type | body`, big-endian; `length` counts the type byte and body.
//!
//! [`FrameBuffer`] is the receive side: bytes go in as they arrive, whole frames come out, and
//! the length prefix is checked against the link's maximum as soon as its four bytes are
//! there, so the buffer never grows past `max_frame + 4`. [`begin`]/[`end`] are the send side:
//! a message writes its type and body between them and the length is patched in afterwards.

use byteorder::{BigEndian, ByteOrder};

use super::codec::DecodeError;

/// Bytes in the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Largest frame a client may send a tracker before its handshake is done.
pub const MAX_HANDSHAKE_FRAME: usize = 1024;
/// Largest frame on a client-tracker link. An `upload_file` frame carries 20 bytes per 512 KiB
/// piece, so 16 MiB allows files of up to ~400 GiB.
pub const MAX_CLIENT_TRACKER_FRAME: usize = 16 * 1024 * 1024;

/// Smallest amount of free space offered to a read.
const MIN_READ_SPACE: usize = 4096;
/// A buffer larger than this is released once it has been emptied.
const SHRINK_ABOVE: usize = 64 * 1024;
/// The first room given to a large frame beyond what arrived of it; it then doubles.
pub const GROW_STEP: usize = 16 * 1024;

/// Starts a frame of type `frame_type` at the end of `out`; returns the offset for [`end`].
pub fn begin(out: &mut Vec<u8>, frame_type: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, frame_type]);
    start
}

/// Patches the length prefix of the frame begun at `start`.
pub fn end(out: &mut [u8], start: usize) {
    let len = out.len().saturating_sub(start + LEN_PREFIX);
    if let Some(prefix) = out.get_mut(start..start + LEN_PREFIX) {
        BigEndian::write_u32(prefix, u32::try_from(len).unwrap_or(u32::MAX));
    }
}

/// Splits a frame payload (type byte + body) into its parts.
pub fn split(payload: &[u8]) -> Result<(u8, &[u8]), DecodeError> {
    match payload.split_first() {
        Some((ty, body)) => Ok((*ty, body)),
        None => Err(DecodeError::EmptyFrame),
    }
}

/// Receive buffer that yields whole frames.
#[derive(Debug)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
}

impl FrameBuffer {
    pub fn new(max_frame: usize) -> Self {
        FrameBuffer {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_frame,
        }
    }

    /// Changes the link's frame limit (a tracker raises it once the handshake is done).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Bytes of memory the buffer holds (its allocation), whatever it holds now.
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Free space to read into: at least `MIN_READ_SPACE` bytes, and room for the rest of the
    /// frame whose header is buffered as far as its bytes have come: the room grows with what
    /// arrived (doubling from [`GROW_STEP`]), never to the announced length at once, so four
    /// bytes of a length prefix cannot make a connection hold the link's whole frame limit.
    pub fn spare(&mut self) -> &mut [u8] {
        let arrived = self.buffered();
        let want = self
            .frame_need()
            .min(arrived.max(GROW_STEP))
            .max(MIN_READ_SPACE);
        if self.buf.len() - self.end < want {
            // Move the partial frame to the front before growing.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < want {
                self.buf.resize(self.end + want, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were written into [`spare`](Self::spare).
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Bytes still missing from the frame whose header is buffered (0 if none is).
    fn frame_need(&self) -> usize {
        match self.peek_len() {
            Some(len) if len <= self.max_frame => {
                (LEN_PREFIX + len).saturating_sub(self.buffered())
            }
            _ => 0,
        }
    }

    fn peek_len(&self) -> Option<usize> {
        let head = self.buf.get(self.start..self.start + LEN_PREFIX)?;
        if self.buffered() < LEN_PREFIX {
            return None;
        }
        usize::try_from(BigEndian::read_u32(head)).ok()
    }

    /// The next whole frame's payload (type byte + body), `Ok(None)` if none is complete yet,
    /// or an error if the length prefix breaks the link's rules (the connection must close).
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        if self.buffered() < LEN_PREFIX {
            self.maybe_reset();
            return Ok(None);
        }
        let len = self.peek_len().ok_or(DecodeError::Truncated)?;
        if len == 0 {
            return Err(DecodeError::EmptyFrame);
        }
        if len > self.max_frame {
            return Err(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if self.buffered() - LEN_PREFIX < len {
            return Ok(None);
        }
        let from = self.start + LEN_PREFIX;
        self.start = from + len;
        Ok(self.buf.get(from..from + len))
    }

    /// Rewinds an emptied buffer, releasing it if a large frame made it grow.
    fn maybe_reset(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > SHRINK_ABOVE {
                self.buf = Vec::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let start = begin(&mut out, ty);
        out.extend_from_slice(body);
        end(&mut out, start);
        out
    }

    fn feed(fb: &mut FrameBuffer, bytes: &[u8]) {
        let spare = fb.spare();
        spare[..bytes.len()].copy_from_slice(bytes);
        fb.commit(bytes.len());
    }

    #[test]
    fn an_announced_frame_gets_room_only_as_its_bytes_arrive() {
        let max = 16 * 1024 * 1024;
        let mut fb = FrameBuffer::new(max);
        let body = vec![0x5a; max - 1];
        let whole = frame(0x10, &body);
        // The length prefix, the type and a few bytes: a 16 MiB frame announced.
        feed(&mut fb, &whole[..25]);
        assert!(fb.next_frame().unwrap().is_none());
        let room = fb.spare().len();
        assert!(
            room <= GROW_STEP + MIN_READ_SPACE,
            "{room} bytes of room for 25 bytes received"
        );
        assert!(fb.buf.len() < 2 * GROW_STEP, "{} bytes held", fb.buf.len());
        // The rest arrives in reads as large as the room offered: the frame comes out whole,
        // and the buffer never held much more than twice what had arrived.
        let mut at = 25;
        while at < whole.len() {
            let spare = fb.spare();
            let n = spare.len().min(whole.len() - at);
            spare[..n].copy_from_slice(&whole[at..at + n]);
            fb.commit(n);
            at += n;
            assert!(fb.buf.len() <= 2 * at + GROW_STEP + MIN_READ_SPACE);
        }
        let got = fb.next_frame().unwrap().unwrap();
        assert_eq!(got.len(), max);
        assert_eq!(got[0], 0x10);
        assert!(got[1..].iter().all(|b| *b == 0x5a));
    }

    #[test]
    fn golden_frame_bytes() {
        assert_eq!(frame(0x10, b"ab"), vec![0, 0, 0, 3, 0x10, b'a', b'b']);
    }

    #[test]
    fn frames_come_out_whole_whatever_the_split() {
        let mut stream = frame(1, b"hello");
        stream.extend(frame(2, b""));
        stream.extend(frame(3, &[7u8; 5000]));
        for chunk in [1, 2, 3, 5, 7, 4096] {
            let mut fb = FrameBuffer::new(10_000);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                feed(&mut fb, piece);
                while let Some(f) = fb.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got.len(), 3, "chunk {chunk}");
            assert_eq!(got[0], b"\x01hello");
            assert_eq!(got[1], b"\x02");
            assert_eq!(got[2].len(), 5001);
            assert_eq!(fb.buffered(), 0);
        }
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let mut fb = FrameBuffer::new(100);
        feed(&mut fb, &[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            fb.next_frame(),
            Err(DecodeError::FrameTooLarge { .. })
        ));
        // The buffer did not grow to hold the announced frame.
        assert!(fb.spare().len() < 10_000);
    }

    #[test]
    fn zero_length_prefix_is_an_error() {
        let mut fb = FrameBuffer::new(100);
        feed(&mut fb, &[0, 0, 0, 0]);
        assert_eq!(fb.next_frame(), Err(DecodeError::EmptyFrame));
    }

    #[test]
    fn big_buffer_is_released_when_emptied() {
        let mut fb = FrameBuffer::new(1 << 20);
        let big = frame(9, &vec![1u8; 200_000]);
        for piece in big.chunks(4096) {
            feed(&mut fb, piece);
            while fb.next_frame().unwrap().is_some() {}
        }
        assert!(fb.next_frame().unwrap().is_none());
        assert_eq!(fb.buf.len(), 0);
    }
}
