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
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::session::{ClientCore, DownloadStatus, Output};
use super::transfers::{TransferEvent, Transfers};
use crate::hasher::{HashPool, HashResult};
use crate::net::conn::FIRST_CONN_TOKEN;
use crate::net::wake::{self, StdinEvent};
use crate::net::{Conn, ConnId, ReadEnd};
use crate::wire::frame::MAX_CLIENT_TRACKER_FRAME;
use crate::wire::tracker_link::{ClientMsg, TrackerMsg};
use crate::wire::PROTOCOL_VERSION;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);
const TRACKER: Token = Token(3);

/// How long connecting to one tracker may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct ClientConfig {
    /// Where this client listens for peers.
    pub listen: SocketAddr,
    pub trackers: Vec<SocketAddr>,
    /// Keep running after standard input ends.
    pub serve: bool,
}

/// The client's link to its tracker.
struct TrackerLink {
    conn: Conn<()>,
    addr: SocketAddr,
    welcomed: bool,
}

struct Driver {
    poll: Poll,
    listener: TcpListener,
    core: ClientCore,
    config: ClientConfig,
    tracker: Option<TrackerLink>,
    n_links: u64,
    hasher: HashPool,
    transfers: Transfers,
    /// Input waiting for the core, in order (end of input included).
    lines: VecDeque<StdinEvent>,
    input_done: bool,
    interactive: bool,
    prompted: bool,
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
    let stdin = wake::spawn_stdin_reader(Arc::clone(&waker))?;
    info!("client listening for peers on {}", config.listen);
    let mut driver = Driver {
        poll,
        listener,
        core: ClientCore::new(config.listen),
        config,
        tracker: None,
        n_links: 0,
        hasher,
        transfers: Transfers::default(),
        lines: VecDeque::new(),
        input_done: false,
        interactive: io::stdin().is_terminal(),
        prompted: false,
    };
    let result = driver.run(&stdin, &hashed);
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
            let deadline = match (self.core.poll_timeout(), self.transfers.next_deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
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
                                    self.transfers.on_stream(registry, &self.hasher, done)
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
            self.core.handle_timeout(now);
            self.pump();
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
            print!("> ");
            let _ = io::stdout().flush();
            self.prompted = true;
        }
    }

    fn drain_stdin(&mut self, stdin: &Receiver<StdinEvent>) {
        loop {
            match stdin.try_recv() {
                Ok(event) => self.lines.push_back(event),
                Err(TryRecvError::Disconnected) => {
                    self.lines.push_back(StdinEvent::Eof);
                    return;
                }
                Err(TryRecvError::Empty) => return,
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
                    if self.interactive {
                        println!();
                    }
                }
                StdinEvent::TooLong => {
                    self.core.record_failure();
                    eprintln!("error: command line too long");
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
                Output::Print(line) => {
                    let mut stdout = io::stdout().lock();
                    let _ = writeln!(stdout, "{line}");
                    let _ = stdout.flush();
                }
                Output::Fail(reason) => {
                    let _ = writeln!(io::stderr().lock(), "error: {reason}");
                }
                Output::Send(request) => {
                    if let Err(reason) = self.ensure_tracker() {
                        self.core.handle_send_failed(&reason);
                        continue;
                    }
                    if let Some(link) = self.tracker.as_mut() {
                        ClientMsg::Request(request).emit(link.conn.out());
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
        let mut stdout = io::stdout().lock();
        for d in self.core.downloads() {
            let tag = match d.status {
                DownloadStatus::Running => "D",
                DownloadStatus::Complete => "C",
                DownloadStatus::Failed => "F",
            };
            let mut line = format!("[{tag}] [{}] {}", d.group, d.name);
            if self.interactive && d.status == DownloadStatus::Running {
                if let Some((p, elapsed)) = self.transfers.progress(d.id) {
                    let pct = if p.size == 0 {
                        100.0
                    } else {
                        p.bytes_verified as f64 * 100.0 / p.size as f64
                    };
                    let rate = p.bytes_verified as f64
                        / (1024.0 * 1024.0)
                        / elapsed.as_secs_f64().max(1e-3);
                    line.push_str(&format!(
                        "  {pct:.1}%  {rate:.1} MiB/s  {} peers",
                        p.active_peers
                    ));
                }
            }
            let _ = writeln!(stdout, "{line}");
        }
        let _ = stdout.flush();
    }

    /// Connects to the first tracker of the file that accepts, if not connected.
    fn ensure_tracker(&mut self) -> Result<(), String> {
        if self.tracker.is_some() {
            return Ok(());
        }
        for addr in self.config.trackers.clone() {
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
                    ClientMsg::hello().emit(conn.out());
                    info!("connected to tracker {addr}");
                    self.tracker = Some(TrackerLink {
                        conn,
                        addr,
                        welcomed: false,
                    });
                    return Ok(());
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
        let result = link.conn.read_frames(usize::MAX, |payload| {
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

    fn drop_tracker(&mut self) {
        if let Some(mut link) = self.tracker.take() {
            link.conn.deregister(self.poll.registry());
            self.core.handle_tracker_lost();
        }
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
