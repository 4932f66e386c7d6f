//! Memory-mapped files, and the only `unsafe` code of the crate.
//!
//! A shared file is read through a read-only map of its source path ([`SourceMap`]), so hashing
//! and serving pieces never copy it through an intermediate buffer. A download lands in
//! `<target>.part`, created at full size and mapped read-write ([`PartFile`]), so block data goes
//! from the socket straight into the file's pages.
//!
//! The ownership rule for piece bytes lives here and is enforced by types and per-piece states:
//! a piece's bytes belong to the writer until the piece is complete (`Writable`: only
//! [`PartFile::write_with`] touches them, through `&mut PartFile`), to the hasher while it
//! verifies (`Hashing`: only the one [`HashTicket`] reads them), and are read-only afterwards
//! (`ReadOnly`: any [`PartReader`]). Every change of state is a compare-and-swap from the one
//! state it may leave: `seal` takes a piece from `Writable` to `Hashing` and hands out its one
//! [`HashTicket`]; the ticket is *consumed* by its verdict ([`HashTicket::verified`] swaps
//! `Hashing` for `ReadOnly` at once, [`HashTicket::failed`] leaves the piece `Hashing`), and
//! [`PartFile::finish`] takes the resulting [`Verdict`] back: a failed piece goes back to
//! `Writable` only then, when no hasher can still be reading it. `ReadOnly` is final: nothing
//! swaps out of it, so a slice a [`PartReader`] lent can never be written under its owner, and
//! "verified, then failed" cannot be expressed, as this does not compile:
//!
//! ```compile_fail
//! # fn demo(part: &mut p2pshare::storage::PartFile, ticket: p2pshare::storage::HashTicket) {
//! let verdict = ticket.verified();
//! part.finish(ticket.failed()); // error: use of moved value `ticket`
//! # }
//! ```

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use memmap2::{Advice, Mmap, MmapRaw};

/// A read-only view of a whole file. An empty file has no map (mapping zero bytes fails).
#[derive(Debug)]
pub struct SourceMap {
    map: Option<Mmap>,
}

impl SourceMap {
    /// Opens and maps `path`, which must be a regular file.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        if meta.len() == 0 {
            return Ok(SourceMap { map: None });
        }
        // SAFETY: the map is read-only and we never create a `&mut` to it. Another process may
        // still change the file while it is mapped; the bytes we read are then whatever the
        // file holds, which is why every piece is verified against its SHA1 by whoever
        // receives it. Truncation by another process can raise SIGBUS on access; that is the
        // documented limit of mapping files (ripgrep and others accept it the same way).
        let map = unsafe { Mmap::map(&file)? };
        let _ = map.advise(Advice::Sequential);
        Ok(SourceMap { map: Some(map) })
    }

    pub fn len(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

const WRITABLE: u8 = 0;
const HASHING: u8 = 1;
const READ_ONLY: u8 = 2;

/// What the writer, the hasher and the readers share: the map and each piece's state.
struct PartShared {
    /// `None` for an empty file (mapping zero bytes fails).
    map: Option<MmapRaw>,
    len: u64,
    piece_len: u64,
    states: Vec<AtomicU8>,
}

impl PartShared {
    /// The byte range of `piece` within the file, if the piece exists.
    fn piece_range(&self, piece: u32) -> Option<(usize, usize)> {
        let idx = usize::try_from(piece).ok()?;
        if idx >= self.states.len() {
            return None;
        }
        let start = u64::from(piece) * self.piece_len;
        let end = (start + self.piece_len).min(self.len);
        Some((usize::try_from(start).ok()?, usize::try_from(end).ok()?))
    }

    fn state(&self, piece: u32) -> Option<u8> {
        self.states
            .get(usize::try_from(piece).ok()?)
            .map(|s| s.load(Ordering::Acquire))
    }

    /// The bytes of `[start, end)`. Callers check the piece state first.
    fn bytes(&self, start: usize, end: usize) -> &[u8] {
        match &self.map {
            // SAFETY: `start <= end <= len` (from `piece_range`) and the map is `len` bytes long,
            // so the range is inside the mapping, which lives as long as `self`. The callers
            // (`HashTicket::bytes`, `PartReader::piece`) only read pieces in the `Hashing` or
            // `ReadOnly` state, and no `&mut` to such a piece can exist: `write_with` refuses
            // every piece that is not `Writable`, and a piece only goes back to `Writable` when
            // its ticket (and so every borrow from it) is gone.
            Some(map) if end > start => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(start), end - start)
            },
            _ => &[],
        }
    }
}

/// The destination of a download, `<target>.part`, mapped read-write. Owned by the one thread
/// that writes blocks; hashing and serving go through [`HashTicket`] and [`PartReader`].
pub struct PartFile {
    shared: Arc<PartShared>,
    file: File,
    /// Pieces whose pages were already faulted in for writing (see `write_with`).
    populated: Vec<bool>,
}

/// Read-only access to the verified pieces of a [`PartFile`], for serving them to peers. Cheap
/// to clone and usable from any thread.
#[derive(Clone)]
pub struct PartReader {
    shared: Arc<PartShared>,
}

/// The right to read one complete piece while it is verified. There is exactly one per piece
/// in the `Hashing` state; its verdict ([`HashTicket::verified`] or [`HashTicket::failed`])
/// consumes it, and the [`Verdict`] goes back to [`PartFile::finish`].
pub struct HashTicket {
    shared: Arc<PartShared>,
    piece: u32,
}

/// What became of a piece's check. It can no longer read the piece; a failed verdict is the
/// only way to make the piece `Writable` again (through [`PartFile::finish`]).
pub struct Verdict {
    shared: Arc<PartShared>,
    piece: u32,
    ok: bool,
}

impl Verdict {
    pub fn piece(&self) -> u32 {
        self.piece
    }

    /// Whether the piece matched its digest (it is then `ReadOnly` for good).
    pub fn ok(&self) -> bool {
        self.ok
    }
}

impl PartFile {
    /// Creates `path` (which must not exist) at `len` bytes and maps it. Pieces are
    /// `piece_len` bytes long (the last may be shorter); all start `Writable`.
    pub fn create(path: &Path, len: u64, piece_len: u32) -> io::Result<Self> {
        if piece_len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "piece length 0",
            ));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(len)?;
        Self::map_file(file, len, piece_len)
    }

    /// Opens the existing `path` (a `.part` left by an interrupted download), which must be
    /// `len` bytes long, and maps it without changing its contents. Every piece starts
    /// `Writable`: what it holds counts only once a [`HashTicket`] has verified it.
    pub fn open_existing(path: &Path, len: u64, piece_len: u32) -> io::Result<Self> {
        if piece_len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "piece length 0",
            ));
        }
        let file = File::options().read(true).write(true).open(path)?;
        let actual = file.metadata()?.len();
        if actual != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{actual} bytes, expected {len}"),
            ));
        }
        Self::map_file(file, len, piece_len)
    }

    fn map_file(file: File, len: u64, piece_len: u32) -> io::Result<Self> {
        let n_pieces = usize::try_from(len.div_ceil(u64::from(piece_len)))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
        let map = if len == 0 {
            None
        } else {
            // Pages are faulted in a piece at a time by `write_with`, without readahead. With
            // the default readahead a write fault zero-fills large folios ahead of the data;
            // measured on the development VM (1 GiB, `cargo bench --bench transfer`, three
            // runs each) that saved CPU from one sharer once the VM's memory was warm (1.7-1.9
            // against 2.1 CPU-s), cost it from four sharers (670-734 against 792-795 MiB/s),
            // and on memory the host had not backed yet spent 57% of the download's CPU in
            // that zeroing (330-420 MiB/s).
            let map = MmapRaw::map_raw(&file)?;
            let _ = map.advise(Advice::Random);
            Some(map)
        };
        Ok(PartFile {
            shared: Arc::new(PartShared {
                map,
                len,
                piece_len: u64::from(piece_len),
                states: (0..n_pieces).map(|_| AtomicU8::new(WRITABLE)).collect(),
            }),
            file,
            populated: vec![false; n_pieces],
        })
    }

    pub fn len(&self) -> u64 {
        self.shared.len
    }

    pub fn is_empty(&self) -> bool {
        self.shared.len == 0
    }

    pub fn n_pieces(&self) -> usize {
        self.shared.states.len()
    }

    pub fn reader(&self) -> PartReader {
        PartReader {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Lends `f` the bytes `[offset, offset + len)` of a `Writable` piece to fill (for example
    /// straight from a socket). `None`, without calling `f`, if the piece is not `Writable` or
    /// the range is not inside the piece.
    pub fn write_with<R>(
        &mut self,
        piece: u32,
        offset: u32,
        len: u32,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Option<R> {
        let (piece_start, piece_end) = self.shared.piece_range(piece)?;
        if self.shared.state(piece)? != WRITABLE {
            return None;
        }
        let start = piece_start.checked_add(usize::try_from(offset).ok()?)?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        if end > piece_end || start >= end {
            return None;
        }
        let map = self.shared.map.as_ref()?;
        if let Some(done @ false) = self.populated.get_mut(piece as usize) {
            // One call faults in the whole piece's pages for writing, instead of one page
            // fault per 4 KiB in the middle of the socket read. Unsupported kernels (before
            // Linux 5.14) just take the faults.
            *done = true;
            let _ = map.advise_range(Advice::PopulateWrite, piece_start, piece_end - piece_start);
        }
        // SAFETY: `[start, end)` lies inside the piece and so inside the mapping. The piece is
        // `Writable`, so no `HashTicket` or `PartReader` reads it (they only read `Hashing` and
        // `ReadOnly` pieces, and a piece leaves `Writable` only through `seal`, which needs
        // `&mut self`). `&mut self` is held for the whole call, so no other `write_with` slice
        // exists at the same time, and the slice cannot escape `f`.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().add(start), end - start) };
        Some(f(bytes))
    }

    /// The piece is complete: from now on only its ticket reads it and nothing writes it.
    /// `None` if the piece is not `Writable`.
    pub fn seal(&mut self, piece: u32) -> Option<HashTicket> {
        let state = self.shared.states.get(usize::try_from(piece).ok()?)?;
        state
            .compare_exchange(WRITABLE, HASHING, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        Some(HashTicket {
            shared: Arc::clone(&self.shared),
            piece,
        })
    }

    /// Takes a piece's verdict back: a good piece is `ReadOnly` already (and stays so), a bad
    /// one goes from `Hashing` back to `Writable` so it can be fetched anew. A verdict on
    /// another file's piece changes nothing.
    pub fn finish(&mut self, verdict: Verdict) {
        if verdict.ok || !Arc::ptr_eq(&verdict.shared, &self.shared) {
            return;
        }
        if let Some(state) = self.shared.states.get(verdict.piece as usize) {
            // Only a piece still `Hashing` may become `Writable`; `ReadOnly` is final.
            let _ = state.compare_exchange(HASHING, WRITABLE, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Whether every piece has been verified.
    pub fn is_complete(&self) -> bool {
        self.shared
            .states
            .iter()
            .all(|s| s.load(Ordering::Acquire) == READ_ONLY)
    }

    /// Writes the mapped pages and the file's metadata to disk.
    pub fn sync(&self) -> io::Result<()> {
        if let Some(map) = &self.shared.map {
            map.flush()?;
        }
        self.file.sync_all()
    }
}

impl HashTicket {
    pub fn piece(&self) -> u32 {
        self.piece
    }

    /// The whole piece.
    pub fn bytes(&self) -> &[u8] {
        match self.shared.piece_range(self.piece) {
            Some((start, end)) => self.shared.bytes(start, end),
            None => &[],
        }
    }

    /// The piece matched its digest: it is `ReadOnly` for good from now on, so every
    /// [`PartReader`] may read it before the verdict reaches the writer.
    pub fn verified(self) -> Verdict {
        let ok = self
            .shared
            .states
            .get(self.piece as usize)
            .is_some_and(|state| {
                state
                    .compare_exchange(HASHING, READ_ONLY, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            });
        Verdict {
            shared: self.shared,
            piece: self.piece,
            ok,
        }
    }

    /// The piece did not match its digest. It stays `Hashing` (unreadable, unwritable) until
    /// the verdict is handed to [`PartFile::finish`].
    pub fn failed(self) -> Verdict {
        Verdict {
            shared: self.shared,
            piece: self.piece,
            ok: false,
        }
    }

    /// [`verified`](Self::verified) or [`failed`](Self::failed), by `ok`.
    pub fn verdict(self, ok: bool) -> Verdict {
        if ok {
            self.verified()
        } else {
            self.failed()
        }
    }
}

impl PartReader {
    /// The bytes `[offset, offset + len)` of a verified piece, or `None` if the piece is not
    /// verified or the range is not inside it.
    pub fn read(&self, piece: u32, offset: u32, len: u32) -> Option<&[u8]> {
        if self.shared.state(piece)? != READ_ONLY {
            return None;
        }
        let (piece_start, piece_end) = self.shared.piece_range(piece)?;
        let start = piece_start.checked_add(usize::try_from(offset).ok()?)?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        if end > piece_end {
            return None;
        }
        Some(self.shared.bytes(start, end))
    }

    /// The whole of a verified piece, or `None` if it is not verified.
    pub fn piece_bytes(&self, piece: u32) -> Option<&[u8]> {
        if self.shared.state(piece)? != READ_ONLY {
            return None;
        }
        let (start, end) = self.shared.piece_range(piece)?;
        Some(self.shared.bytes(start, end))
    }

    pub fn is_verified(&self, piece: u32) -> bool {
        self.shared.state(piece) == Some(READ_ONLY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(part: &mut PartFile, piece: u32, offset: u32, data: &[u8]) -> bool {
        part.write_with(piece, offset, data.len() as u32, |b| {
            b.copy_from_slice(data)
        })
        .is_some()
    }

    #[test]
    fn piece_lifecycle_write_hash_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.part");
        let mut part = PartFile::create(&path, 25, 10).unwrap();
        assert_eq!(part.n_pieces(), 3);
        let reader = part.reader();
        assert!(fill(&mut part, 0, 0, b"01234"));
        assert!(fill(&mut part, 0, 5, b"56789"));
        assert!(reader.read(0, 0, 10).is_none(), "not verified yet");
        let ticket = part.seal(0).unwrap();
        assert!(part.seal(0).is_none(), "one ticket per piece");
        assert!(!fill(&mut part, 0, 0, b"x"), "no writes while hashing");
        let digest = std::thread::spawn(move || {
            let d = crate::hasher::sha1_of(ticket.bytes());
            (ticket, d)
        })
        .join()
        .unwrap();
        assert_eq!(digest.1, crate::hasher::sha1_of(b"0123456789"));
        part.finish(digest.0.verified());
        assert_eq!(reader.read(0, 2, 3).unwrap(), b"234");
        assert!(
            !fill(&mut part, 0, 0, b"x"),
            "verified pieces are read-only"
        );
        assert!(reader.read(0, 8, 3).is_none(), "range past the piece");
        // The last piece is shorter.
        assert!(fill(&mut part, 2, 0, b"abcde"));
        assert!(!fill(&mut part, 2, 3, b"xyz"), "past the end of the file");
        let t = part.seal(2).unwrap();
        assert_eq!(t.bytes(), b"abcde");
        part.finish(t.verified());
        assert!(!part.is_complete());
        assert!(fill(&mut part, 1, 0, b"ABCDEFGHIJ"));
        let t = part.seal(1).unwrap();
        part.finish(t.verified());
        assert!(part.is_complete());
        part.sync().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789ABCDEFGHIJabcde");
    }

    #[test]
    fn failed_piece_is_writable_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut part = PartFile::create(&dir.path().join("f.part"), 4, 4).unwrap();
        assert!(fill(&mut part, 0, 0, b"bad!"));
        let t = part.seal(0).unwrap();
        let verdict = t.failed();
        assert!(
            !fill(&mut part, 0, 0, b"x"),
            "not writable before the verdict is back"
        );
        part.finish(verdict);
        assert!(!part.reader().is_verified(0));
        assert!(fill(&mut part, 0, 0, b"good"));
    }

    #[test]
    fn bad_ranges_and_pieces_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut part = PartFile::create(&dir.path().join("f.part"), 10, 4).unwrap();
        assert!(!fill(&mut part, 3, 0, b"x"), "no such piece");
        assert!(!fill(&mut part, u32::MAX, 0, b"x"));
        assert!(!fill(&mut part, 0, 4, b"x"), "offset at the piece end");
        assert!(part.write_with(0, 0, 0, |_| ()).is_none(), "empty write");
        assert!(part.write_with(0, u32::MAX, u32::MAX, |_| ()).is_none());
        assert!(part.seal(9).is_none());
        assert!(part.reader().read(9, 0, 1).is_none());
    }

    #[test]
    fn existing_target_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.part");
        std::fs::write(&path, b"keep").unwrap();
        assert!(PartFile::create(&path, 10, 4).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }

    #[test]
    fn empty_file_is_complete_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let part = PartFile::create(&dir.path().join("e.part"), 0, 4).unwrap();
        assert_eq!(part.n_pieces(), 0);
        assert!(part.is_complete());
    }

    #[test]
    fn offsets_past_4_gib_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.part");
        let len = 5 * (1u64 << 30) + 3; // sparse: nothing but the last piece is written
        let piece_len = 512 * 1024;
        let mut part = PartFile::create(&path, len, piece_len).unwrap();
        let last = (part.n_pieces() - 1) as u32;
        assert!(fill(&mut part, last, 0, b"xyz"));
        let t = part.seal(last).unwrap();
        assert_eq!(t.bytes(), b"xyz");
        part.finish(t.verified());
        assert_eq!(part.reader().read(last, 1, 2).unwrap(), b"yz");
    }

    /// The sequence issue 10 found aliasing a reader's slice: verify, read, then hand the
    /// ticket back as failed and write. A verdict can no longer be changed after the ticket
    /// gave it (the `compile_fail` example in the module doc), and a failed verdict from
    /// another piece or file cannot reopen a verified piece: the slice stays as it was.
    #[test]
    fn verified_piece_can_never_be_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut part = PartFile::create(&dir.path().join("f.part"), 8, 4).unwrap();
        let reader = part.reader();
        assert!(fill(&mut part, 0, 0, b"good"));
        assert!(fill(&mut part, 1, 0, b"bad!"));
        let ticket = part.seal(0).unwrap();
        let other = part.seal(1).unwrap();
        let verdict = ticket.verified();
        let s = reader.read(0, 0, 4).unwrap();
        part.finish(verdict);
        // The closest expressible attempt: a failed verdict, for another piece.
        part.finish(other.failed());
        assert!(part.write_with(0, 0, 4, |b| b.fill(b'X')).is_none());
        assert!(
            part.seal(0).is_none(),
            "a verified piece cannot be sealed again"
        );
        assert_eq!(s, b"good");
        // A failed verdict from another file does not reopen anything.
        let mut other_part = PartFile::create(&dir.path().join("g.part"), 8, 4).unwrap();
        assert!(fill(&mut other_part, 0, 0, b"zzzz"));
        part.finish(other_part.seal(0).unwrap().failed());
        assert!(reader.is_verified(0));
        assert_eq!(reader.read(0, 0, 4).unwrap(), b"good");
        // A failed piece is writable again once its verdict is back, not before.
        assert!(fill(&mut part, 1, 0, b"new!"));
    }

    /// A `.part` opened again keeps its bytes; nothing in it counts until it is verified.
    #[test]
    fn an_existing_part_opens_with_its_bytes_and_nothing_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.part");
        std::fs::write(&path, b"0123456789abcde").unwrap();
        assert!(
            PartFile::open_existing(&path, 16, 10).is_err(),
            "wrong length"
        );
        assert!(PartFile::open_existing(&path, 15, 0).is_err());
        assert!(PartFile::open_existing(&dir.path().join("none"), 15, 10).is_err());
        let mut part = PartFile::open_existing(&path, 15, 10).unwrap();
        let reader = part.reader();
        assert!(!reader.is_verified(0) && reader.read(0, 0, 10).is_none());
        let t = part.seal(0).unwrap();
        assert_eq!(t.bytes(), b"0123456789");
        part.finish(t.verified());
        assert_eq!(reader.read(0, 0, 10).unwrap(), b"0123456789");
        assert!(fill(&mut part, 1, 0, b"ABCDE"));
        part.sync().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789ABCDE");
    }
}
