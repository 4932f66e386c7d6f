//! The resume record of a download: `<target>.part.resume`, beside the `.part` (both named
//! from a shortened target name when the target's name is too long for the suffixes), says that
//! this program wrote that `.part` for a given content and which of its pieces were verified.
//! A `download_file` onto the same target resumes from it; a `.part` without a record that
//! matches (someone's own file, another content) is never touched.
//!
//! Layout (big-endian): `magic "P2PPART1" | sha1 file_sha1 | u64 size | u32 piece_len | u64
//! part_dev | u64 part_ino | u32 n_pieces | bitfield (ceil(n_pieces / 8) bytes, most
//! significant bit first) | u32 crc32c(all before)`. The device and inode name the `.part` the
//! record was written for, so a `.part` replaced by another file of the same name and size is
//! not taken for ours.
//!
//! The record is created durably (temporary file, fsync, rename, fsync of the directory)
//! before the first byte is downloaded, so a `.part` this program created always has one. The
//! set of verified pieces is then rewritten (temporary file and rename, without fsync) at most
//! every [`RECORD_INTERVAL`] while pieces verify and when the client exits; it is a hint, not a
//! promise: every piece it lists is verified again on the hasher pool before it counts, so a
//! record newer than the data that reached the disk (a power cut) costs only a re-fetch.
//! This module is the record's encoding and its file operations; it decides nothing about the
//! download.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bitfield::Bitfield;
use crate::wire::codec::{put_sha1, put_u32, put_u64, Reader};
use crate::wire::tracker_link::FileMeta;
use crate::wire::Sha1Digest;

const MAGIC: &[u8; 8] = b"P2PPART1";
/// How often, at most, the verified pieces are written while a download runs.
pub const RECORD_INTERVAL: Duration = Duration::from_millis(50);
/// Largest record read (a 64 GiB file in 512 KiB pieces needs 16 KiB of bitfield).
pub const MAX_RECORD_LEN: u64 = 16 * 1024 * 1024;

/// What the record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRecord {
    pub file_sha1: Sha1Digest,
    pub size: u64,
    pub piece_len: u32,
    pub part_dev: u64,
    pub part_ino: u64,
    pub verified: Bitfield,
}

/// What a target's existing `.part` is to a download of some content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No `.part`: a fresh download.
    Nothing,
    /// Ours, for this content: these pieces were verified (check them again).
    Resume { verified: Bitfield },
    /// Not ours for this content: leave it alone (the reason says why).
    Foreign(String),
}

/// Longest file name a Linux file system takes (bytes), `NAME_MAX`.
const NAME_MAX: usize = 255;
/// The longest suffix a target's name gets: the record's temporary file while it is rewritten.
const LONGEST_SUFFIX: &str = ".part.resume.tmp";

/// `<target>.part`, or for a target whose name is too long to take the suffixes (more than
/// 239 bytes), a shortened form of it (see [`stem`]).
pub fn part_path(target: &Path) -> PathBuf {
    with_suffix(target, ".part")
}

/// `<target>.part.resume`, shortened like [`part_path`].
pub fn record_path(target: &Path) -> PathBuf {
    with_suffix(target, ".part.resume")
}

fn with_suffix(target: &Path, suffix: &str) -> PathBuf {
    let mut name = stem(target);
    name.push(suffix);
    PathBuf::from(name)
}

/// What the suffixes are appended to: the target itself, or, when its file name plus
/// `.part.resume.tmp` would pass `NAME_MAX` (so the record could not be written), the directory
/// joined with the name's first bytes (cut at a character boundary), `~` and 16 hex digits of
/// the SHA1 of the whole name. Distinct long names get distinct stems, and the stem of a name
/// is always the same, so an interrupted download of it is found again.
fn stem(target: &Path) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStrExt;
    let Some(name) = target.file_name() else {
        return target.as_os_str().to_owned();
    };
    let bytes = name.as_bytes();
    if bytes.len() + LONGEST_SUFFIX.len() <= NAME_MAX {
        return target.as_os_str().to_owned();
    }
    use sha1::Digest;
    let digest = sha1::Sha1::digest(bytes);
    let tag: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut keep = NAME_MAX - LONGEST_SUFFIX.len() - 1 - tag.len();
    // A cut inside a UTF-8 character would make the name invalid text.
    while keep > 0 && (bytes[keep] & 0b1100_0000) == 0b1000_0000 {
        keep -= 1;
    }
    let mut short = std::ffi::OsStr::from_bytes(&bytes[..keep]).to_owned();
    short.push("~");
    short.push(tag);
    target.with_file_name(short).into_os_string()
}

impl PartRecord {
    /// A record of `meta` for the `.part` whose metadata is `part`, nothing verified yet.
    pub fn new(meta: &FileMeta, part: &fs::Metadata) -> PartRecord {
        PartRecord {
            file_sha1: meta.file_sha1,
            size: meta.size,
            piece_len: meta.piece_len,
            part_dev: part.dev(),
            part_ino: part.ino(),
            verified: Bitfield::new(meta.piece_hashes.len()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.verified.as_bytes().len());
        out.extend_from_slice(MAGIC);
        put_sha1(&mut out, &self.file_sha1);
        put_u64(&mut out, self.size);
        put_u32(&mut out, self.piece_len);
        put_u64(&mut out, self.part_dev);
        put_u64(&mut out, self.part_ino);
        put_u32(&mut out, self.verified.len() as u32);
        out.extend_from_slice(self.verified.as_bytes());
        let crc = crc32c::crc32c(&out);
        put_u32(&mut out, crc);
        out
    }

    /// Any damage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<PartRecord, String> {
        if bytes.len() < 4 {
            return Err("truncated".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let mut r = Reader::new(body);
        let magic: [u8; 8] = r.array().map_err(|e| e.to_string())?;
        if &magic != MAGIC {
            return Err("not a p2pshare resume record".into());
        }
        let crc = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32c::crc32c(body) != crc {
            return Err("checksum mismatch".into());
        }
        let bad = |e: crate::wire::codec::DecodeError| e.to_string();
        let file_sha1 = r.sha1().map_err(bad)?;
        let size = r.u64().map_err(bad)?;
        let piece_len = r.u32().map_err(bad)?;
        let part_dev = r.u64().map_err(bad)?;
        let part_ino = r.u64().map_err(bad)?;
        let n_pieces = r.u32().map_err(bad)? as usize;
        if piece_len == 0 || FileMeta::n_pieces_for(size, piece_len) != n_pieces as u64 {
            return Err("piece count does not match the size".into());
        }
        let bytes = r.bytes(n_pieces.div_ceil(8)).map_err(bad)?;
        let verified = Bitfield::from_bytes(bytes, n_pieces).ok_or("bad bitfield")?;
        r.finish().map_err(bad)?;
        Ok(PartRecord {
            file_sha1,
            size,
            piece_len,
            part_dev,
            part_ino,
            verified,
        })
    }

    /// Whether this record is of `meta`'s content.
    pub fn is_of(&self, meta: &FileMeta) -> bool {
        self.file_sha1 == meta.file_sha1
            && self.size == meta.size
            && self.piece_len == meta.piece_len
            && self.verified.len() == meta.piece_hashes.len()
    }
}

/// What `target`'s `.part` is to a download of `meta`. Reads only.
pub fn inspect(target: &Path, meta: &FileMeta) -> Found {
    let part = part_path(target);
    let part_meta = match part.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Found::Nothing,
        Err(e) => return Found::Foreign(format!("cannot be examined ({e})")),
    };
    if !part_meta.file_type().is_file() {
        return Found::Foreign("is not a regular file".into());
    }
    let record_file = record_path(target);
    let bytes = match fs::File::open(&record_file).and_then(|f| {
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut io::Read::take(f, MAX_RECORD_LEN), &mut bytes)?;
        Ok(bytes)
    }) {
        Ok(b) => b,
        Err(_) => return Found::Foreign("was not written by a download of this program".into()),
    };
    let record = match PartRecord::decode(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return Found::Foreign(format!(
                "has no usable resume record ({} is damaged: {e})",
                record_file.display()
            ))
        }
    };
    if record.part_dev != part_meta.dev() || record.part_ino != part_meta.ino() {
        return Found::Foreign("is not the file its resume record was written for".into());
    }
    if !record.is_of(meta) || part_meta.len() != meta.size {
        return Found::Foreign("holds a download of other content".into());
    }
    Found::Resume {
        verified: record.verified,
    }
}

/// Writes `target`'s record; `durable` also fsyncs the file and the directory.
pub fn write(target: &Path, record: &PartRecord, durable: bool) -> io::Result<()> {
    let path = record_path(target);
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = fs::File::create(&tmp)?;
    io::Write::write_all(&mut file, &record.encode())?;
    if durable {
        file.sync_all()?;
    }
    drop(file);
    fs::rename(&tmp, &path)?;
    if durable {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

/// Removes `target`'s record (the download completed or failed for good).
pub fn remove(target: &Path) {
    let _ = fs::remove_file(record_path(target));
}

#[cfg(test)]
#[path = "part_record_tests.rs"]
mod tests;
