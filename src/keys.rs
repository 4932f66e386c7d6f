//! The service key: one secret per service, shared by its trackers, and the keys derived
//! from it.
//!
//! The secret is a 32-byte seed from the OS random source, kept in a key file readable by its
//! owner only (mode 0600). From it, keyed BLAKE2b with a distinct label per use derives
//! (a) the pre-shared key that authenticates tracker-to-tracker links ([`ServiceKey::tracker_psk`])
//! and (b) the seed of an Ed25519 signing key whose public half is the service's public key
//! ([`ServiceKey::public_key`], printed as `ed25519:<base64url>`), which clients pin and
//! sharers will check tickets with. Deriving both from one seed keeps one file to copy.
//!
//! This module reads and writes the key file and nothing else: it opens no sockets and keeps
//! no state beyond the key. No cryptography is written here: randomness is `getrandom`'s, the
//! KDF is `blake2`'s keyed mode, signatures are `ed25519-dalek`'s.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64ct::{Base64UrlUnpadded, Encoding};
use blake2::digest::consts::U32;
use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2b256, Blake2bMac, Digest};
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::wire::ticket::{Ticket, TicketBody};
use crate::wire::{GroupId, Sha1Digest};

/// The first word of a key file's key line; a later format would change it.
const KEY_FILE_TAG: &str = "p2pshare-service-key-v1";
/// What a printed public key starts with.
pub const PUBLIC_KEY_PREFIX: &str = "ed25519:";
/// Labels of the derived keys: each use gets its own, so no key serves two purposes.
const LABEL_TRACKER_PSK: &[u8] = b"p2pshare v1 tracker-link psk";
const LABEL_SIGNING: &[u8] = b"p2pshare v1 service ed25519 signing key";
const LABEL_CLIENT_LINK_STATIC: &[u8] = b"p2pshare v1 client-link x25519 static key";
/// What the service key signs to certify the trackers' static key of client links (followed
/// by that key's 32 bytes). A distinct context, so such a signature can never be taken for
/// another statement of the service (a ticket, say).
const CERT_CONTEXT: &[u8] = b"p2pshare v1 client-link static key certificate\0";
/// Bytes of a static key's certificate: the service's public key, then the signature.
pub const CERT_LEN: usize = 32 + 64;

/// Why a key file cannot be used. Each names the file.
#[derive(Debug)]
pub enum KeyError {
    Io {
        path: PathBuf,
        what: &'static str,
        err: io::Error,
    },
    /// Group or others may read (or write) the file.
    Permissions {
        path: PathBuf,
        mode: u32,
    },
    NotAFile(PathBuf),
    /// Owned by another user (who could have chosen the secret).
    NotOurs {
        path: PathBuf,
        owner: u32,
    },
    /// Not the key file format, or a key of the wrong length.
    Corrupt {
        path: PathBuf,
        why: String,
    },
    /// Neither `$XDG_STATE_HOME` nor `$HOME` says where keys live.
    NoStateDir,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Io { path, what, err } => {
                write!(
                    f,
                    "service key file {}: cannot {what}: {err}",
                    path.display()
                )
            }
            KeyError::Permissions { path, mode } => write!(
                f,
                "service key file {} is accessible to group or others (mode {:04o}); \
                 it must be private to its owner: chmod 600 {}",
                path.display(),
                mode & 0o7777,
                path.display()
            ),
            KeyError::NotAFile(path) => {
                write!(
                    f,
                    "service key file {} is not a regular file",
                    path.display()
                )
            }
            KeyError::NotOurs { path, owner } => write!(
                f,
                "service key file {} belongs to user {owner}, not to this process's user: \
                 whoever owns it may know or change the secret; remove it or pass \
                 --service-key FILE",
                path.display()
            ),
            KeyError::Corrupt { path, why } => write!(
                f,
                "service key file {} is corrupt ({why}); restore it from another tracker of \
                 the service, or remove it to create a new service key",
                path.display()
            ),
            KeyError::NoStateDir => write!(
                f,
                "neither XDG_STATE_HOME nor HOME is set: say where the service key lives \
                 with --service-key FILE"
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// The service's public key (Ed25519), as printed by the tracker and written on tracker lines.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PUBLIC_KEY_PREFIX}{}",
            Base64UrlUnpadded::encode_string(&self.0)
        )
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = String;

    /// `ed25519:` followed by the key's 32 bytes in unpadded URL-safe base64 (43 characters),
    /// which must be a valid Ed25519 point.
    fn from_str(s: &str) -> Result<Self, String> {
        let body = s
            .strip_prefix(PUBLIC_KEY_PREFIX)
            .ok_or_else(|| format!("a service key starts with '{PUBLIC_KEY_PREFIX}'"))?;
        let mut key = [0u8; 32];
        let decoded = Base64UrlUnpadded::decode(body, &mut key)
            .map_err(|_| "a service key is 32 bytes in unpadded base64url".to_string())?;
        if decoded.len() != 32 {
            return Err("a service key is 32 bytes in unpadded base64url".into());
        }
        VerifyingKey::from_bytes(&key).map_err(|_| "not a valid Ed25519 public key")?;
        Ok(PublicKey(key))
    }
}

/// Checks a tracker's certificate of its static key `remote_static` (see
/// [`ServiceKey::client_link_certificate`]) and returns the service public key that signed
/// it. Any error means the peer is not a tracker of any service.
pub fn verify_static_cert(cert: &[u8], remote_static: &[u8]) -> Result<[u8; 32], String> {
    if cert.len() != CERT_LEN {
        return Err(format!(
            "a certificate of {} bytes (expected {CERT_LEN})",
            cert.len()
        ));
    }
    if remote_static.len() != 32 {
        return Err("no static key".into());
    }
    let mut signer = [0u8; 32];
    signer.copy_from_slice(&cert[..32]);
    let mut signature = [0u8; 64];
    signature.copy_from_slice(&cert[32..]);
    let key = VerifyingKey::from_bytes(&signer).map_err(|_| "not an Ed25519 public key")?;
    let mut message = CERT_CONTEXT.to_vec();
    message.extend_from_slice(remote_static);
    key.verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&signature))
        .map_err(|_| "the static key's signature does not verify")?;
    Ok(signer)
}

/// Why a sharer refuses a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TicketError {
    /// Not signed by this service's key (forged, altered, or another service's).
    BadSignature,
    /// Past its expiry (both in seconds since the Unix epoch).
    Expired { expires: u64, now: u64 },
    /// For another group than the one asked for.
    WrongGroup,
    /// For other content than the one asked for.
    WrongFile,
}

impl fmt::Display for TicketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TicketError::BadSignature => f.write_str("ticket not signed by this service"),
            TicketError::Expired { expires, now } => {
                write!(f, "ticket expired {}s ago", now.saturating_sub(*expires))
            }
            TicketError::WrongGroup => f.write_str("ticket for another group"),
            TicketError::WrongFile => f.write_str("ticket for another file"),
        }
    }
}

impl std::error::Error for TicketError {}

/// Checks, offline, that `ticket` was signed by the service whose public key is `service`,
/// is for `group` and the content `file_sha1`, and has not expired at `now` (seconds since
/// the Unix epoch). The signature is checked first, so nothing of a forged ticket is trusted.
pub fn verify_ticket(
    service: &PublicKey,
    ticket: &Ticket,
    group: &GroupId,
    file_sha1: &Sha1Digest,
    now: u64,
) -> Result<(), TicketError> {
    let key = VerifyingKey::from_bytes(&service.0).map_err(|_| TicketError::BadSignature)?;
    key.verify_strict(
        &ticket.body.signed_bytes(),
        &ed25519_dalek::Signature::from_bytes(&ticket.signature),
    )
    .map_err(|_| TicketError::BadSignature)?;
    if &ticket.body.group != group {
        return Err(TicketError::WrongGroup);
    }
    if &ticket.body.file_sha1 != file_sha1 {
        return Err(TicketError::WrongFile);
    }
    if now >= ticket.body.expires {
        return Err(TicketError::Expired {
            expires: ticket.body.expires,
            now,
        });
    }
    Ok(())
}

/// The service's secret seed and what derives from it.
#[derive(Clone)]
pub struct ServiceKey {
    seed: [u8; 32],
}

impl fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The seed is never printed.
        write!(f, "ServiceKey({})", self.public_key())
    }
}

impl Drop for ServiceKey {
    fn drop(&mut self) {
        // Best effort: do not leave the secret in freed memory.
        self.seed = [0u8; 32];
        std::hint::black_box(&self.seed);
    }
}

impl ServiceKey {
    /// A key from a known seed (tests; a loaded file).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        ServiceKey { seed }
    }

    /// A new random key from the OS random source.
    pub fn generate() -> io::Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| io::Error::other(format!("no random service key: {e}")))?;
        Ok(ServiceKey { seed })
    }

    /// Keyed BLAKE2b-256 of `label` under the seed.
    fn derive(&self, label: &[u8]) -> [u8; 32] {
        let mut mac = <Blake2bMac<U32> as KeyInit>::new_from_slice(&self.seed)
            .unwrap_or_else(|_| unreachable!("a 32-byte key is within BLAKE2b's 64"));
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    /// The pre-shared key of the tracker links' Noise handshake.
    pub fn tracker_psk(&self) -> [u8; 32] {
        self.derive(LABEL_TRACKER_PSK)
    }

    /// The service's signing key.
    pub fn signing_key(&self) -> SigningKey {
        SigningKey::from_bytes(&self.derive(LABEL_SIGNING))
    }

    /// The service's public key (the signing key's public half).
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.signing_key().verifying_key().to_bytes())
    }

    /// The static X25519 key pair every tracker of the service presents on client links:
    /// `(private, public)`. Derived from the seed, so all trackers present the same one; the
    /// public half is computed by `snow`'s own X25519.
    pub fn client_link_static(&self) -> ([u8; 32], [u8; 32]) {
        use snow::resolvers::{CryptoResolver, DefaultResolver};
        let private = self.derive(LABEL_CLIENT_LINK_STATIC);
        let mut public = [0u8; 32];
        if let Some(mut dh) = DefaultResolver.resolve_dh(&snow::params::DHChoice::Curve25519) {
            dh.set(&private);
            public.copy_from_slice(&dh.pubkey()[..32]);
        }
        (private, public)
    }

    /// The certificate of the client links' static key: `service public key (32) |
    /// Ed25519 signature (64)` over a context string of its own and the static public key.
    /// Sent by every tracker inside the handshake; checked by [`verify_static_cert`].
    pub fn client_link_certificate(&self) -> Vec<u8> {
        use ed25519_dalek::Signer;
        let (_, public) = self.client_link_static();
        let signing = self.signing_key();
        let mut message = CERT_CONTEXT.to_vec();
        message.extend_from_slice(&public);
        let mut cert = Vec::with_capacity(CERT_LEN);
        cert.extend_from_slice(signing.verifying_key().as_bytes());
        cert.extend_from_slice(&signing.sign(&message).to_bytes());
        cert
    }

    /// Signs a ticket (Ed25519 over the ticket context and the body's bytes).
    pub fn sign_ticket(&self, body: TicketBody) -> Ticket {
        use ed25519_dalek::Signer;
        let signature = self.signing_key().sign(&body.signed_bytes()).to_bytes();
        Ticket { body, signature }
    }

    /// Reads the key at `path`, refusing a file that group or others can access.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |what, err| KeyError::Io {
            path: path.to_path_buf(),
            what,
            err,
        };
        // One open, then every check on what was opened (fstat) and the read from it: checking
        // the path and reading it again would let a file swapped in between (a symlink
        // replaced in a shared directory) pass the owner and mode checks. A symlink is
        // refused (`O_NOFOLLOW`), and a FIFO planted in its place does not block the open.
        use nix::fcntl::OFlag;
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
            .open(path)
            .map_err(|e| io("read", e))?;
        let meta = file.metadata().map_err(|e| io("read", e))?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile(path.to_path_buf()));
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(KeyError::NotOurs {
                path: path.to_path_buf(),
                owner: meta.uid(),
            });
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        // A key file is one short line; refuse to read a huge file into memory.
        if meta.len() > 4096 {
            return Err(KeyError::Corrupt {
                path: path.to_path_buf(),
                why: format!("{} bytes, far more than a key file holds", meta.len()),
            });
        }
        let mut text = Vec::with_capacity(meta.len() as usize);
        io::Read::read_to_end(&mut io::Read::take(&mut file, 4097), &mut text)
            .map_err(|e| io("read", e))?;
        let seed = parse_key_file(&text).map_err(|why| KeyError::Corrupt {
            path: path.to_path_buf(),
            why,
        })?;
        Ok(ServiceKey { seed })
    }

    /// Reads the key at `path`, or creates it there (and its directory, mode 0700) if there is
    /// no file. Two processes creating it at the same instant end with the same key: each
    /// writes a complete temporary file, then hard-links it to `path`, which only one can do;
    /// the other reads the winner's file.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match fs::symlink_metadata(path) {
            Ok(_) => return Self::load(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(KeyError::Io {
                    path: path.to_path_buf(),
                    what: "read",
                    err: e,
                })
            }
        }
        let key = Self::generate().map_err(|e| KeyError::Io {
            path: path.to_path_buf(),
            what: "create",
            err: e,
        })?;
        match key.write_new(path) {
            Ok(()) => {
                log::info!("created a new service key in {}", path.display());
                Ok(key)
            }
            // Another process won the race: its key is the service's.
            Err(KeyError::Io { err, .. }) if err.kind() == io::ErrorKind::AlreadyExists => {
                Self::load(path)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes the key to `path`, which must not exist: a private temporary file beside it,
    /// synced, then hard-linked into place (atomic, never overwrites), then the directory
    /// synced.
    fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let io = |what, err| KeyError::Io {
            path: path.to_path_buf(),
            what,
            err,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io("create its directory", e))?;
        create_private_file(path, &self.file_text()).map_err(|e| io("create", e))
    }

    /// Best effort: a copy of this key at `path` unless a file is there already (a failure
    /// is logged, not fatal: the key has its main place).
    fn copy_to(&self, path: &Path) {
        match self.write_new(path) {
            Ok(()) => log::info!("copied the service key to {}", path.display()),
            Err(KeyError::Io { err, .. }) if err.kind() == io::ErrorKind::AlreadyExists => {
                match Self::load(path) {
                    Ok(other) if other.public_key() == self.public_key() => {}
                    _ => log::warn!(
                        "{} holds another service key than the one just created beside the \
                         tracker file: trackers of copies of this tracker file elsewhere may \
                         form another service",
                        path.display()
                    ),
                }
            }
            Err(e) => log::warn!("could not copy the service key: {e}"),
        }
    }

    /// The key file's contents.
    fn file_text(&self) -> String {
        format!(
            "# p2pshare service key: the secret shared by the trackers of one service.\n\
             # Keep it private (mode 0600). Copy this file to run trackers of the service on\n\
             # other machines. Public key: {}\n\
             {KEY_FILE_TAG} {}\n",
            self.public_key(),
            Base64UrlUnpadded::encode_string(&self.seed)
        )
    }
}

/// The seed in a key file: `#` lines and blank lines are ignored; one line
/// `p2pshare-service-key-v1 <32 bytes in unpadded base64url>`.
fn parse_key_file(text: &[u8]) -> Result<[u8; 32], String> {
    let text = std::str::from_utf8(text).map_err(|_| "not text".to_string())?;
    let mut seed = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if seed.is_some() {
            return Err("more than one key line".into());
        }
        let mut words = line.split_whitespace();
        let (Some(tag), Some(body), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("expected '{KEY_FILE_TAG} <key>'"));
        };
        if tag != KEY_FILE_TAG {
            return Err(format!("expected '{KEY_FILE_TAG} <key>'"));
        }
        let mut buf = [0u8; 33];
        let decoded = Base64UrlUnpadded::decode(body, &mut buf)
            .map_err(|_| "the key is not unpadded base64url".to_string())?;
        if decoded.len() != 32 {
            return Err(format!("the key is {} bytes, not 32", decoded.len()));
        }
        let mut s = [0u8; 32];
        s.copy_from_slice(decoded);
        seed = Some(s);
    }
    seed.ok_or_else(|| "no key line".into())
}

/// Where per-user state lives: `$XDG_STATE_HOME/p2pshare` (an absolute path; a relative or
/// empty one is ignored, as the XDG spec says), else `$HOME/.local/state/p2pshare`.
pub fn state_root(xdg_state_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let xdg = xdg_state_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = match xdg {
        Some(p) => p,
        None => PathBuf::from(home.filter(|h| !h.is_empty())?).join(".local/state"),
    };
    Some(base.join("p2pshare"))
}

/// The key file's name for the trackers listed in a tracker file: the same for every tracker
/// of that file (whatever their order or form in the file), different for another list.
pub fn key_file_name(trackers: &[SocketAddr]) -> String {
    let mut sorted: Vec<SocketAddr> = trackers.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut h = Blake2b256::new();
    for a in &sorted {
        h.update(a.to_string().as_bytes());
        h.update(b"\n");
    }
    let digest = h.finalize();
    let short: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("service-{short}.key")
}

/// The default key file of the trackers of a tracker file in the state home, from the
/// environment.
pub fn default_key_path(trackers: &[SocketAddr]) -> Result<PathBuf, KeyError> {
    let root = state_root(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"))
        .ok_or(KeyError::NoStateDir)?;
    Ok(root.join(key_file_name(trackers)))
}

/// Where the trackers of one tracker file look for their service key when no
/// `--service-key` is given: first beside the tracker file (`.p2pshare-service-<hash>.key` in
/// its directory), then in the state home (`service-<hash>.key`). The tracker file is the one
/// thing every tracker of the file shares, so the first place is found by trackers started
/// with different `HOME`s or `XDG_STATE_HOME`s; the second keeps keys made by earlier builds,
/// and serves trackers whose tracker files are copies in different directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultKeyPlaces {
    pub beside_file: PathBuf,
    /// `None` when neither `XDG_STATE_HOME` nor `HOME` says where the state home is.
    pub state_home: Option<PathBuf>,
}

impl DefaultKeyPlaces {
    /// The places for the tracker file at `info_path` listing `trackers`, with the state home
    /// `state_root` (see [`state_root`]).
    pub fn new(info_path: &Path, trackers: &[SocketAddr], state_root: Option<PathBuf>) -> Self {
        let name = key_file_name(trackers);
        let dir = match info_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        DefaultKeyPlaces {
            beside_file: dir.join(format!(".p2pshare-{name}")),
            state_home: state_root.map(|root| root.join(name)),
        }
    }

    /// The places, with the state home taken from the environment.
    pub fn from_env(info_path: &Path, trackers: &[SocketAddr]) -> Self {
        let root = state_root(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"));
        Self::new(info_path, trackers, root)
    }

    /// The key of the first place that holds a file (an error if that file is unusable: a
    /// bad file is never passed over for another key), or `None` when neither does.
    pub fn find(&self) -> Result<Option<(ServiceKey, PathBuf)>, KeyError> {
        self.find_in(self.beside_file_is_safe())
    }

    /// [`Self::find`], told whether the place beside the tracker file may be used.
    fn find_in(&self, beside_safe: bool) -> Result<Option<(ServiceKey, PathBuf)>, KeyError> {
        let beside = beside_safe.then_some(&self.beside_file);
        for path in beside.into_iter().chain(self.state_home.as_ref()) {
            match fs::symlink_metadata(path) {
                Ok(_) => return ServiceKey::load(path).map(|k| Some((k, path.clone()))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(KeyError::Io {
                        path: path.clone(),
                        what: "read",
                        err,
                    })
                }
            }
        }
        Ok(None)
    }

    /// Whether the tracker file's directory may hold the key: it belongs to this user or to
    /// root, and nobody else can replace its entries (not writable by group or others, or
    /// sticky like `/tmp`). Elsewhere another user could plant a key of their choosing (they
    /// would know the secret) or remove ours, so only the state home is used (logged).
    fn beside_file_is_safe(&self) -> bool {
        let dir = match self.beside_file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let Ok(meta) = fs::metadata(dir) else {
            return false;
        };
        let me = nix::unistd::geteuid().as_raw();
        let mode = meta.permissions().mode();
        let safe =
            (meta.uid() == me || meta.uid() == 0) && (mode & 0o022 == 0 || mode & 0o1000 != 0);
        if !safe {
            log::warn!(
                "not keeping the service key beside the tracker file: {} can be changed by \
                 other users; the state home is used",
                dir.display()
            );
        }
        safe
    }

    /// The service key of the tracker file: found (see [`Self::find`]), or else created
    /// beside the tracker file, with a copy in the state home for trackers whose tracker file
    /// is a copy elsewhere. When the tracker file's directory cannot hold it (read-only, say),
    /// it is created in the state home only. Returns the key and the file it is kept in.
    pub fn find_or_create(&self) -> Result<(ServiceKey, PathBuf), KeyError> {
        // Checked once, so a directory others can change is logged once.
        let beside_safe = self.beside_file_is_safe();
        if let Some(found) = self.find_in(beside_safe)? {
            return Ok(found);
        }
        if !beside_safe {
            let home = self.state_home.as_ref().ok_or(KeyError::NoStateDir)?;
            return ServiceKey::load_or_create(home).map(|k| (k, home.clone()));
        }
        match ServiceKey::load_or_create(&self.beside_file) {
            Ok(key) => {
                if let Some(home) = &self.state_home {
                    key.copy_to(home);
                }
                Ok((key, self.beside_file.clone()))
            }
            Err(KeyError::Io { path, what, err })
                if matches!(
                    err.kind(),
                    io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                let home = self
                    .state_home
                    .as_ref()
                    .ok_or(KeyError::Io { path, what, err })?;
                ServiceKey::load_or_create(home).map(|k| (k, home.clone()))
            }
            Err(e) => Err(e),
        }
    }
}

/// Creates `path`, which must not exist, holding `text`, readable by its owner only: written
/// whole under a unique temporary name beside it (mode 0600) and synced, then hard-linked into
/// place (atomic; fails with `AlreadyExists` rather than overwrite), then the directory synced.
/// Key files are made this way, so a reader never sees one half written.
pub(crate) fn create_private_file(path: &Path, text: &str) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| io::Error::other(e.to_string()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        u64::from_be_bytes(nonce)
    ));
    let written = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    written?;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
