//! Command-line plumbing shared by both programs: `tracker_info.txt` parsing, the common
//! options (`--help`, `--version`, `--log-level`, `--log-file`) and logging set-up.
//! Everything here except [`init_logging`] is pure.

use std::fmt;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use log::LevelFilter;
use simplelog::{ConfigBuilder, WriteLogger};

use crate::keys::PublicKey;

/// Exit status for bad arguments.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One tracker line of `tracker_info.txt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerLine {
    pub addr: SocketAddr,
    /// The service's public key, when the line carries one after the address.
    pub key: Option<PublicKey>,
}

/// Parses `tracker_info.txt`: one tracker per line, `IP:PORT` or `IP PORT`, optionally
/// followed by the service's public key (`ed25519:...`, as the tracker prints it); blank lines
/// and lines starting with `#` are ignored.
/// Most trackers in a tracker file: a starting tracker names the trackers it waits for in one
/// 64-bit set (see `wire::replication::ReplStatus`).
pub const MAX_TRACKERS: usize = 64;

pub fn parse_tracker_lines(text: &str) -> Result<Vec<TrackerLine>, CliError> {
    let mut trackers = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| {
            CliError(format!(
                "tracker info line {}: expected IP:PORT or IP PORT, then optionally the \
                 service key{why}, got '{line}'",
                n + 1
            ))
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        // `IP:PORT KEY` and `IP PORT` both have two words: the first word decides.
        let (addr, key) = match words.as_slice() {
            [one] => (one.parse::<SocketAddr>().ok(), None),
            [addr, key] if addr.parse::<SocketAddr>().is_ok() => {
                (addr.parse::<SocketAddr>().ok(), Some(*key))
            }
            [ip, port] => (ip_port(ip, port), None),
            [ip, port, key] => (ip_port(ip, port), Some(*key)),
            _ => (None, None),
        };
        let Some(addr) = addr else {
            return Err(bad(""));
        };
        let key = match key {
            None => None,
            Some(k) => Some(
                k.parse::<PublicKey>()
                    .map_err(|e| bad(&format!(" ({e})")))?,
            ),
        };
        trackers.push(TrackerLine { addr, key });
    }
    if trackers.is_empty() {
        return Err(CliError("tracker info file lists no tracker".into()));
    }
    if trackers.len() > MAX_TRACKERS {
        return Err(CliError(format!(
            "tracker info file lists {} trackers (at most {MAX_TRACKERS})",
            trackers.len()
        )));
    }
    Ok(trackers)
}

fn ip_port(ip: &str, port: &str) -> Option<SocketAddr> {
    match (ip.parse::<IpAddr>(), port.parse::<u16>()) {
        (Ok(ip), Ok(port)) => Some(SocketAddr::new(ip, port)),
        _ => None,
    }
}

/// The trackers' addresses of `tracker_info.txt` (see [`parse_tracker_lines`]).
pub fn parse_tracker_info(text: &str) -> Result<Vec<SocketAddr>, CliError> {
    Ok(parse_tracker_lines(text)?
        .into_iter()
        .map(|t| t.addr)
        .collect())
}

pub fn read_tracker_lines(path: &Path) -> Result<Vec<TrackerLine>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError(format!("cannot read {}: {e}", path.display())))?;
    parse_tracker_lines(&text)
}

pub fn read_tracker_info(path: &Path) -> Result<Vec<SocketAddr>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError(format!("cannot read {}: {e}", path.display())))?;
    parse_tracker_info(&text)
}

/// Adds the options both programs take; `default_level` is what the program logs at when
/// `--log-level` is not given (said in its help).
pub fn common_options(opts: &mut getopts::Options, default_level: LevelFilter) {
    opts.optflag("h", "help", "print this help and exit");
    opts.optflag("V", "version", "print the version and exit");
    let level_help = format!(
        "error|warn|info|debug|trace (default: {})",
        default_level.as_str().to_ascii_lowercase()
    );
    opts.optopt("", "log-level", &level_help, "LEVEL");
    opts.optopt(
        "",
        "log-file",
        "write the log to PATH instead of stderr",
        "PATH",
    );
}

pub fn parse_level(s: &str) -> Result<LevelFilter, CliError> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Ok(LevelFilter::Off),
        "error" => Ok(LevelFilter::Error),
        "warn" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        _ => Err(CliError(format!(
            "bad log level '{s}' (error|warn|info|debug|trace)"
        ))),
    }
}

/// Sends the log to `file`, or to stderr. Log lines start with a time stamp, so they never
/// start with `error: ` and cannot be mistaken for a command's failure line.
pub fn init_logging<W: std::io::Write + Send + 'static>(
    level: LevelFilter,
    file: Option<&Path>,
    stderr: W,
) -> Result<(), CliError> {
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .build();
    let result = match file {
        Some(path) => {
            let f = File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| CliError(format!("cannot open log file {}: {e}", path.display())))?;
            WriteLogger::init(level, config, f)
        }
        None => WriteLogger::init(level, config, stderr),
    };
    result.map_err(|e| CliError(format!("cannot start logging: {e}")))
}

/// The options both programs share, read from parsed matches.
pub struct CommonArgs {
    pub help: bool,
    pub version: bool,
    pub log_level: LevelFilter,
    pub log_file: Option<String>,
}

pub fn common_args(
    m: &getopts::Matches,
    default_level: LevelFilter,
) -> Result<CommonArgs, CliError> {
    Ok(CommonArgs {
        help: m.opt_present("h"),
        version: m.opt_present("V"),
        log_level: match m.opt_str("log-level") {
            Some(s) => parse_level(&s)?,
            None => default_level,
        },
        log_file: m.opt_str("log-file"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_info_formats() {
        let text = "# comment\n\n127.0.0.1:6000\n  127.0.0.1 6001  \n[::1]:7000\n";
        let t = parse_tracker_info(text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0], "127.0.0.1:6000".parse().unwrap());
        assert_eq!(t[1], "127.0.0.1:6001".parse().unwrap());
        assert_eq!(t[2], "[::1]:7000".parse().unwrap());
    }

    #[test]
    fn tracker_info_errors() {
        assert!(parse_tracker_info("").is_err());
        assert!(parse_tracker_info("# only\n").is_err());
        assert!(parse_tracker_info("localhost:80").is_err());
        assert!(parse_tracker_info("1.2.3.4 99999").is_err());
        assert!(parse_tracker_info("1.2.3.4 80 extra").is_err());
        assert!(parse_tracker_info("1.2.3.4:80 extra").is_err());
        assert!(parse_tracker_info("1.2.3.4 80 ed25519:short").is_err());
        assert!(parse_tracker_info("1.2.3.4 80 ed25519:AAAA extra").is_err());
        let lines = |n: usize| {
            (0..n)
                .map(|i| format!("127.0.0.1:{}\n", 6000 + i))
                .collect::<String>()
        };
        assert_eq!(parse_tracker_info(&lines(MAX_TRACKERS)).unwrap().len(), 64);
        assert!(parse_tracker_info(&lines(MAX_TRACKERS + 1)).is_err());
    }

    #[test]
    fn tracker_lines_may_carry_the_service_key() {
        let key = crate::keys::ServiceKey::from_seed([1u8; 32]).public_key();
        let text = format!("127.0.0.1:6000 {key}\n127.0.0.1 6001 {key}\n127.0.0.1:6002\n");
        let t = parse_tracker_lines(&text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].addr, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(t[0].key, Some(key));
        assert_eq!(t[1].addr, "127.0.0.1:6001".parse().unwrap());
        assert_eq!(t[1].key, Some(key));
        assert_eq!(t[2].key, None);
        // Clients read the same file through the address-only parser.
        assert_eq!(parse_tracker_info(&text).unwrap().len(), 3);
        let err = parse_tracker_lines("127.0.0.1:6000 ed25519:nope").unwrap_err();
        assert!(err.0.contains("line 1"), "{err}");
    }

    #[test]
    fn levels() {
        assert_eq!(parse_level("DEBUG").unwrap(), LevelFilter::Debug);
        assert!(parse_level("loud").is_err());
    }
}
