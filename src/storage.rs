//! Memory-mapped files, and the only `unsafe` code of the crate.
//!
//! A shared file is read through a read-only map of its source path, so hashing and (later)
//! serving pieces never copy it through an intermediate buffer.
//!
//! The ownership rule for piece bytes lives here: a piece's bytes belong to the writer until
//! the piece is complete, to the hasher while it verifies, and are read-only afterwards. For a
//! source file that we only read, the rule reduces to "never write through the map".

use std::fs::File;
use std::io;
use std::path::Path;

use memmap2::{Advice, Mmap};

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
