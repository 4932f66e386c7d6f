//! `client_program [OPTIONS] <IP>:<PORT> <tracker_info_file>`: the command-line client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use log::{error, warn, LevelFilter};
use p2pshare::cli::{self, CliError, EXIT_USAGE};
use p2pshare::client::driver::{self, ClientConfig};
use p2pshare::client::help;
use p2pshare::client::known_trackers::{KnownTrackers, TrackerKeys};
use p2pshare::client::progress::{Drawn, LogSink};
use p2pshare::client::state_dir::{self, StateEnv};

/// What the client logs when `--log-level` is not given: problems only, so a batch run's
/// stderr holds its `error: ` lines and little else.
const DEFAULT_LOG_LEVEL: LevelFilter = LevelFilter::Warn;

fn usage(opts: &getopts::Options) -> String {
    opts.usage("Usage: client_program [OPTIONS] <IP>:<PORT> <tracker_info_file>")
}

/// `--help`: the options, then the commands of the command loop.
fn full_help(opts: &getopts::Options) -> String {
    let mut text = usage(opts);
    text.push_str("\nCommands (typed at the prompt, or read from standard input one per line):\n");
    for line in help::command_list() {
        text.push_str(&line);
        text.push('\n');
    }
    text.push_str("\nAt the prompt, `help <command>` explains one.\n");
    text
}

fn main() -> ExitCode {
    let mut opts = getopts::Options::new();
    cli::common_options(&mut opts, DEFAULT_LOG_LEVEL);
    opts.optflag(
        "",
        "serve",
        "keep sharing files after standard input ends, until SIGINT or SIGTERM",
    );
    opts.optopt(
        "",
        "state-dir",
        "keep this client's state (shares, downloads, shell history) in DIR (default: \
         $XDG_STATE_HOME/p2pshare/client-<IP>-<PORT>)",
        "DIR",
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = opts
        .parse(&args)
        .map_err(|e| CliError(e.to_string()))
        .and_then(|m| Ok((cli::common_args(&m, DEFAULT_LOG_LEVEL)?, m)));
    let (common, matches) = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("client_program: {e}\n{}", usage(&opts));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if common.help {
        print!("{}", full_help(&opts));
        return ExitCode::SUCCESS;
    }
    if common.version {
        println!("client_program {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let (listen, info_path) = match matches.free.as_slice() {
        [addr, path] => match addr.parse::<SocketAddr>() {
            Ok(a) => (a, path.clone()),
            Err(_) => {
                eprintln!("client_program: bad address '{addr}' (expected IP:PORT)");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        _ => {
            eprintln!("client_program: expected 2 arguments\n{}", usage(&opts));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let tracker_lines = match cli::read_tracker_lines(Path::new(&info_path)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("client_program: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Log lines to stderr erase the progress line first (see `client::progress`).
    let drawn = Drawn::default();
    if let Err(e) = cli::init_logging(
        common.log_level,
        common.log_file.as_deref().map(Path::new),
        LogSink::new(drawn.clone()),
    ) {
        eprintln!("client_program: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let explicit_state_dir = matches.opt_str("state-dir").map(PathBuf::from);
    if explicit_state_dir
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        eprintln!(
            "client_program: --state-dir needs a directory\n{}",
            usage(&opts)
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let state_dir = match state_dir::resolve(
        explicit_state_dir.as_deref(),
        listen,
        &StateEnv::from_process(),
    ) {
        Ok(dir) => Some(dir),
        Err(e) => {
            warn!("{e}");
            None
        }
    };
    // The trackers' keys trusted on first use; a damaged file is refused rather than ignored
    // (ignoring it would trust whoever answers next).
    let known = match &state_dir {
        Some(dir) => match KnownTrackers::load(dir) {
            Ok(known) => known,
            Err(e) => {
                eprintln!("client_program: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => KnownTrackers::in_memory(),
    };
    let trackers = tracker_lines.iter().map(|t| t.addr).collect();
    let tracker_keys = TrackerKeys::new(tracker_lines, known);
    match driver::run(ClientConfig {
        listen,
        trackers,
        serve: matches.opt_present("serve"),
        drawn,
        state_dir,
        tracker_keys,
    }) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            error!("client stopped: {e}");
            eprintln!("client_program: cannot run on {listen}: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
