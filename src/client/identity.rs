//! The client's identity key: a static X25519 key pair that the client's peer links prove
//! (the Noise handshake of `net::peer_secure`). The client registers its public half with the
//! tracker at login; the tracker hands it to downloaders with the client's address and names
//! it in the tickets it issues to the client's user, so a downloader knows it reaches the
//! sharer the tracker named and a sharer knows the downloader holds the ticket's key.
//!
//! The key lives in the client's state directory as `identity.key` (mode 0600), created from
//! the OS random source the first time: written whole to a private temporary file, synced and
//! hard-linked into place (never overwriting), then the directory synced. A key file that is
//! corrupt, not a regular file, or accessible to group or others is an error naming the file:
//! the client refuses to start rather than silently use another identity. The X25519
//! arithmetic is `snow`'s; nothing here is cryptography of our own. No sockets, no clocks.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use base64ct::{Base64UrlUnpadded, Encoding};

/// The key file's name in the state directory.
pub const IDENTITY_FILE: &str = "identity.key";
/// The tag of the key line: `p2pshare-client-key-v1 <32 bytes, unpadded base64url>`.
const KEY_TAG: &str = "p2pshare-client-key-v1";
/// A key file is a few short lines; anything longer is not one.
const MAX_FILE_LEN: u64 = 4096;

/// Why the identity key could not be had.
#[derive(Debug)]
pub enum IdentityError {
    Io {
        path: PathBuf,
        what: &'static str,
        err: io::Error,
    },
    /// Group or others may access the file (a private key must be the owner's alone).
    Permissions { path: PathBuf, mode: u32 },
    /// Not a key file of this program.
    Corrupt { path: PathBuf, why: String },
    /// No random bytes from the OS.
    Random(String),
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::Io { path, what, err } => write!(
                f,
                "cannot {what} the client identity key file {}: {err}",
                path.display()
            ),
            IdentityError::Permissions { path, mode } => write!(
                f,
                "client identity key file {} is accessible to group or others (mode {:04o}); \
                 make it private with chmod 600",
                path.display(),
                mode & 0o7777
            ),
            IdentityError::Corrupt { path, why } => write!(
                f,
                "client identity key file {} is corrupt: {why} (remove it to make a new \
                 identity)",
                path.display()
            ),
            IdentityError::Random(e) => write!(f, "no random identity key: {e}"),
        }
    }
}

impl std::error::Error for IdentityError {}

/// A client's static X25519 key pair.
#[derive(Clone)]
pub struct ClientIdentity {
    private: [u8; 32],
    public: [u8; 32],
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private half is never printed.
        write!(f, "ClientIdentity({})", key_text(&self.public))
    }
}

impl Drop for ClientIdentity {
    fn drop(&mut self) {
        // Best effort: do not leave the secret in freed memory.
        self.private = [0; 32];
        std::hint::black_box(&self.private);
    }
}

/// The public key computed from an X25519 private key (`snow`'s X25519).
pub fn public_of(private: &[u8; 32]) -> [u8; 32] {
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut public = [0u8; 32];
    if let Some(mut dh) = DefaultResolver.resolve_dh(&snow::params::DHChoice::Curve25519) {
        dh.set(private);
        public.copy_from_slice(&dh.pubkey()[..32]);
    }
    public
}

/// A public identity key as people read it: `x25519:` + 43 characters of unpadded base64url.
pub fn key_text(public: &[u8; 32]) -> String {
    format!("x25519:{}", Base64UrlUnpadded::encode_string(public))
}

impl ClientIdentity {
    /// The key pair of a known private key (tests; a loaded file).
    pub fn from_private(private: [u8; 32]) -> Self {
        ClientIdentity {
            public: public_of(&private),
            private,
        }
    }

    /// A new key pair from the OS random source (a client without a state directory keeps
    /// it for its run only).
    pub fn generate() -> Result<Self, IdentityError> {
        let mut private = [0u8; 32];
        getrandom::fill(&mut private).map_err(|e| IdentityError::Random(e.to_string()))?;
        Ok(Self::from_private(private))
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    pub fn private(&self) -> [u8; 32] {
        self.private
    }

    /// Reads `dir/identity.key`, or creates it if there is none.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let path = dir.join(IDENTITY_FILE);
        match fs::symlink_metadata(&path) {
            Ok(_) => return Self::load(&path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(IdentityError::Io {
                    path,
                    what: "read",
                    err,
                })
            }
        }
        let key = Self::generate()?;
        match key.write_new(&path) {
            Ok(()) => {
                log::info!(
                    "created the client identity key {} in {}",
                    key_text(&key.public),
                    path.display()
                );
                Ok(key)
            }
            // Another process created it meanwhile: that one is the identity.
            Err(IdentityError::Io { err, .. }) if err.kind() == io::ErrorKind::AlreadyExists => {
                Self::load(&path)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the key file at `path`, refusing one that group or others can access.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let io_err = |what, err| IdentityError::Io {
            path: path.to_path_buf(),
            what,
            err,
        };
        let corrupt = |why: String| IdentityError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        let meta = fs::symlink_metadata(path).map_err(|e| io_err("read", e))?;
        if !meta.is_file() {
            return Err(corrupt("not a regular file".into()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.to_path_buf(),
                mode: meta.mode(),
            });
        }
        if meta.len() > MAX_FILE_LEN {
            return Err(corrupt(format!(
                "{} bytes, far more than a key file",
                meta.len()
            )));
        }
        let text = fs::read(path).map_err(|e| io_err("read", e))?;
        let private = parse_key_file(&text).map_err(corrupt)?;
        Ok(Self::from_private(private))
    }

    /// Writes the key to `path`, which must not exist (see the module doc).
    fn write_new(&self, path: &Path) -> Result<(), IdentityError> {
        let io_err = |what, err| IdentityError::Io {
            path: path.to_path_buf(),
            what,
            err,
        };
        crate::keys::create_private_file(path, &self.file_text()).map_err(|e| io_err("create", e))
    }

    fn file_text(&self) -> String {
        format!(
            "# p2pshare client identity key: proves this client on its peer links.\n\
             # Keep it private (mode 0600). Public key: {}\n\
             {KEY_TAG} {}\n",
            key_text(&self.public),
            Base64UrlUnpadded::encode_string(&self.private)
        )
    }
}

/// The private key in a key file: `#` lines and blank lines are ignored; exactly one line
/// `p2pshare-client-key-v1 <32 bytes in unpadded base64url>`.
fn parse_key_file(text: &[u8]) -> Result<[u8; 32], String> {
    let text = std::str::from_utf8(text).map_err(|_| "not text".to_string())?;
    let mut key = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if key.is_some() {
            return Err("more than one key line".into());
        }
        let Some(value) = line.strip_prefix(KEY_TAG) else {
            return Err(format!("a line that is not `{KEY_TAG} <key>`"));
        };
        let value = value.trim();
        let mut bytes = [0u8; 32];
        match Base64UrlUnpadded::decode(value, &mut bytes) {
            Ok(decoded) if decoded.len() == 32 => key = Some(bytes),
            _ => return Err("the key is not 32 bytes of unpadded base64url".into()),
        }
    }
    key.ok_or_else(|| "no key line".into())
}

#[cfg(test)]
#[path = "identity_tests.rs"]
mod tests;
