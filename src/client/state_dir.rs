//! The client's state directory: where a client keeps what it must remember between runs (its
//! users' shares and downloads in the [state file](super::state_file), the directory's lock,
//! the shell history). By default one per listen address,
//! `$XDG_STATE_HOME/p2pshare/client-<ip>-<port>/` (`~/.local/state/p2pshare/...` when
//! `XDG_STATE_HOME` is unset), or the directory given with `--state-dir`.
//!
//! [`resolve`] is pure (the environment is passed in); [`ensure`] is the only function here
//! that touches the disk: the client creates and locks its directory when it starts.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why no default state directory could be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateDirError {
    /// Neither `XDG_STATE_HOME` (absolute) nor `HOME` (absolute) is set.
    NoHome,
}

impl fmt::Display for StateDirError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateDirError::NoHome => write!(
                f,
                "no state directory: neither XDG_STATE_HOME nor HOME is set (use --state-dir DIR)"
            ),
        }
    }
}

impl std::error::Error for StateDirError {}

/// The environment variables the default depends on.
#[derive(Debug, Clone, Default)]
pub struct StateEnv {
    pub xdg_state_home: Option<OsString>,
    pub home: Option<OsString>,
}

impl StateEnv {
    /// This process's environment.
    pub fn from_process() -> Self {
        StateEnv {
            xdg_state_home: std::env::var_os("XDG_STATE_HOME"),
            home: std::env::var_os("HOME"),
        }
    }
}

/// The root of every p2pshare state directory: `$XDG_STATE_HOME/p2pshare`, or
/// `$HOME/.local/state/p2pshare`. As the XDG base directory specification says, a value that
/// is empty or not absolute is ignored.
pub fn state_root(env: &StateEnv) -> Result<PathBuf, StateDirError> {
    let absolute = |v: &Option<OsString>| v.as_ref().map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(xdg) = absolute(&env.xdg_state_home) {
        return Ok(xdg.join("p2pshare"));
    }
    absolute(&env.home)
        .map(|home| home.join(".local/state/p2pshare"))
        .ok_or(StateDirError::NoHome)
}

/// The name of a client's own directory under the root: `client-<ip>-<port>`, with an IPv6
/// address's colons written as `_` so that the name is portable.
pub fn client_dir_name(listen: SocketAddr) -> String {
    let ip = listen.ip().to_string().replace(':', "_");
    format!("client-{ip}-{}", listen.port())
}

/// The client's state directory: `explicit` (from `--state-dir`) if given, else the default for
/// its listen address.
pub fn resolve(
    explicit: Option<&Path>,
    listen: SocketAddr,
    env: &StateEnv,
) -> Result<PathBuf, StateDirError> {
    match explicit {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Ok(state_root(env)?.join(client_dir_name(listen))),
    }
}

/// Creates `dir` (and missing parents) readable by its owner only (0700: it holds history and,
/// later, keys). An existing directory is left as it is.
pub fn ensure(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(xdg: Option<&str>, home: Option<&str>) -> StateEnv {
        StateEnv {
            xdg_state_home: xdg.map(OsString::from),
            home: home.map(OsString::from),
        }
    }

    #[test]
    fn default_follows_xdg_then_home() {
        let listen: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        assert_eq!(
            resolve(None, listen, &env(Some("/s"), Some("/h"))).unwrap(),
            Path::new("/s/p2pshare/client-127.0.0.1-7001")
        );
        assert_eq!(
            resolve(None, listen, &env(None, Some("/h"))).unwrap(),
            Path::new("/h/.local/state/p2pshare/client-127.0.0.1-7001")
        );
        // Empty or relative values are ignored, as the XDG specification says.
        assert_eq!(
            resolve(None, listen, &env(Some(""), Some("/h"))).unwrap(),
            Path::new("/h/.local/state/p2pshare/client-127.0.0.1-7001")
        );
        assert_eq!(
            resolve(None, listen, &env(Some("rel"), None)),
            Err(StateDirError::NoHome)
        );
        assert_eq!(
            resolve(None, listen, &env(None, None)),
            Err(StateDirError::NoHome)
        );
    }

    #[test]
    fn explicit_wins_and_v6_names_are_portable() {
        let listen: SocketAddr = "[::1]:7000".parse().unwrap();
        assert_eq!(client_dir_name(listen), "client-__1-7000");
        assert_eq!(
            resolve(Some(Path::new("/x/y")), listen, &env(None, None)).unwrap(),
            Path::new("/x/y")
        );
    }

    #[test]
    fn ensure_creates_private_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure(&dir).unwrap();
        ensure(&dir).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
    }
}
