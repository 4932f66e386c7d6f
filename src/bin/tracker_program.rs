//! `tracker_program [OPTIONS] <tracker_info_file> <tracker_no>`: runs one tracker.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use log::{error, info, warn, LevelFilter};
use p2pshare::cli::{self, CliError, EXIT_USAGE};
use p2pshare::keys::{self, ServiceKey};
use p2pshare::tracker::disk::{self, DataDir};
use p2pshare::tracker::driver::{self, TrackerConfig};
use p2pshare::tracker::durable;

/// What the tracker logs when `--log-level` is not given: `info`, so an operator sees it
/// start, link with the other trackers, take over or step down (a few lines per event, none
/// per request).
const DEFAULT_LOG_LEVEL: LevelFilter = LevelFilter::Info;

fn usage(opts: &getopts::Options) -> String {
    opts.usage(
        "Usage: tracker_program [OPTIONS] <tracker_info_file> <tracker_no>\n       \
         tracker_program [--service-key FILE] --print-key <tracker_info_file> [<tracker_no>]",
    )
}

fn main() -> ExitCode {
    let mut opts = getopts::Options::new();
    cli::common_options(&mut opts, DEFAULT_LOG_LEVEL);
    opts.optopt(
        "",
        "data-dir",
        "keep the tracker's state in DIR (default: $XDG_STATE_HOME/p2pshare/tracker-IP-PORT, \
         or ~/.local/state/p2pshare/... when XDG_STATE_HOME is unset)",
        "DIR",
    );
    opts.optopt(
        "",
        "service-key",
        "the service's key file (default: .p2pshare-service-<hash>.key beside the tracker \
         file, else service-<hash>.key under $XDG_STATE_HOME/p2pshare/; created on first \
         start)",
        "FILE",
    );
    opts.optflag(
        "",
        "allow-foreign-addresses",
        "accept a client's listen address on another IP than the one its connection comes \
         from (for clients behind a proxy or NAT); by default such a login is refused",
    );
    opts.optflag(
        "",
        "accept-plain-clients",
        "also serve plain (unencrypted) client links, as raw test tools and the load \
         benchmarks speak them; by default they are refused (client_program never makes one)",
    );
    let quota_opts = [
        ("max-groups-per-user", "groups a user may own", "1000"),
        (
            "max-requests-per-user",
            "join requests a user may have pending",
            "1000",
        ),
        ("max-files-per-user", "files a user may share", "10000"),
        (
            "max-metadata-per-user",
            "bytes of file metadata (20 per piece) a user's shared files may take",
            "268435456",
        ),
        (
            "max-state-bytes",
            "bytes the service's whole state may take (accounts, groups, files), estimated",
            "2147483648",
        ),
        (
            "max-connections",
            "connections open at once; more are closed at once",
            "16384",
        ),
        (
            "idle-timeout",
            "seconds after which a silent client connection is closed",
            "30",
        ),
        (
            "memory-budget",
            "bytes all connections' buffers may hold; at it, client requests are not read \
             until they drain",
            "1073741824",
        ),
        (
            "listing-part-bytes",
            "bytes of items in one part of a listing (at most the default)",
            "1048576",
        ),
    ];
    for (name, what, default) in quota_opts {
        opts.optopt("", name, &format!("{what} (default {default})"), "N");
    }
    opts.optflag(
        "",
        "print-key",
        "print the service's public key (creating the key if there is none) and exit",
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = opts
        .parse(&args)
        .map_err(|e| CliError(e.to_string()))
        .and_then(|m| Ok((cli::common_args(&m, DEFAULT_LOG_LEVEL)?, m)));
    let (common, matches) = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tracker_program: {e}\n{}", usage(&opts));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if common.help {
        print!("{}", usage(&opts));
        return ExitCode::SUCCESS;
    }
    if common.version {
        println!("tracker_program {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let mut quotas = driver::Quotas::default();
    let mut limits = driver::Limits::default();
    let mut idle_secs = limits.idle_timeout.as_secs() as usize;
    for (name, slot) in [
        ("max-groups-per-user", &mut quotas.groups_per_user),
        ("max-requests-per-user", &mut quotas.requests_per_user),
        ("max-files-per-user", &mut quotas.files_per_user),
        ("max-metadata-per-user", &mut quotas.metadata_per_user),
        ("max-state-bytes", &mut quotas.state_bytes),
        ("max-connections", &mut limits.max_connections),
        ("idle-timeout", &mut idle_secs),
        ("memory-budget", &mut limits.memory_budget),
        ("listing-part-bytes", &mut limits.listing_part),
    ] {
        if let Some(v) = matches.opt_str(name) {
            match v.parse::<usize>() {
                Ok(n)
                    if n > 0
                        || !matches!(
                            name,
                            "max-connections"
                                | "idle-timeout"
                                | "memory-budget"
                                | "listing-part-bytes"
                        ) =>
                {
                    *slot = n
                }
                _ => {
                    eprintln!("tracker_program: bad --{name} '{v}'\n{}", usage(&opts));
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
    }
    limits.idle_timeout = std::time::Duration::from_secs(idle_secs as u64);
    let print_key = matches.opt_present("print-key");
    let (info_path, tracker_no) = match matches.free.as_slice() {
        [path] if print_key => (path.clone(), 1),
        [path, no] => match no.parse::<u16>() {
            Ok(n) if n >= 1 => (path.clone(), n),
            _ => {
                eprintln!(
                    "tracker_program: bad tracker number '{no}'\n{}",
                    usage(&opts)
                );
                return ExitCode::from(EXIT_USAGE);
            }
        },
        _ => {
            eprintln!("tracker_program: expected 2 arguments\n{}", usage(&opts));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let lines = match cli::read_tracker_lines(Path::new(&info_path)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tracker_program: {e}\n{}", usage(&opts));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let trackers: Vec<_> = lines.iter().map(|t| t.addr).collect();
    if usize::from(tracker_no) > trackers.len() {
        eprintln!(
            "tracker_program: tracker number {tracker_no} is not in {info_path} ({} trackers)\n{}",
            trackers.len(),
            usage(&opts)
        );
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(e) = cli::init_logging(
        common.log_level,
        common.log_file.as_deref().map(Path::new),
        std::io::stderr(),
    ) {
        eprintln!("tracker_program: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    // A key on our own line names the service: without its key file we must not make a new
    // key (it could never match), only say where the file is looked for.
    let own_line_key = lines[usize::from(tracker_no) - 1].key;
    let found = match matches.opt_str("service-key") {
        Some(path) => {
            let path = PathBuf::from(path);
            match own_line_key {
                Some(k)
                    if std::fs::symlink_metadata(&path)
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
                {
                    Err(format!(
                        "line {tracker_no} of {info_path} says the service key is {k}, but \
                         there is no key file {}: copy that service's key file there",
                        path.display()
                    ))
                }
                _ => ServiceKey::load_or_create(&path)
                    .map(|k| (k, path))
                    .map_err(|e| e.to_string()),
            }
        }
        None => {
            let places = keys::DefaultKeyPlaces::from_env(Path::new(&info_path), &trackers);
            match (own_line_key, places.find()) {
                (_, Err(e)) => Err(e.to_string()),
                (_, Ok(Some(found))) => Ok(found),
                (Some(k), Ok(None)) => Err(format!(
                    "line {tracker_no} of {info_path} says the service key is {k}, but no key \
                     file of that service is here: copy it to {} (or pass --service-key FILE)",
                    places.beside_file.display()
                )),
                (None, Ok(None)) => places.find_or_create().map_err(|e| e.to_string()),
            }
        }
    };
    let (service_key, key_path) = match found {
        Ok(found) => found,
        Err(e) => {
            error!("{e}");
            eprintln!("tracker_program: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let public_key = service_key.public_key();
    if print_key {
        println!("{public_key}");
        return ExitCode::SUCCESS;
    }
    // A key on a tracker line says which service that tracker belongs to: ours must match
    // our own line; another line's mismatch means that tracker can never link with us.
    for (i, line) in lines.iter().enumerate() {
        match line.key {
            Some(k) if k != public_key && i + 1 == usize::from(tracker_no) => {
                let msg = format!(
                    "the service key in {} ({}) is {public_key}, but line {tracker_no} of \
                     {info_path} says {k}: use that service's key file (--service-key FILE)",
                    key_path.display(),
                    if matches.opt_present("service-key") {
                        "--service-key"
                    } else {
                        "the default for this tracker file"
                    },
                );
                error!("{msg}");
                eprintln!("tracker_program: {msg}");
                return ExitCode::from(EXIT_USAGE);
            }
            Some(k) if k != public_key => warn!(
                "tracker {} of {info_path} has service key {k}, not ours ({public_key}): \
                 it will not link with this tracker",
                i + 1
            ),
            _ => {}
        }
    }
    let addr = trackers[usize::from(tracker_no) - 1];
    let data_path = match matches.opt_str("data-dir") {
        Some(dir) => PathBuf::from(dir),
        None => match disk::default_data_dir(
            std::env::var_os("XDG_STATE_HOME"),
            std::env::var_os("HOME"),
            addr,
        ) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tracker_program: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    // Locked, damaged or unwritable: the tracker must not run on it (nor start empty beside
    // it), so this is a start-up error like a bad argument.
    // (A data directory created by this start holds nothing: see `found_service`.)
    let existed = data_path.exists();
    let (data_dir, recovered) = match DataDir::open(&data_path) {
        Ok(opened) => opened,
        Err(e) => {
            error!("tracker {tracker_no}: {e}");
            eprintln!("tracker_program: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    info!(
        "tracker {tracker_no}: data directory {} (recovered up to seq {})",
        data_dir.path().display(),
        recovered.last_seq
    );
    let mut restored = match durable::restore(&recovered) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("data directory {}: {e}", data_dir.path().display());
            error!("tracker {tracker_no}: {msg}");
            eprintln!("tracker_program: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let empty = recovered.meta.is_none() && recovered.last_seq == 0;
    drop(recovered);
    let marker = key_path.with_extension("founder");
    restored.founder = match disk::found_service(&marker, data_dir.path(), existed) {
        Ok(founder) => founder,
        Err(e) => {
            error!("tracker {tracker_no}: {e}");
            eprintln!("tracker_program: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if empty && !restored.founder {
        info!(
            "tracker {tracker_no}: empty data directory; the service was founded by the tracker named in {}: this tracker joins it",
            marker.display()
        );
    }
    match driver::run(TrackerConfig {
        trackers,
        tracker_no,
        service_key,
        key_path,
        data: (data_dir, restored),
        allow_foreign_addresses: matches.opt_present("allow-foreign-addresses"),
        accept_plain_clients: matches.opt_present("accept-plain-clients"),
        quotas,
        limits,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("tracker {tracker_no} stopped: {e}");
            eprintln!("tracker_program: {e}");
            ExitCode::FAILURE
        }
    }
}
