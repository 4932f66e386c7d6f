//! A framed, buffered, non-blocking TCP connection and the slab table that owns them.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::secure::{SecureError, SecureLink};
use super::ConnId;
use crate::wire::frame::FrameBuffer;
use crate::wire::DecodeError;

/// Once this many bytes wait to be written, the connection stops reading requests until the
/// peer has taken some: a client that pipelines without reading cannot grow our memory.
pub const MAX_PENDING_WRITE: usize = 4 * 1024 * 1024;
/// Room an emptied send buffer keeps for the next writes; more is given back.
const KEEP_WRITE_CAPACITY: usize = 256 * 1024;

/// Why a connection must be closed.
#[derive(Debug)]
pub enum ConnError {
    Io(io::Error),
    Decode(DecodeError),
    /// The secure layer failed (handshake, preamble, or a record that did not authenticate).
    Secure(SecureError),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "io error: {e}"),
            ConnError::Decode(e) => write!(f, "{e}"),
            ConnError::Secure(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

impl From<SecureError> for ConnError {
    fn from(e: SecureError) -> Self {
        ConnError::Secure(e)
    }
}

impl From<DecodeError> for ConnError {
    fn from(e: DecodeError) -> Self {
        ConnError::Decode(e)
    }
}

/// How a call to [`Conn::read_frames`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// The socket has nothing more for now: it said `WouldBlock`, or (with
    /// [`Conn::set_short_reads_end`]) a read returned less than it had room for.
    WouldBlock,
    /// The peer closed its side; every frame before the close was handled.
    Eof,
    /// The frame budget was used up; more may be waiting (call again later).
    Budget,
    /// The handler asked to stop (for example, the connection is being closed).
    Stopped,
}

/// Bytes sent straight from where they live (a memory-mapped file), without a copy into the
/// send buffer. The value keeps the bytes alive until they are written.
pub trait MappedSlice: Send {
    fn bytes(&self) -> &[u8];
}

/// A mapped slice queued behind the send buffer's first `at` bytes.
struct MappedSeg {
    at: usize,
    data: Box<dyn MappedSlice>,
    sent: usize,
}

/// Most buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;

/// One connection: the socket, its receive and send buffers, and the owner's data `T`.
pub struct Conn<T> {
    pub stream: TcpStream,
    pub id: ConnId,
    token: Token,
    rbuf: FrameBuffer,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Mapped data interleaved with `wbuf`, in order.
    mapped: VecDeque<MappedSeg>,
    /// Unsent bytes of `mapped`.
    mapped_pending: usize,
    writable_registered: bool,
    /// Set while reading is suspended because too much output is pending.
    pub read_paused: bool,
    /// When set, every byte read is decrypted by it and every byte written encrypted: the
    /// frame buffer and the send buffer hold plaintext, so the code above sees frames only.
    secure: Option<Box<SecureLink>>,
    /// A read that returned fewer bytes than it had room for ends the reading (see
    /// [`set_short_reads_end`](Self::set_short_reads_end)).
    short_reads_end: bool,
    /// Reads made on the socket (tests count them).
    #[cfg(test)]
    socket_reads: usize,
    pub data: T,
}

impl<T> Conn<T> {
    /// Registers `stream` for reading under `token` and wraps it. Connections outside a
    /// [`ConnTable`] (a client's tracker link) are made this way.
    pub fn new(
        registry: &Registry,
        mut stream: TcpStream,
        token: Token,
        id: ConnId,
        max_frame: usize,
        data: T,
    ) -> io::Result<Self> {
        registry.register(&mut stream, token, Interest::READABLE)?;
        Ok(Conn {
            stream,
            id,
            token,
            rbuf: FrameBuffer::new(max_frame),
            wbuf: Vec::new(),
            wpos: 0,
            mapped: VecDeque::new(),
            mapped_pending: 0,
            writable_registered: false,
            read_paused: false,
            secure: None,
            short_reads_end: false,
            #[cfg(test)]
            socket_reads: 0,
            data,
        })
    }

    /// Puts a secure layer between the socket and the buffers. Call it before anything is
    /// read or written; its handshake bytes go out with the next [`flush`](Self::flush), and
    /// plaintext queued meanwhile waits until the handshake is done.
    pub fn set_secure(&mut self, link: SecureLink) {
        self.secure = Some(Box::new(link));
    }

    /// Whether a short read ends [`read_frames`](Self::read_frames) (off by default).
    ///
    /// With edge-triggered readiness (mio's, epoll on Linux) a `recv` that returned fewer
    /// bytes than it had room for emptied the socket's receive queue at that moment, and any
    /// byte arriving later raises a new readiness event; so the read that would only say
    /// `WouldBlock` can be skipped, and a request costs one `recv`, not two (tokio's
    /// `PollEvented` read path relies on the same). A read that filled its room reads again.
    /// A peer's close is the exception: the end of input that arrived with the last bytes
    /// raises no later event, so an owner that turns this on must turn it off for good once
    /// an event reports the peer's close or an error (`is_read_closed`, `is_error`); the
    /// reads then go on to the end of input. Owners that stop reading for their own reasons
    /// (a frame budget, back-pressure) must call again without waiting for an event, as
    /// they already must when the socket may still hold bytes.
    pub fn set_short_reads_end(&mut self, on: bool) {
        self.short_reads_end = on;
    }

    /// Reads made on the socket so far.
    #[cfg(test)]
    pub fn socket_reads(&self) -> usize {
        self.socket_reads
    }

    /// The connection runs over a secure layer.
    pub fn is_secure(&self) -> bool {
        self.secure.is_some()
    }

    /// The secure layer, if any (to ask whether its handshake is done).
    pub fn secure(&self) -> Option<&SecureLink> {
        self.secure.as_deref()
    }

    /// Asks for `WRITABLE` readiness, which tells when a non-blocking connect has finished
    /// (check `stream.take_error()` then); [`flush`](Self::flush) drops it again once nothing
    /// is pending.
    pub fn await_connect(&mut self, registry: &Registry) -> io::Result<()> {
        registry.reregister(
            &mut self.stream,
            self.token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.writable_registered = true;
        Ok(())
    }

    /// Deregisters the socket; dropping the connection afterwards closes it.
    pub fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }

    /// Raises or lowers the largest frame accepted from the peer.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.rbuf.set_max_frame(max_frame);
    }

    /// The send buffer: encode messages straight into it, then call [`flush`](Self::flush).
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.wbuf
    }

    /// The socket, the owner's data and the send buffer at once (a link whose data holds its
    /// record layer seals into the buffer).
    pub fn parts(&mut self) -> (&mut TcpStream, &mut T, &mut Vec<u8>) {
        (&mut self.stream, &mut self.data, &mut self.wbuf)
    }

    /// Queues `data` to be sent after everything queued so far, straight from its memory.
    pub fn queue_mapped(&mut self, data: Box<dyn MappedSlice>) {
        let len = data.bytes().len();
        if len > 0 {
            self.mapped_pending += len;
            self.mapped.push_back(MappedSeg {
                at: self.wbuf.len(),
                data,
                sent: 0,
            });
        }
    }

    /// Bytes of memory its receive and send buffers hold (their allocations; mapped data
    /// and the secure layer's fixed buffers are not counted).
    pub fn held(&self) -> usize {
        self.rbuf.held() + self.wbuf.capacity()
    }

    /// Bytes queued but not yet written to the socket (with a secure layer: plaintext not yet
    /// sealed plus records and handshake bytes not yet sent).
    pub fn pending_write(&self) -> usize {
        let sealed = self.secure.as_ref().map_or(0, |s| s.pending_out());
        self.wbuf.len() - self.wpos + self.mapped_pending + sealed
    }

    /// One `write` (or `writev` when mapped data is queued); the number of bytes taken.
    fn write_some(&mut self) -> io::Result<usize> {
        if self.mapped.is_empty() {
            return self.stream.write(&self.wbuf[self.wpos..]);
        }
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOVECS);
        let mut pos = self.wpos;
        for seg in &self.mapped {
            if iov.len() + 2 > MAX_IOVECS {
                break;
            }
            if seg.at > pos {
                iov.push(IoSlice::new(&self.wbuf[pos..seg.at]));
            }
            pos = seg.at;
            iov.push(IoSlice::new(&seg.data.bytes()[seg.sent..]));
        }
        if iov.len() < MAX_IOVECS && self.wbuf.len() > pos && self.mapped.len() <= MAX_IOVECS / 2 {
            iov.push(IoSlice::new(&self.wbuf[pos..]));
        }
        self.stream.write_vectored(&iov)
    }

    /// Marks `n` written bytes as sent, walking `wbuf` and the mapped segments in order.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            match self.mapped.front_mut() {
                Some(seg) if seg.at == self.wpos => {
                    let left = seg.data.bytes().len() - seg.sent;
                    let take = n.min(left);
                    seg.sent += take;
                    self.mapped_pending -= take;
                    n -= take;
                    if take == left {
                        self.mapped.pop_front();
                    }
                }
                front => {
                    let limit = front.map_or(self.wbuf.len(), |seg| seg.at);
                    let take = n.min(limit - self.wpos);
                    if take == 0 {
                        return;
                    }
                    self.wpos += take;
                    n -= take;
                }
            }
        }
    }

    /// Reads what the socket has and calls `on_frame` with each whole frame's payload, at most
    /// `max_frames` times. `on_frame` returns `false` to stop early.
    pub fn read_frames(
        &mut self,
        max_frames: usize,
        mut on_frame: impl FnMut(&[u8]) -> bool,
    ) -> Result<ReadEnd, ConnError> {
        let mut handled = 0;
        // A short read emptied the socket (see `set_short_reads_end`): what is buffered is
        // handled, then the reading ends without asking the socket again.
        let mut drained = false;
        loop {
            // Frames already buffered go first: a close or an error after them must not
            // lose them.
            while let Some(payload) = self.rbuf.next_frame()? {
                handled += 1;
                if !on_frame(payload) {
                    return Ok(ReadEnd::Stopped);
                }
                if handled >= max_frames {
                    return Ok(ReadEnd::Budget);
                }
            }
            if let Some(secure) = self.secure.as_deref_mut() {
                // Plaintext already decrypted goes to the frame buffer first; only then is
                // the socket read again (into the secure layer's bounded input buffer).
                let n = secure.read_plain(self.rbuf.spare())?;
                if n > 0 {
                    self.rbuf.commit(n);
                    continue;
                }
                if drained {
                    return Ok(ReadEnd::WouldBlock);
                }
                let spare = secure.spare();
                let room = spare.len();
                #[cfg(test)]
                {
                    self.socket_reads += 1;
                }
                match self.stream.read(spare) {
                    Ok(0) => return Ok(ReadEnd::Eof),
                    Ok(n) => {
                        secure.commit(n);
                        drained = self.short_reads_end && n < room;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(ReadEnd::WouldBlock)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(ConnError::Io(e)),
                }
                continue;
            }
            if drained {
                return Ok(ReadEnd::WouldBlock);
            }
            let spare = self.rbuf.spare();
            let room = spare.len();
            #[cfg(test)]
            {
                self.socket_reads += 1;
            }
            match self.stream.read(spare) {
                Ok(0) => return Ok(ReadEnd::Eof),
                Ok(n) => {
                    self.rbuf.commit(n);
                    drained = self.short_reads_end && n < room;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadEnd::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
    }

    /// Writes pending bytes until done or `WouldBlock`, and keeps `WRITABLE` interest exactly
    /// while bytes remain.
    pub fn flush(&mut self, registry: &Registry) -> io::Result<()> {
        if self.secure.is_some() {
            self.flush_secure()?;
        }
        while self.secure.is_none() && (self.wpos < self.wbuf.len() || !self.mapped.is_empty()) {
            match self.write_some() {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.wpos == self.wbuf.len() && self.mapped.is_empty() {
            self.wbuf.clear();
            self.wpos = 0;
            if self.wbuf.capacity() > KEEP_WRITE_CAPACITY {
                // A burst's room is given back once written, so that idle connections do
                // not keep it (a tracker counts it against its memory budget).
                self.wbuf = Vec::new();
            }
        } else if self.wpos > self.wbuf.len() / 2 {
            self.wbuf.drain(..self.wpos);
            for seg in &mut self.mapped {
                seg.at -= self.wpos;
            }
            self.wpos = 0;
        }
        let want_writable = match &self.secure {
            // Plaintext that cannot be sealed before the handshake is done is not a reason
            // to wait for the socket.
            Some(secure) => secure.pending_out() > 0,
            None => self.wpos < self.wbuf.len() || !self.mapped.is_empty(),
        };
        if want_writable != self.writable_registered {
            let interest = if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry.reregister(&mut self.stream, self.token, interest)?;
            self.writable_registered = want_writable;
        }
        Ok(())
    }
}

impl<T> Conn<T> {
    /// With a secure layer: seals queued plaintext (the send buffer and mapped segments, in
    /// order) into records and writes them, until everything is sent or the socket is full.
    fn flush_secure(&mut self) -> io::Result<()> {
        loop {
            self.seal_pending()?;
            let Some(secure) = self.secure.as_deref_mut() else {
                return Ok(());
            };
            if secure.pending_out() == 0 {
                return Ok(());
            }
            match self.stream.write(secure.outgoing()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => secure.advance_outgoing(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Hands queued plaintext to the secure layer while it takes it.
    fn seal_pending(&mut self) -> io::Result<()> {
        // Taken out for the loop (`advance` needs all of `self`), always put back.
        let Some(mut secure) = self.secure.take() else {
            return Ok(());
        };
        let result = self.seal_into(&mut secure);
        self.secure = Some(secure);
        result
    }

    fn seal_into(&mut self, secure: &mut SecureLink) -> io::Result<()> {
        loop {
            // The next contiguous plaintext: a mapped segment due now, or send-buffer bytes up
            // to the next segment.
            let chunk = match self.mapped.front() {
                Some(seg) if seg.at == self.wpos => &seg.data.bytes()[seg.sent..],
                front => {
                    let limit = front.map_or(self.wbuf.len(), |seg| seg.at);
                    &self.wbuf[self.wpos..limit]
                }
            };
            if chunk.is_empty() {
                return Ok(());
            }
            let n = secure.seal(chunk).map_err(io::Error::other)?;
            if n == 0 {
                return Ok(());
            }
            self.advance(n);
        }
    }
}

/// Slab keys are offset by this in mio tokens; smaller tokens name listeners, wakers, signals.
pub const FIRST_CONN_TOKEN: usize = 16;

/// Where a non-blocking connect stands once its socket reported readiness.
#[derive(Debug)]
pub enum ConnectProgress {
    Connected,
    /// Not yet: a readiness event that came before the connect completed.
    Pending,
    Failed(io::Error),
}

/// Asks the socket of a non-blocking connect how it went (the error it holds, else whether it
/// has a peer), as mio's documentation prescribes.
pub fn connect_progress(stream: &TcpStream) -> ConnectProgress {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => ConnectProgress::Failed(e),
        Ok(None) => match stream.peer_addr() {
            Ok(_) => ConnectProgress::Connected,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => ConnectProgress::Pending,
            Err(e) => ConnectProgress::Failed(e),
        },
    }
}

pub fn token_of(key: usize) -> Token {
    Token(key + FIRST_CONN_TOKEN)
}

/// The slab key a token names, if it names a connection.
pub fn key_of(token: Token) -> Option<usize> {
    token.0.checked_sub(FIRST_CONN_TOKEN)
}

/// Every open connection of a reactor.
pub struct ConnTable<T> {
    slab: Slab<Conn<T>>,
    next_generation: u64,
}

impl<T> Default for ConnTable<T> {
    fn default() -> Self {
        ConnTable {
            slab: Slab::new(),
            next_generation: 0,
        }
    }
}

impl<T> ConnTable<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Registers `stream` for reading and takes ownership of it.
    pub fn insert(
        &mut self,
        registry: &Registry,
        stream: TcpStream,
        max_frame: usize,
        data: T,
    ) -> io::Result<ConnId> {
        let entry = self.slab.vacant_entry();
        self.next_generation += 1;
        let id = ConnId {
            key: entry.key(),
            generation: self.next_generation,
        };
        entry.insert(Conn::new(
            registry,
            stream,
            token_of(id.key),
            id,
            max_frame,
            data,
        )?);
        Ok(id)
    }

    pub fn get(&self, id: ConnId) -> Option<&Conn<T>> {
        self.slab.get(id.key).filter(|c| c.id == id)
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn<T>> {
        self.slab.get_mut(id.key).filter(|c| c.id == id)
    }

    /// The connection a mio token names.
    pub fn by_token(&mut self, token: Token) -> Option<&mut Conn<T>> {
        self.slab.get_mut(key_of(token)?)
    }

    /// Deregisters and drops the connection (closing the socket).
    pub fn remove(&mut self, registry: &Registry, id: ConnId) -> Option<Conn<T>> {
        self.get(id)?;
        let mut conn = self.slab.remove(id.key);
        conn.deregister(registry);
        Some(conn)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Conn<T>> {
        self.slab.iter().map(|(_, c)| c)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Conn<T>> {
        self.slab.iter_mut().map(|(_, c)| c)
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
