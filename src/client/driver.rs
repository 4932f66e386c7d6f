//! The client's mio reactor: stdin lines and hash results arrive through one `Waker`, the
//! tracker link and the peer listener are mio sources, [`ClientCore`] decides what commands
//! do and [`Uplink`] which tracker to talk to. Nothing here blocks: the tracker link connects
//! with a non-blocking socket, and its timers are the core's.
//!
//! The tracker link runs over the secure layer ([`crate::net::secure`], `Noise_NX`): a
//! connection is reported up to [`Uplink`] only once the handshake is done and the tracker
//! proved the service key this client expects ([`TrackerKeys`]), or, on first use, once that
//! key is remembered. Until then nothing but handshake bytes is written, so no request (no
//! password) ever reaches a process that is not a tracker of the service. While the link races
//! trackers for a new link the driver holds up to [`MAX_RACE`] tracker sockets, one poll token
//! each, named by the core's [`LinkId`]s; a key is checked again when a handshake completes,
//! since a raced tracker may have been trusted on first use meanwhile.
//!
//! The loop feeds the core one command at a time (the next line waits until the current
//! command has its answer), performs the core's outputs (print, send, hash) and exits once
//! input has ended and nothing is left running, or at SIGINT/SIGTERM. With `--serve` it keeps
//! running after input ends.

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::complete::CompletionData;
use super::disk;
use super::identity::ClientIdentity;
use super::known_trackers::TrackerKeys;
use super::progress::{self, Drawn, Item, RecentRates, StatusLine};
use super::session::{ClientCore, DownloadError, DownloadStatus, Output};
use super::shell::{self, Shell};
use super::state_file::{self, FileStamp, StateLock};
use super::transfers::{
    PeerCaps, TransferEvent, Transfers, CIPHER_PREFS_ENV, PLAINTEXT_PEER_LINKS_ENV,
};
use super::uplink::{LinkId, Uplink, UplinkEvent, MAX_RACE};
use crate::hasher::{HashPool, HashResult};
use crate::keys::{self, PublicKey};
use crate::net::conn::{connect_progress, ConnError, ConnectProgress, FIRST_CONN_TOKEN};
use crate::net::peer_secure::CipherPrefs;
use crate::net::secure::{IdentityCheck, Params, SecureError, SecureLink};
use crate::net::wake::{self, StdinEvent};
use crate::net::{Conn, ConnId, ReadEnd};
use crate::wire::frame::MAX_CLIENT_TRACKER_FRAME;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);
/// The first tracker socket's token; the others follow, one per slot of the race.
const TRACKER_FIRST: usize = 3;
const _: () = assert!(TRACKER_FIRST + MAX_RACE <= FIRST_CONN_TOKEN);

pub struct ClientConfig {
    /// Where this client listens for peers.
    pub listen: SocketAddr,
    pub trackers: Vec<SocketAddr>,
    /// Keep running after standard input ends.
    pub serve: bool,
    /// Where the progress line is, shared with the logger's stderr sink.
    pub drawn: Drawn,
    /// The client's state directory (`None` when it has none: no home directory).
    pub state_dir: Option<PathBuf>,
    /// The service keys the trackers must present.
    pub tracker_keys: TrackerKeys,
}

/// How far a tracker socket got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SockStage {
    /// The TCP connection is being made.
    Connecting,
    /// The secure handshake runs.
    Handshaking,
    /// The handshake is done: frames go both ways.
    Up,
}

/// One tracker connection the link core asked for.
struct TrackerSock {
    id: LinkId,
    addr: SocketAddr,
    conn: Conn<()>,
    stage: SockStage,
}

/// Why a tracker's secure handshake failed.
enum Handshake {
    /// It proved another service key (the message names both, and where the expected one
    /// comes from).
    Refused(String),
    /// Anything else (closed, reset, a bad message).
    Failed(String),
}

/// Longest wait at the end of input for requests on the side (a download's registration as
/// a share, a remembered download asking for its sharers...): as long as a command's answer.
const BACKGROUND_WAIT: Duration = Duration::from_secs(30);

struct Driver {
    poll: Poll,
    listener: TcpListener,
    core: ClientCore,
    config: ClientConfig,
    /// The sockets to trackers, connecting or connected, as `uplink` asked: the link, or
    /// the attempts of a race (slot `i` has the token `TRACKER_FIRST + i`).
    trackers: [Option<TrackerSock>; MAX_RACE],
    /// Which trackers, when to ping, when to move on.
    uplink: Uplink,
    /// Why the last tracker was refused (a key mismatch), for the command that then fails.
    tracker_refusal: Option<String>,
    hasher: HashPool,
    transfers: Transfers,
    /// Input waiting for the core, in order (end of input included).
    lines: VecDeque<StdinEvent>,
    /// When standard input ended (or `quit` came); requests on the side are waited for at
    /// most [`BACKGROUND_WAIT`] after that (a tracker that keeps its link up but never
    /// answers must not hold the exit for ever; what they would have recorded is in the
    /// state file anyway).
    input_done_at: Option<Instant>,
    interactive: bool,
    /// Where the plain prompt (no shell) is written.
    prompt_out: PromptOut,
    prompted: bool,
    /// The progress line on a terminal.
    status: StatusLine,
    rates: RecentRates,
    /// The interactive shell, when stdin and stdout are a terminal; all output to the
    /// terminal then goes through it.
    shell: Option<Shell>,
    /// The state directory's lock, held for the whole run (`None`: no state directory).
    state_lock: Option<StateLock>,
}

/// Runs the client; returns the exit status (0 if every command succeeded, else 1).
pub fn run(config: ClientConfig) -> io::Result<u8> {
    // Room for the peer links' caps; they shrink to fit when the limit cannot be raised.
    let open_files = rlimit::increase_nofile_limit(u64::MAX).unwrap_or_else(|e| {
        warn!("could not raise the open file limit: {e}");
        1024
    });
    let poll = Poll::new()?;
    let mut listener = TcpListener::bind(config.listen)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    // Locked after the address is ours: a second client at the same address fails on the
    // address; one given the same directory with --state-dir fails here.
    let (state_lock, remembered) = match &config.state_dir {
        Some(dir) => {
            let lock = StateLock::acquire(dir).map_err(|e| io::Error::other(e.to_string()))?;
            (Some(lock), load_state(dir))
        }
        None => (None, state_file::ClientState::default()),
    };
    // The identity its peer links prove; registered with the tracker at login.
    let identity = match &config.state_dir {
        Some(dir) => ClientIdentity::load_or_create(dir),
        None => ClientIdentity::generate(),
    }
    .map_err(|e| io::Error::other(e.to_string()))?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let _signals = wake::register_signals(poll.registry(), SIGNALS)?;
    let n_workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let (hasher, hashed) = HashPool::start(n_workers, Arc::clone(&waker))?;
    let (shell, stdin) = shell::start_input(&waker, config.state_dir.as_deref(), &config.drawn)?;
    info!("client listening for peers on {}", config.listen);
    let status = StatusLine::for_stderr(config.drawn.clone());
    let mut core = ClientCore::new(config.listen);
    core.listings_mut().set_tables(shell.is_some());
    core.restore(remembered);
    core.set_client_key(identity.public());
    // This process's random id, sent in every tracker handshake.
    let client_id = getrandom::u64().map_err(|e| io::Error::other(e.to_string()))?;
    let uplink = Uplink::new(config.trackers.clone(), client_id);
    let mut transfers = Transfers::default()
        .with_caps(PeerCaps::for_open_files(open_files))
        .with_identity(identity);
    if std::env::var_os(PLAINTEXT_PEER_LINKS_ENV).is_some_and(|v| v == "1") {
        // Benchmark and test use only: never silent.
        warn!(
            "{PLAINTEXT_PEER_LINKS_ENV}=1: peer links in the plain, unencrypted protocol \
             (for the throughput benchmark's comparison only; file contents cross the \
             network in clear)"
        );
        transfers = transfers.with_plaintext_peer_links();
    }
    match std::env::var(CIPHER_PREFS_ENV).as_deref() {
        Ok("aes") => {
            warn!("{CIPHER_PREFS_ENV}=aes: peer links prefer AES-128-GCM whatever the CPU");
            transfers = transfers.with_cipher_prefs(CipherPrefs::AES_FIRST);
        }
        Ok("chacha") => {
            warn!(
                "{CIPHER_PREFS_ENV}=chacha: peer links prefer ChaCha20-Poly1305 whatever the CPU"
            );
            transfers = transfers.with_cipher_prefs(CipherPrefs::CHACHA_FIRST);
        }
        Ok(other) => warn!("{CIPHER_PREFS_ENV}={other}: not `aes` or `chacha`; ignored"),
        Err(_) => {}
    }
    let mut driver = Driver {
        poll,
        listener,
        core,
        config,
        trackers: Default::default(),
        uplink,
        tracker_refusal: None,
        hasher,
        transfers,
        lines: VecDeque::new(),
        input_done_at: None,
        interactive: io::stdin().is_terminal(),
        prompt_out: PromptOut::detect(),
        prompted: false,
        status,
        rates: RecentRates::default(),
        shell,
        state_lock,
    };
    let result = driver.run(&stdin, &hashed);
    match &driver.shell {
        Some(shell) => shell.finish(),
        None => driver
            .status
            .paint(None, false, Instant::now(), &mut io::stderr()),
    }
    drop(waker);
    result
}

/// What the state file in `dir` remembers. A damaged file is moved aside with a warning that
/// names it, and the client starts without it.
fn load_state(dir: &std::path::Path) -> state_file::ClientState {
    match state_file::load(dir) {
        Ok(state) => state,
        Err(e @ state_file::LoadError::Corrupt { .. }) => {
            match state_file::set_aside(dir) {
                Ok(bad) => warn!("{e}: moved to {}; starting without it", bad.display()),
                Err(move_error) => {
                    warn!("{e} (cannot move it aside: {move_error}); starting without it")
                }
            }
            state_file::ClientState::default()
        }
        Err(e) => {
            warn!("{e}; starting without the remembered state");
            state_file::ClientState::default()
        }
    }
}

/// Where the plain prompt goes when standard input is a terminal but the shell is not used:
/// standard output when it is a terminal, else standard error when that one is (results
/// redirected to a file must hold results only), else nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PromptOut {
    Stdout,
    Stderr,
    Nowhere,
}

impl PromptOut {
    fn detect() -> Self {
        if io::stdout().is_terminal() {
            PromptOut::Stdout
        } else if io::stderr().is_terminal() {
            PromptOut::Stderr
        } else {
            PromptOut::Nowhere
        }
    }

    fn write(self, text: &str) {
        match self {
            PromptOut::Stdout => {
                let mut out = io::stdout().lock();
                let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            }
            PromptOut::Stderr => {
                let _ = io::stderr().lock().write_all(text.as_bytes());
            }
            PromptOut::Nowhere => {}
        }
    }
}

impl Driver {
    fn run(
        &mut self,
        stdin: &Receiver<StdinEvent>,
        hashed: &Receiver<HashResult>,
    ) -> io::Result<u8> {
        let mut events = Events::with_capacity(256);
        loop {
            self.feed_commands();
            if self.input_done()
                && !self.core.is_busy()
                && !self.core.has_running_downloads()
                && !self.waits_for_background()
                && !self.config.serve
            {
                return Ok(self.exit_status());
            }
            self.prompt();
            let deadline = [
                self.core.poll_timeout(),
                self.status
                    .next_paint(self.core.has_running_downloads(), Instant::now()),
                self.transfers.next_deadline(),
                self.uplink.poll_timeout(),
                self.input_done_at
                    .filter(|_| self.core.has_background_work())
                    .map(|t| t + BACKGROUND_WAIT),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = if self.transfers.has_ready() {
                Some(Duration::ZERO)
            } else {
                deadline.map(|t| t.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => {
                        self.drain_stdin(stdin);
                        while let Ok(result) = hashed.try_recv() {
                            let now = Instant::now();
                            let registry = self.poll.registry();
                            match result {
                                HashResult::File(done) => self.core.handle_hashed(done, now),
                                HashResult::Piece(checked) => self.transfers.on_piece_checked(
                                    registry,
                                    &self.hasher,
                                    checked,
                                    now,
                                ),
                                HashResult::Stream(done) => {
                                    self.transfers.on_stream(registry, done)
                                }
                            }
                            self.pump();
                        }
                    }
                    SIGNALS => {
                        info!("signal received: exiting");
                        self.transfers.abort_all(self.poll.registry());
                        // Report the abandoned downloads (an `error: ` line each; they count
                        // as failures for the exit status).
                        self.pump();
                        return Ok(self.exit_status());
                    }
                    LISTENER => self.accept_peers(),
                    token if (TRACKER_FIRST..TRACKER_FIRST + MAX_RACE).contains(&token.0) => {
                        let slot = token.0 - TRACKER_FIRST;
                        match self.trackers[slot].as_ref().map(|t| t.stage) {
                            None => {}
                            Some(SockStage::Connecting | SockStage::Handshaking) => {
                                self.tracker_connecting(slot)
                            }
                            Some(SockStage::Up) => {
                                if event.is_writable() {
                                    self.flush_tracker(slot);
                                }
                                if event.is_readable() || event.is_read_closed() || event.is_error()
                                {
                                    self.read_tracker(slot);
                                }
                            }
                        }
                    }
                    token if token.0 >= FIRST_CONN_TOKEN => {
                        self.transfers.on_event(
                            self.poll.registry(),
                            &self.hasher,
                            token,
                            event.is_readable() || event.is_read_closed() || event.is_error(),
                            event.is_writable(),
                            &self.core,
                            Instant::now(),
                        );
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
            if self.transfers.has_ready() {
                self.transfers
                    .run_ready(self.poll.registry(), &self.hasher, &self.core, now);
            }
            self.transfers
                .on_tick(self.poll.registry(), &self.hasher, now);
            self.uplink.handle_timeout(now);
            self.core.handle_timeout(now);
            self.pump();
            self.paint_status(now);
        }
    }

    /// The running downloads' progress, for the progress line.
    fn progress_text(&mut self, now: Instant) -> Option<String> {
        let running: Vec<_> = self
            .core
            .downloads()
            .iter()
            .filter(|d| d.status == DownloadStatus::Running)
            .collect();
        self.rates.retain(|id| running.iter().any(|d| d.id.0 == id));
        let items: Vec<Item<'_>> = running
            .into_iter()
            .filter_map(|d| {
                let (progress, elapsed) = self.transfers.progress(d.id)?;
                Some(Item {
                    name: d.name.as_str(),
                    progress,
                    elapsed,
                    recent_rate: self.rates.sample(d.id.0, progress.bytes_verified, now),
                })
            })
            .collect();
        progress::summary(&items, progress::line_width())
    }

    /// Redraws the progress line when it is due.
    fn paint_status(&mut self, now: Instant) {
        let running = self.core.has_running_downloads();
        if self
            .status
            .next_paint(running, now)
            .is_some_and(|t| t <= now)
        {
            let text = self.progress_text(now);
            if let Some(shell) = &self.shell {
                self.status.painted_elsewhere(now);
                return shell.progress(text);
            }
            let at_prompt = self.interactive && !self.input_done();
            self.status
                .paint(text.as_deref(), at_prompt, now, &mut io::stderr());
        }
    }

    fn exit_status(&self) -> u8 {
        u8::from(self.core.n_failed() > 0)
    }

    fn prompt(&mut self) {
        if self.interactive
            && !self.prompted
            && !self.input_done()
            && !self.core.is_busy()
            && self.lines.is_empty()
        {
            if self.shell.is_some() {
                let now = Instant::now();
                let text = self.progress_text(now).filter(|_| self.status.is_enabled());
                self.status.painted_elsewhere(now);
                let data = CompletionData::from_core(&self.core);
                if let Some(shell) = &self.shell {
                    shell.prompt(text, data);
                }
                self.prompted = true;
                return;
            }
            if self.status.is_enabled() {
                let now = Instant::now();
                let text = self.progress_text(now);
                self.status
                    .at_prompt(text.as_deref(), now, &mut io::stderr());
            }
            self.prompt_out.write("> ");
            self.prompted = true;
        }
    }

    /// Output is about to be printed: a line that arrives while the prompt waits (a download
    /// that ended) goes below it, and the prompt is printed again after it.
    fn leave_prompt(&mut self) {
        if self.shell.is_some() {
            // The shell's screen writes above the prompt; the prompt stays.
            return;
        }
        self.status.before_output(&mut io::stderr());
        if self.prompted {
            self.prompt_out.write("\n");
            self.prompted = false;
        }
    }

    fn drain_stdin(&mut self, stdin: &Receiver<StdinEvent>) {
        loop {
            let (event, more) = match stdin.try_recv() {
                Ok(event) => (event, true),
                Err(TryRecvError::Disconnected) => (StdinEvent::Eof, false),
                Err(TryRecvError::Empty) => return,
            };
            // A typed line (or the end of input) moved the cursor below the prompt: the
            // progress line is no longer just above it.
            self.status.before_output(&mut io::stderr());
            self.lines.push_back(event);
            if !more {
                return;
            }
        }
    }

    /// Hands queued lines to the core while it is free.
    fn feed_commands(&mut self) {
        while !self.core.is_busy() && !self.input_done() {
            let Some(event) = self.lines.pop_front() else {
                return;
            };
            self.prompted = false;
            match event {
                StdinEvent::Eof => {
                    self.input_done_at.get_or_insert_with(Instant::now);
                    // The shell's editor ends the line itself.
                    if self.interactive && self.shell.is_none() {
                        self.prompt_out.write("\n");
                    }
                }
                StdinEvent::TooLong => {
                    self.core.record_failure();
                    match &self.shell {
                        Some(shell) => shell.print_err("error: command line too long".into()),
                        None => eprintln!("error: command line too long"),
                    }
                }
                StdinEvent::Line(line) => {
                    self.core.handle_line(&line, Instant::now());
                    self.pump();
                }
            }
        }
    }

    fn perform_outputs(&mut self) {
        while let Some(output) = self.core.poll_output() {
            if matches!(output, Output::Print(_) | Output::Fail(_)) {
                // What a printed line reports (a share, a download started) is on disk first.
                self.save_state();
            }
            match output {
                Output::Print(line) if self.shell.is_some() => {
                    if let Some(shell) = &self.shell {
                        shell.print(line);
                    }
                }
                Output::Fail(reason) if self.shell.is_some() => {
                    if let Some(shell) = &self.shell {
                        shell.print_err(format!("error: {reason}"));
                    }
                }
                Output::Print(line) => {
                    self.leave_prompt();
                    let mut stdout = io::stdout().lock();
                    let _ = writeln!(stdout, "{line}");
                    let _ = stdout.flush();
                }
                Output::Fail(reason) => {
                    self.leave_prompt();
                    let _ = writeln!(io::stderr().lock(), "error: {reason}");
                }
                // Written by `drive_uplink`, or carried by the next link with the others.
                Output::Send(request) => self.uplink.send(request, Instant::now()),
                Output::Inspect(query) => {
                    let answer = disk::inspect(&query);
                    self.core.handle_inspected(answer, Instant::now());
                }
                Output::HashFile { job, path } => {
                    self.hasher.hash_file(job, path, crate::wire::PIECE_LEN)
                }
                Output::Quit => {
                    self.input_done_at.get_or_insert_with(Instant::now);
                    self.lines.clear();
                }
                Output::StartDownload {
                    id,
                    group,
                    meta,
                    peers,
                    target,
                } => {
                    let result = self.transfers.start_download(
                        self.poll.registry(),
                        &self.hasher,
                        id,
                        group,
                        meta,
                        &peers,
                        target,
                        Instant::now(),
                    );
                    self.core.handle_download_started(id, result);
                }
                Output::Ticket {
                    download,
                    ticket,
                    peer_keys,
                } => self
                    .transfers
                    .set_ticket(self.poll.registry(), download, ticket, peer_keys),
                Output::Sharers { download, result } => self.transfers.on_sharers(
                    self.poll.registry(),
                    &self.hasher,
                    download,
                    result,
                    Instant::now(),
                ),
                Output::ShowDownloads => self.show_downloads(),
                Output::SharesChanged => {
                    self.transfers.revalidate(self.poll.registry(), &self.core);
                }
                Output::StopDownloads { downloads } => {
                    for id in downloads {
                        self.transfers.stop_download(
                            self.poll.registry(),
                            id,
                            DownloadError::LeftGroup,
                        );
                    }
                }
                Output::CheckShares { shares } => {
                    let checked = shares
                        .into_iter()
                        .map(|s| {
                            let stamp = FileStamp::read(&s.path).map_err(|e| e.to_string());
                            (s, stamp)
                        })
                        .collect();
                    self.core.handle_shares_checked(checked, Instant::now());
                }
            }
        }
    }

    /// Performs the core's outputs, the tracker link's and the transfers' events until all are
    /// quiet.
    fn pump(&mut self) {
        loop {
            self.perform_outputs();
            if self.drive_uplink() {
                continue;
            }
            let Some(event) = self.transfers.poll_event() else {
                self.save_state();
                return;
            };
            match event {
                TransferEvent::FirstPiece { download } => self.core.handle_first_piece(download),
                TransferEvent::QuerySharers { download } => self.core.query_sharers(download),
                TransferEvent::Finished { download, result } => {
                    let target = self
                        .core
                        .downloads()
                        .iter()
                        .find(|d| d.id == download)
                        .map(|d| d.target.clone());
                    let completed = result.is_ok();
                    self.core.handle_download_finished(download, result);
                    if let (true, Some(target)) = (completed, target) {
                        if let Ok(stamp) = FileStamp::read(&target) {
                            self.core.note_stamp(&target, stamp);
                        }
                    }
                }
            }
        }
    }

    /// Standard input ended (or `quit` came): no more commands are read.
    fn input_done(&self) -> bool {
        self.input_done_at.is_some()
    }

    /// Input ended and requests on the side are still on their way, for less than
    /// [`BACKGROUND_WAIT`] since: the exit waits for them.
    fn waits_for_background(&self) -> bool {
        self.core.has_background_work()
            && self
                .input_done_at
                .is_none_or(|t| t.elapsed() < BACKGROUND_WAIT)
    }

    /// Writes the state file if what it holds changed. A failure is logged: the client goes
    /// on, remembering less.
    fn save_state(&mut self) {
        if !self.core.take_state_dirty() {
            return;
        }
        let Some(dir) = &self.config.state_dir else {
            return;
        };
        if self.state_lock.is_none() {
            return;
        }
        if let Err(e) = state_file::save(dir, &self.core.saved_state()) {
            warn!(
                "cannot write the state file {}: {e}",
                dir.join(state_file::STATE_FILE).display()
            );
        }
    }

    /// `show_downloads`: one line per download, in the order started; on a terminal the
    /// running ones also show their progress.
    fn show_downloads(&mut self) {
        self.status.before_output(&mut io::stderr());
        let mut lines = Vec::new();
        for d in self.core.downloads() {
            let tag = match d.status {
                DownloadStatus::Running => "D",
                DownloadStatus::Complete => "C",
                DownloadStatus::Failed => "F",
            };
            let mut line = format!("[{tag}] [{}] {}", d.group, d.name);
            if self.interactive
                && self.prompt_out == PromptOut::Stdout
                && d.status == DownloadStatus::Running
            {
                if let Some((p, elapsed)) = self.transfers.progress(d.id) {
                    line.push_str(&format!(
                        "  {:.1}%  {:.1} MiB/s  {} peers",
                        p.percent(),
                        p.average_mib_s(elapsed),
                        p.active_peers
                    ));
                }
            }
            lines.push(line);
        }
        // Remembered downloads continuing after the login are running for the user, though
        // their sharers' answer may not be here yet.
        for saved in self.core.resuming_downloads() {
            lines.push(format!("[D] [{}] {}", saved.group, saved.name));
        }
        if let Some(shell) = &self.shell {
            return lines.into_iter().for_each(|line| shell.print(line));
        }
        let mut stdout = io::stdout().lock();
        for line in lines {
            let _ = writeln!(stdout, "{line}");
        }
        let _ = stdout.flush();
    }

    /// Does what the tracker link core asks for and writes what it has to send; returns
    /// whether it asked for anything (the session may then have outputs).
    fn drive_uplink(&mut self) -> bool {
        let mut acted = false;
        while let Some(event) = self.uplink.poll_event() {
            acted = true;
            match event {
                UplinkEvent::Connect(id, addr) => self.open_tracker(id, addr),
                UplinkEvent::Close(id) => self.close_tracker(id),
                UplinkEvent::Connected => {
                    // A refusal seen during the race is not the next command's failure.
                    self.tracker_refusal = None;
                    // A new link carries a resume of the session and every request in flight.
                    let now = Instant::now();
                    for request in self.core.requests_for_new_link() {
                        self.uplink.send(request, now);
                    }
                }
                UplinkEvent::Unreachable => match self.tracker_refusal.take() {
                    Some(refusal) => self.core.handle_send_failed(&refusal),
                    None => self.core.handle_send_failed("no tracker is reachable"),
                },
                UplinkEvent::SessionLost => self.core.handle_tracker_lost(),
            }
        }
        let mut queued = [false; MAX_RACE];
        while let Some((id, msg)) = self.uplink.poll_transmit() {
            if let Some(slot) = self.tracker_slot(id) {
                if let Some(t) = self.trackers[slot].as_mut() {
                    msg.emit(t.conn.out());
                    queued[slot] = true;
                }
            }
        }
        for (slot, _) in queued.iter().enumerate().filter(|(_, q)| **q) {
            self.flush_tracker(slot);
        }
        acted
    }

    /// The slot of tracker connection `id`, if it is open.
    fn tracker_slot(&self, id: LinkId) -> Option<usize> {
        self.trackers
            .iter()
            .position(|t| t.as_ref().is_some_and(|t| t.id == id))
    }

    /// Starts a non-blocking connection `id` to a tracker, in a free slot (the core never
    /// asks for more than [`MAX_RACE`] at once).
    fn open_tracker(&mut self, id: LinkId, addr: SocketAddr) {
        let Some(slot) = self.trackers.iter().position(Option::is_none) else {
            let reason = format!("more than {MAX_RACE} tracker connections");
            return self
                .uplink
                .handle_connect_failed(id, &reason, Instant::now());
        };
        let registry = self.poll.registry();
        let conn_id = ConnId {
            key: slot,
            generation: id.0,
        };
        let token = Token(TRACKER_FIRST + slot);
        let opened = connect_from(self.config.listen.ip(), addr).and_then(|stream| {
            let _ = stream.set_nodelay(true);
            let mut conn = Conn::new(
                registry,
                stream,
                token,
                conn_id,
                MAX_CLIENT_TRACKER_FRAME,
                (),
            )?;
            conn.await_connect(registry)?;
            Ok(conn)
        });
        match opened {
            Ok(conn) => {
                self.trackers[slot] = Some(TrackerSock {
                    id,
                    addr,
                    conn,
                    stage: SockStage::Connecting,
                })
            }
            Err(e) => self
                .uplink
                .handle_connect_failed(id, &e.to_string(), Instant::now()),
        }
    }

    /// Closes tracker connection `id` if it is open.
    fn close_tracker(&mut self, id: LinkId) {
        if let Some(slot) = self.tracker_slot(id) {
            if let Some(mut t) = self.trackers[slot].take() {
                t.conn.deregister(self.poll.registry());
            }
        }
    }

    /// The connecting tracker socket in `slot` became ready: connected (then its secure
    /// handshake starts), failed, or, while handshaking, the tracker's answer arrived.
    fn tracker_connecting(&mut self, slot: usize) {
        let Some(t) = self.trackers[slot].as_mut() else {
            return;
        };
        let (id, addr) = (t.id, t.addr);
        let now = Instant::now();
        if t.stage == SockStage::Connecting {
            let failed = match connect_progress(&t.conn.stream) {
                ConnectProgress::Connected => None,
                ConnectProgress::Pending => return,
                ConnectProgress::Failed(e) => Some(e),
            };
            if let Some(e) = failed {
                self.close_tracker(id);
                self.uplink.handle_connect_failed(id, &e.to_string(), now);
                self.pump();
                return;
            }
            let expected = self.config.tracker_keys.expected(addr).map(|(k, _)| k.0);
            let params = Params::client_link_initiator(IdentityCheck {
                verify: keys::verify_static_cert,
                expected,
            });
            match SecureLink::initiator(&params) {
                Ok(link) => t.conn.set_secure(link),
                Err(e) => {
                    self.close_tracker(id);
                    self.uplink.handle_connect_failed(id, &e.to_string(), now);
                    self.pump();
                    return;
                }
            }
            t.stage = SockStage::Handshaking;
            self.uplink.handle_transport_up(id, now);
        }
        let result = self.tracker_handshake(slot).and_then(|presented| {
            let Some(presented) = presented else {
                return Ok(None);
            };
            // Checked again now: while this handshake ran, another tracker of the race may
            // have been trusted on first use, and it binds this one.
            match self.config.tracker_keys.expected(addr) {
                Some((expected, source)) if expected != presented => Err(Handshake::Refused(
                    TrackerKeys::refusal(addr, presented, expected, &source),
                )),
                _ => Ok(Some(presented)),
            }
        });
        match result {
            Ok(None) => return,
            Ok(Some(presented)) => {
                if let Some(t) = self.trackers[slot].as_mut() {
                    t.stage = SockStage::Up;
                }
                // Tickets this client is shown are checked with the key its trackers prove.
                self.transfers.set_service_key(presented);
                let keys = &mut self.config.tracker_keys;
                if keys.expected(addr).is_none() {
                    info!("tracker {addr}: first use, trusting service key {presented}");
                    if let Err(e) = keys.known.remember(addr, presented) {
                        warn!("{e}: the key of tracker {addr} is not remembered");
                    }
                }
                self.uplink.handle_connected(id, now);
            }
            Err(Handshake::Refused(reason)) => {
                warn!("{reason}");
                self.close_tracker(id);
                // Another service's key: the command fails naming it, and no other tracker
                // of the file is trusted on first use in its place.
                self.tracker_refusal = Some(reason.clone());
                self.uplink.handle_refused(id, &reason, now);
            }
            Err(Handshake::Failed(reason)) => {
                warn!("tracker {addr}: {reason}");
                self.close_tracker(id);
                self.uplink.handle_connect_failed(id, &reason, now);
            }
        }
        self.pump();
    }

    /// Moves the handshake of the tracker socket in `slot` on: `Ok(Some(key))` once it is
    /// done and the tracker proved the service key `key`, `Ok(None)` while it goes on, an
    /// error if it failed.
    fn tracker_handshake(&mut self, slot: usize) -> Result<Option<PublicKey>, Handshake> {
        let Some(t) = self.trackers[slot].as_mut() else {
            return Err(Handshake::Failed("no connection".into()));
        };
        let addr = t.addr;
        let registry = self.poll.registry();
        t.conn
            .flush(registry)
            .map_err(|e| Handshake::Failed(format!("write failed: {e}")))?;
        // No frame can come before the handshake is done and our hello sent: stop at the
        // first one (there is none) and judge the secure layer.
        let read = t.conn.read_frames(1, |_| false);
        if let Some(identity) = t.conn.secure().and_then(|s| s.remote_identity()) {
            return Ok(Some(PublicKey(identity)));
        }
        match read {
            Ok(ReadEnd::WouldBlock) => Ok(None),
            Ok(_) => Err(Handshake::Failed(
                "closed the connection during the handshake".into(),
            )),
            Err(ConnError::Secure(SecureError::WrongIdentity {
                expected,
                presented,
            })) => {
                let source = self
                    .config
                    .tracker_keys
                    .expected(addr)
                    .map(|(_, source)| source)
                    .unwrap_or(super::known_trackers::KeySource::Remembered(None));
                Err(Handshake::Refused(TrackerKeys::refusal(
                    addr,
                    PublicKey(presented),
                    PublicKey(expected),
                    &source,
                )))
            }
            Err(e) => Err(Handshake::Failed(e.to_string())),
        }
    }

    /// Writes what is queued for the tracker socket in `slot`; a failed write breaks it.
    fn flush_tracker(&mut self, slot: usize) {
        // A connecting socket has nothing to write yet, and must keep its `WRITABLE` interest
        // to tell when it is up.
        let Some(t) = self.trackers[slot].as_mut() else {
            return;
        };
        if t.stage != SockStage::Up {
            return;
        }
        if let Err(e) = t.conn.flush(self.poll.registry()) {
            let id = t.id;
            self.uplink
                .handle_closed(id, &format!("write failed: {e}"), Instant::now());
        }
    }

    /// Reads the frames of the tracker socket in `slot` (a welcome, replies), for as long as
    /// the link core wants them.
    fn read_tracker(&mut self, slot: usize) {
        let Some(t) = self.trackers[slot].as_mut() else {
            return;
        };
        let id = t.id;
        let core = &mut self.core;
        let uplink = &mut self.uplink;
        let now = Instant::now();
        let result = t.conn.read_frames(usize::MAX, |payload| {
            if let Some(reply) = uplink.handle_frame(id, payload, now) {
                core.handle_reply(reply);
            }
            // A frame that broke the connection, or a loser's, ends the reading.
            uplink.wants_frames(id)
        });
        if uplink.wants_frames(id) {
            match result {
                Ok(ReadEnd::Eof) => uplink.handle_closed(id, "closed the connection", now),
                Err(e) => uplink.handle_closed(id, &e.to_string(), now),
                Ok(_) => {}
            }
        }
        self.pump();
    }

    /// Takes every waiting peer connection.
    fn accept_peers(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.transfers.accept(self.poll.registry(), stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }
}

/// Starts a non-blocking connection to `to` from the IP this client listens on (`listen_ip`),
/// so that the tracker sees the connection come from the address it hands to downloaders (it
/// refuses a login whose listen address is on another IP). A client listening on every
/// address, or on loopback while its tracker is elsewhere (a loopback source cannot reach
/// it), lets the kernel choose, as a plain connect does.
fn connect_from(listen_ip: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let bind_to = (!listen_ip.is_unspecified()
        && listen_ip.is_ipv4() == to.is_ipv4()
        && (!listen_ip.is_loopback() || to.ip().is_loopback()))
    .then_some(SocketAddr::new(listen_ip, 0));
    let Some(local) = bind_to else {
        return TcpStream::connect(to);
    };
    let family = if to.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::bind(&fd, &local)?;
    match rustix::net::connect(&fd, &to) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from_std(std::net::TcpStream::from(fd)))
}
