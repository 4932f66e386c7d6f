//! The client's mio reactor: stdin lines and hash results arrive through one `Waker`, the
//! tracker link and the peer listener are mio sources, and [`ClientCore`] decides everything.
//!
//! The loop feeds the core one command at a time (the next line waits until the current
//! command has its answer), performs the core's outputs (print, send, hash) and exits once
//! input has ended and nothing is left running, or at SIGINT/SIGTERM. With `--serve` it keeps
//! running after input ends.

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::complete::CompletionData;
use super::progress::{self, Drawn, Item, RecentRates, StatusLine};
use super::session::{ClientCore, DownloadStatus, Output};
use super::shell::{self, Shell};
use super::transfers::{TransferEvent, Transfers};
use crate::hasher::{HashPool, HashResult};
use crate::net::conn::FIRST_CONN_TOKEN;
use crate::net::wake::{self, StdinEvent};
use crate::net::{Conn, ConnId, ReadEnd};
use crate::wire::frame::MAX_CLIENT_TRACKER_FRAME;
use crate::wire::tracker_link::{ClientMsg, Request, RequestBody, TrackerMsg};
use crate::wire::PROTOCOL_VERSION;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);
const TRACKER: Token = Token(3);

/// How long connecting to one tracker may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// After losing its tracker, how long the client keeps trying the others before it gives up
/// its session (the trackers keep a lost client's session at least this long).
const RECONNECT_FOR: Duration = Duration::from_secs(10);
/// Pause between rounds of reconnection attempts.
const RECONNECT_EVERY: Duration = Duration::from_millis(200);
/// A tracker link quiet this long gets a ping (a live tracker answers it, or a request).
const PING_AFTER: Duration = Duration::from_millis(600);
/// A tracker silent this long, pings included, is taken for hung: the client moves on (a
/// request retried elsewhere is not applied twice, so a false alarm costs nothing).
const TRACKER_SILENCE: Duration = Duration::from_millis(1800);

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
}

/// The client's link to its tracker.
struct TrackerLink {
    conn: Conn<()>,
    addr: SocketAddr,
    welcomed: bool,
    /// When the tracker last sent a frame (or the link opened).
    last_heard: Instant,
    /// When the last ping went out.
    last_ping: Instant,
}

struct Driver {
    poll: Poll,
    listener: TcpListener,
    core: ClientCore,
    config: ClientConfig,
    tracker: Option<TrackerLink>,
    /// Index in the tracker file of the tracker last connected to.
    tracker_index: usize,
    /// Set after losing the tracker: (give up at, next attempt at).
    reconnecting: Option<(Instant, Instant)>,
    /// Tracker links in a row that broke before the tracker's welcome.
    failed_links: usize,
    /// Pings sent to trackers so far.
    n_pings: u64,
    /// This process's random id, sent in every tracker handshake.
    client_id: u64,
    n_links: u64,
    hasher: HashPool,
    transfers: Transfers,
    /// Input waiting for the core, in order (end of input included).
    lines: VecDeque<StdinEvent>,
    input_done: bool,
    interactive: bool,
    prompted: bool,
    /// The progress line on a terminal.
    status: StatusLine,
    rates: RecentRates,
    /// The interactive shell, when stdin and stdout are a terminal; all output to the
    /// terminal then goes through it.
    shell: Option<Shell>,
}

/// Runs the client; returns the exit status (0 if every command succeeded, else 1).
pub fn run(config: ClientConfig) -> io::Result<u8> {
    let poll = Poll::new()?;
    let mut listener = TcpListener::bind(config.listen)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let _signals = wake::register_signals(poll.registry(), SIGNALS)?;
    let n_workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let (hasher, hashed) = HashPool::start(n_workers, Arc::clone(&waker))?;
    let (shell, stdin) = shell::start_input(&waker, config.state_dir.as_deref(), &config.drawn)?;
    info!("client listening for peers on {}", config.listen);
    let status = StatusLine::for_stderr(config.drawn.clone());
    let mut core = ClientCore::new(config.listen);
    core.listings_mut().set_tables(shell.is_some());
    let mut driver = Driver {
        poll,
        listener,
        core,
        config,
        tracker: None,
        tracker_index: 0,
        reconnecting: None,
        failed_links: 0,
        n_pings: 0,
        client_id: getrandom::u64().map_err(|e| io::Error::other(e.to_string()))?,
        n_links: 0,
        hasher,
        transfers: Transfers::default(),
        lines: VecDeque::new(),
        input_done: false,
        interactive: io::stdin().is_terminal(),
        prompted: false,
        status,
        rates: RecentRates::default(),
        shell,
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

impl Driver {
    fn run(
        &mut self,
        stdin: &Receiver<StdinEvent>,
        hashed: &Receiver<HashResult>,
    ) -> io::Result<u8> {
        let mut events = Events::with_capacity(256);
        loop {
            self.feed_commands();
            if self.input_done
                && !self.core.is_busy()
                && !self.core.has_running_downloads()
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
                self.reconnecting.map(|(_, next)| next),
                self.tracker.as_ref().map(|l| {
                    (l.last_heard.max(l.last_ping) + PING_AFTER).min(l.last_heard + TRACKER_SILENCE)
                }),
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
                    TRACKER => {
                        if event.is_writable() {
                            self.flush_tracker();
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_tracker();
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
            if self.reconnecting.is_some_and(|(_, next)| next <= now) {
                self.reconnect(now);
            }
            self.watch_tracker(now);
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
        self.rates.retain(|id| running.iter().any(|d| d.id == id));
        let items: Vec<Item<'_>> = running
            .into_iter()
            .filter_map(|d| {
                let (progress, elapsed) = self.transfers.progress(d.id)?;
                Some(Item {
                    name: d.name.as_str(),
                    progress,
                    elapsed,
                    recent_rate: self.rates.sample(d.id, progress.bytes_verified, now),
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
            let at_prompt = self.interactive && !self.input_done;
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
            && !self.input_done
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
            print!("> ");
            let _ = io::stdout().flush();
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
            println!();
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
        while !self.core.is_busy() && !self.input_done {
            let Some(event) = self.lines.pop_front() else {
                return;
            };
            self.prompted = false;
            match event {
                StdinEvent::Eof => {
                    self.input_done = true;
                    // The shell's editor ends the line itself.
                    if self.interactive && self.shell.is_none() {
                        println!();
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
                Output::Send(request) => {
                    if self.tracker.is_none() && self.reconnecting.is_some() {
                        // Sent with the others once a tracker answers.
                        continue;
                    }
                    match self.ensure_tracker() {
                        Err(reason) => {
                            self.core.handle_send_failed(&reason);
                            continue;
                        }
                        // A new link carries every request in flight, this one included.
                        Ok(true) => {}
                        Ok(false) => {
                            if let Some(link) = self.tracker.as_mut() {
                                ClientMsg::Request(request).emit(link.conn.out());
                            }
                        }
                    }
                    self.flush_tracker();
                }
                Output::HashFile { job, path } => {
                    self.hasher.hash_file(job, path, crate::wire::PIECE_LEN)
                }
                Output::Quit => {
                    self.input_done = true;
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
            }
        }
    }

    /// Performs the core's outputs and the transfers' events until both are quiet.
    fn pump(&mut self) {
        loop {
            self.perform_outputs();
            let Some(event) = self.transfers.poll_event() else {
                return;
            };
            match event {
                TransferEvent::FirstPiece { download } => self.core.handle_first_piece(download),
                TransferEvent::QuerySharers { download } => self.core.query_sharers(download),
                TransferEvent::Finished { download, result } => {
                    self.core.handle_download_finished(download, result)
                }
            }
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
            if self.interactive && d.status == DownloadStatus::Running {
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
        if let Some(shell) = &self.shell {
            return lines.into_iter().for_each(|line| shell.print(line));
        }
        let mut stdout = io::stdout().lock();
        for line in lines {
            let _ = writeln!(stdout, "{line}");
        }
        let _ = stdout.flush();
    }

    /// Connects to a tracker if not connected: the first of the file that accepts, starting
    /// with the one after the tracker last used. On a new link the hello is followed by what
    /// the core has in flight (a session resume and the unanswered requests); returns whether
    /// the link is new.
    fn ensure_tracker(&mut self) -> Result<bool, String> {
        if self.tracker.is_some() {
            return Ok(false);
        }
        let n = self.config.trackers.len();
        let start = if self.reconnecting.is_some() {
            self.tracker_index + 1
        } else {
            self.tracker_index
        };
        for i in 0..n {
            let index = (start + i) % n;
            let addr = self.config.trackers[index];
            let stream = match std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => s,
                Err(e) => {
                    debug!("tracker {addr}: {e}");
                    continue;
                }
            };
            let link = stream
                .set_nonblocking(true)
                .and_then(|()| stream.set_nodelay(true))
                .and_then(|()| {
                    self.n_links += 1;
                    Conn::new(
                        self.poll.registry(),
                        TcpStream::from_std(stream),
                        TRACKER,
                        ConnId {
                            key: 0,
                            generation: self.n_links,
                        },
                        MAX_CLIENT_TRACKER_FRAME,
                        (),
                    )
                });
            match link {
                Ok(mut conn) => {
                    ClientMsg::hello(self.client_id).emit(conn.out());
                    for request in self.core.requests_for_new_link() {
                        ClientMsg::Request(request).emit(conn.out());
                    }
                    if self.reconnecting.take().is_some() {
                        info!("moved to tracker {addr}");
                    } else {
                        info!("connected to tracker {addr}");
                    }
                    self.tracker_index = index;
                    let now = Instant::now();
                    self.tracker = Some(TrackerLink {
                        conn,
                        addr,
                        welcomed: false,
                        last_heard: now,
                        last_ping: now,
                    });
                    return Ok(true);
                }
                Err(e) => warn!("tracker {addr}: {e}"),
            }
        }
        Err("no tracker is reachable".into())
    }

    fn flush_tracker(&mut self) {
        let Some(link) = self.tracker.as_mut() else {
            return;
        };
        if let Err(e) = link.conn.flush(self.poll.registry()) {
            warn!("tracker {}: write failed: {e}", link.addr);
            self.drop_tracker();
        }
    }

    fn read_tracker(&mut self) {
        let Some(link) = self.tracker.as_mut() else {
            return;
        };
        let core = &mut self.core;
        let mut welcomed = link.welcomed;
        let mut protocol_error = None;
        let mut heard = false;
        let result = link.conn.read_frames(usize::MAX, |payload| {
            heard = true;
            match TrackerMsg::parse(payload) {
                Ok(TrackerMsg::Welcome { version, .. }) if !welcomed => {
                    if version != PROTOCOL_VERSION {
                        protocol_error = Some(format!("tracker speaks version {version}"));
                        return false;
                    }
                    welcomed = true;
                }
                Ok(TrackerMsg::Reply(reply)) if welcomed => core.handle_reply(reply),
                Ok(other) => {
                    protocol_error = Some(format!("unexpected message {other:?}"));
                    return false;
                }
                Err(e) => {
                    protocol_error = Some(e.to_string());
                    return false;
                }
            }
            true
        });
        link.welcomed = welcomed;
        if heard {
            link.last_heard = Instant::now();
        }
        let addr = link.addr;
        let lost = match (result, protocol_error) {
            (_, Some(reason)) => Some(reason),
            (Ok(ReadEnd::Eof), None) => Some("closed the connection".to_owned()),
            (Err(e), None) => Some(e.to_string()),
            (Ok(_), None) => None,
        };
        if let Some(reason) = lost {
            warn!("tracker {addr}: {reason}");
            self.drop_tracker();
        }
        self.pump();
    }

    /// Pings a quiet tracker link, and leaves a tracker that stays silent (a hung process keeps
    /// its sockets open, so only silence tells).
    fn watch_tracker(&mut self, now: Instant) {
        let Some(link) = self.tracker.as_mut() else {
            return;
        };
        if now.saturating_duration_since(link.last_heard) >= TRACKER_SILENCE {
            warn!(
                "tracker {}: silent for {TRACKER_SILENCE:?}; moving to another",
                link.addr
            );
            self.drop_tracker();
            return;
        }
        if now.saturating_duration_since(link.last_heard.max(link.last_ping)) >= PING_AFTER {
            link.last_ping = now;
            self.n_pings += 1;
            // Ids from the top of the range never meet the core's, which count up from 1.
            let req_id = u64::MAX - self.n_pings;
            ClientMsg::Request(Request {
                req_id,
                body: RequestBody::Ping,
            })
            .emit(link.conn.out());
            self.flush_tracker();
        }
    }

    /// The tracker link broke: move to another tracker at once, keeping the session.
    fn drop_tracker(&mut self) {
        if let Some(mut link) = self.tracker.take() {
            link.conn.deregister(self.poll.registry());
            if link.welcomed {
                self.failed_links = 0;
            } else {
                self.failed_links += 1;
            }
            let now = Instant::now();
            self.reconnecting = Some((now + RECONNECT_FOR, now));
            self.reconnect(now);
        }
    }

    /// One round of attempts to reach a tracker after losing one; gives the session up once
    /// none answered for [`RECONNECT_FOR`].
    fn reconnect(&mut self, now: Instant) {
        let Some((give_up, _)) = self.reconnecting else {
            return;
        };
        if self.failed_links >= 2 * self.config.trackers.len() {
            // Every tracker of the file was tried twice and none spoke the protocol.
            warn!("no tracker completes the handshake: the session is lost");
            self.failed_links = 0;
            self.reconnecting = None;
            self.core.handle_tracker_lost();
            self.pump();
            return;
        }
        match self.ensure_tracker() {
            Ok(_) => self.flush_tracker(),
            Err(reason) if now >= give_up => {
                warn!("{reason} for {RECONNECT_FOR:?}: the session is lost");
                self.reconnecting = None;
                self.core.handle_tracker_lost();
            }
            Err(reason) => {
                debug!("{reason}; trying again");
                self.reconnecting = Some((give_up, now + RECONNECT_EVERY));
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
