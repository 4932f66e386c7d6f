//! The interactive shell: what `client_program` reads commands with when standard input and
//! standard output are both a terminal (and `TERM` is not `dumb`). Commands from a file or a
//! pipe never come here: the driver then uses the plain stdin reader of [`crate::net::wake`],
//! byte for byte as before.
//!
//! Line editing, history search and completion come from `rustyline`, which blocks while it
//! reads, so the shell lives on two threads of its own and talks to the reactor only by
//! message, like the stdin reader:
//!
//! - The **reader** owns the editor. The driver asks for a line when it wants the next command
//!   (the prompt appears only once the previous command has its answer, as before); the reader
//!   reads it (Ctrl-C clears the line, Ctrl-D on an empty line is the end of input), records
//!   it in the history (never `create_user` or `login` lines; see [`super::history`]), sends
//!   it as a [`StdinEvent`] and wakes the reactor.
//! - The **screen** thread decides how everything the user sees on the terminal is written,
//!   in order: result lines, `error: ` lines, log lines and the progress line. While a line is
//!   being typed, text goes through rustyline's external printer, which clears the prompt and
//!   what was typed (however many rows it takes), writes the text above it and draws them
//!   again; otherwise it is written straight away. The progress line is kept on the row just
//!   above the prompt and rewritten there (cursor up, erase) as long as nothing else was
//!   printed after it. The screen thread also forwards the driver's request for a line to the
//!   reader once what was queued before it is written, so the prompt never appears in the
//!   middle of output.
//! - The **printer** thread is the only caller of the external printer, which blocks while
//!   its one-message slot is full. Rustyline empties the slot only while it edits (not during
//!   a Ctrl-R search or a completion list), so a message may wait there until the next prompt:
//!   then only this thread waits, never the reactor, the screen thread or the next prompt
//!   (which is what lets the message through).
//!
//! When the client stops while a line is being read (SIGINT, SIGTERM), [`Shell::finish`] puts
//! the terminal back in the mode it had.

use std::borrow::Cow;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use log::warn;
use mio::Waker;
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::{History, MemHistory};
use rustyline::validate::Validator;
use rustyline::{CompletionType, Config, Context, Editor, ExternalPrinter, Helper};

use super::complete::{self, CompletionData, RealDirs};
use super::history;
use super::progress::Drawn;
use super::state_dir;
use crate::net::wake::{self, StdinEvent, MAX_LINE};

/// The prompt.
pub const PROMPT: &str = "> ";
/// How long [`Shell::finish`] waits for the screen thread to write what is queued.
const FINISH_WAIT: Duration = Duration::from_secs(2);
/// How long the prompt waits for what was printed before it.
const PROMPT_WAIT: Duration = Duration::from_millis(300);
/// How long after a line is entered the printer may still be busy before it counts as held
/// up by rustyline.
const STUCK_AFTER: Duration = Duration::from_millis(50);
/// Erase the current row, cursor to its start.
const ERASE_LINE: &str = "\r\x1b[2K";
/// Up one row (from the prompt's first row to the progress line) and erase it.
const UP_AND_ERASE: &str = "\x1b[1A\r\x1b[2K";
/// Rustyline's bracketed-paste mode off, for a terminal left while a line was being read.
const BRACKETED_PASTE_OFF: &str = "\x1b[?2004l";

/// Which stream a line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What the screen thread is asked to do, in order.
#[derive(Debug)]
enum ScreenMsg {
    /// One line (without its newline).
    Line(Stream, String),
    /// The progress line's new text, or `None` when no download runs.
    Progress(Option<String>),
    /// Read the next command line, completing from `CompletionData`.
    Prompt(CompletionData),
    /// Everything before this is written: say so.
    Flush(mpsc::SyncSender<()>),
}

/// The way from the logger to the screen thread while the shell runs (log lines to a
/// terminal would otherwise break the line being typed). Shared by the driver's [`Shell`] and
/// the logger's sink.
#[derive(Debug, Clone, Default)]
pub struct ScreenLink(Arc<Mutex<Option<Sender<ScreenMsg>>>>);

impl ScreenLink {
    /// Sends one log line to the screen; false when no shell runs (write it yourself).
    pub fn log_line(&self, line: &str) -> bool {
        let Ok(guard) = self.0.lock() else {
            return false;
        };
        match guard.as_ref() {
            Some(tx) => tx
                .send(ScreenMsg::Line(Stream::Stderr, line.to_owned()))
                .is_ok(),
            None => false,
        }
    }

    /// Whether log lines go to the screen thread.
    pub fn is_active(&self) -> bool {
        self.0.lock().is_ok_and(|g| g.is_some())
    }

    fn set(&self, tx: Option<Sender<ScreenMsg>>) {
        if let Ok(mut guard) = self.0.lock() {
            *guard = tx;
        }
    }
}

/// The rustyline helper: completion only (no hints, colours or multi-line input).
struct ShellHelper {
    data: CompletionData,
    /// Set when rustyline may list candidates above the prompt, so that the screen no longer
    /// takes the row above the prompt for the progress line.
    listed: Arc<AtomicBool>,
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let (start, candidates) = complete::complete(line, pos, &self.data, &RealDirs);
        if candidates.len() > 1 {
            // A second Tab lists them below the line, and the prompt moves down.
            self.listed.store(true, Ordering::SeqCst);
        }
        Ok((
            start,
            candidates
                .into_iter()
                .map(|c| Pair {
                    display: c.display,
                    replacement: c.replacement,
                })
                .collect(),
        ))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}

impl Highlighter for ShellHelper {
    fn highlight_prompt<'b, 's: 'b, 'p: 'b>(
        &'s self,
        prompt: &'p str,
        _default: bool,
    ) -> Cow<'b, str> {
        Cow::Borrowed(prompt)
    }
}

impl Validator for ShellHelper {}

impl Helper for ShellHelper {}

/// The running shell, as the driver sees it.
pub struct Shell {
    screen: Sender<ScreenMsg>,
    link: ScreenLink,
    /// True while the reader is inside `readline` (the terminal in raw mode).
    reading: Arc<AtomicBool>,
    /// The terminal's mode before the shell started, to restore if the client stops while a
    /// line is being read.
    saved_mode: Option<nix::sys::termios::Termios>,
}

/// Whether this process should read its commands through the shell: standard input and output
/// are terminals that understand escape sequences.
pub fn wanted() -> bool {
    let unsupported =
        std::env::var("TERM").is_ok_and(|t| ["dumb", "cons25", "emacs"].contains(&t.as_str()));
    io::stdin().is_terminal() && io::stdout().is_terminal() && !unsupported
}

impl Shell {
    /// Starts the shell (see [`wanted`]), with its history in `state_dir` (none if `None` or
    /// if the directory cannot be created). Returns the shell and the channel its lines come
    /// on; each line wakes `waker`. `link` is the logger's way to the screen: it is used only
    /// when stderr is a terminal too (else log lines cannot disturb the screen).
    pub fn start(
        waker: Arc<Waker>,
        state_dir: Option<&Path>,
        link: &ScreenLink,
    ) -> io::Result<(Shell, Receiver<StdinEvent>)> {
        let config = Config::builder()
            .max_history_size(history::MAX_ENTRIES)
            .map_err(io::Error::other)?
            .history_ignore_space(true)
            .completion_type(CompletionType::List)
            .auto_add_history(false)
            .build();
        let history = MemHistory::with_config(&config);
        let mut editor: Editor<ShellHelper, MemHistory> =
            Editor::with_history(config, history).map_err(io::Error::other)?;
        let listed = Arc::new(AtomicBool::new(false));
        editor.set_helper(Some(ShellHelper {
            data: CompletionData::default(),
            listed: Arc::clone(&listed),
        }));
        let printer = editor.create_external_printer().map_err(io::Error::other)?;
        let history_path = state_dir.and_then(|dir| match state_dir::ensure(dir) {
            Ok(()) => Some(history::path_in(dir)),
            Err(e) => {
                warn!(
                    "state directory {}: {e}; the history is not kept",
                    dir.display()
                );
                None
            }
        });
        let mut entries = Vec::new();
        if let Some(path) = &history_path {
            match history::load(path) {
                Ok(loaded) => entries = loaded,
                Err(e) => warn!("history {}: {e}", path.display()),
            }
        }
        for entry in &entries {
            let _ = editor.add_history_entry(entry.as_str());
        }
        let saved_mode = nix::sys::termios::tcgetattr(io::stdin()).ok();
        let reading = Arc::new(AtomicBool::new(false));
        let pending = Arc::new(AtomicUsize::new(0));
        let (lines_tx, lines_rx) = mpsc::channel();
        let (prompt_tx, prompt_rx) = mpsc::channel();
        let (screen_tx, screen_rx) = mpsc::channel();
        let reader = Reader {
            editor,
            history_path,
            entries,
            reading: Arc::clone(&reading),
            pending: Arc::clone(&pending),
        };
        thread::Builder::new()
            .name("shell".into())
            .spawn(move || reader.run(&prompt_rx, &lines_tx, &waker))?;
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let printer = Printer {
            printer,
            pending: Arc::clone(&pending),
        };
        thread::Builder::new()
            .name("printer".into())
            .spawn(move || printer.run(&jobs_rx))?;
        let screen = Screen {
            printer: jobs_tx,
            pending,
            reader: prompt_tx,
            reading: Arc::clone(&reading),
            listed,
            stderr_tty: io::stderr().is_terminal(),
            above_prompt: false,
            in_place: false,
        };
        thread::Builder::new()
            .name("screen".into())
            .spawn(move || screen.run(&screen_rx))?;
        if io::stderr().is_terminal() {
            link.set(Some(screen_tx.clone()));
        }
        Ok((
            Shell {
                screen: screen_tx,
                link: link.clone(),
                reading,
                saved_mode,
            },
            lines_rx,
        ))
    }

    /// Asks for the next command line. `progress` is the progress line to show above the
    /// prompt (if downloads run); `data` is what Tab completes from.
    pub fn prompt(&self, progress: Option<String>, data: CompletionData) {
        if progress.is_some() {
            let _ = self.screen.send(ScreenMsg::Progress(progress));
        }
        let _ = self.screen.send(ScreenMsg::Prompt(data));
    }

    /// A result line for stdout.
    pub fn print(&self, line: String) {
        let _ = self.screen.send(ScreenMsg::Line(Stream::Stdout, line));
    }

    /// A line for stderr (an `error: ` line).
    pub fn print_err(&self, line: String) {
        let _ = self.screen.send(ScreenMsg::Line(Stream::Stderr, line));
    }

    /// The progress line's new text (`None`: no download runs).
    pub fn progress(&self, text: Option<String>) {
        let _ = self.screen.send(ScreenMsg::Progress(text));
    }

    /// The client is stopping: waits (a little) until everything queued is written, sends
    /// log lines straight to stderr again and, if a line was being read, puts the terminal
    /// back in its mode.
    pub fn finish(&self) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let _ = self.screen.send(ScreenMsg::Progress(None));
        if self.screen.send(ScreenMsg::Flush(ack_tx)).is_ok() {
            let _ = ack_rx.recv_timeout(FINISH_WAIT);
        }
        self.link.set(None);
        if self.reading.load(Ordering::SeqCst) {
            if let Some(mode) = &self.saved_mode {
                let _ = nix::sys::termios::tcsetattr(
                    io::stdin(),
                    nix::sys::termios::SetArg::TCSANOW,
                    mode,
                );
            }
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{BRACKETED_PASTE_OFF}");
            let _ = out.flush();
        }
    }
}

/// Starts reading commands: through the shell when [`wanted`] (falling back to plain reading,
/// with a log line, if the terminal cannot be set up), else with the plain stdin reader.
pub fn start_input(
    waker: &Arc<Waker>,
    state_dir: Option<&Path>,
    drawn: &Drawn,
) -> io::Result<(Option<Shell>, Receiver<StdinEvent>)> {
    if wanted() {
        match Shell::start(Arc::clone(waker), state_dir, drawn.screen()) {
            Ok((shell, lines)) => return Ok((Some(shell), lines)),
            Err(e) => warn!("terminal: {e}; reading commands without line editing"),
        }
    }
    Ok((None, wake::spawn_stdin_reader(Arc::clone(waker))?))
}

/// The reader thread's state.
struct Reader {
    editor: Editor<ShellHelper, MemHistory>,
    history_path: Option<PathBuf>,
    /// The history as saved (the editor's copy is for browsing).
    entries: Vec<String>,
    reading: Arc<AtomicBool>,
    /// The printer's jobs not yet done.
    pending: Arc<AtomicUsize>,
}

impl Reader {
    fn run(
        mut self,
        prompts: &Receiver<CompletionData>,
        lines: &Sender<StdinEvent>,
        waker: &Waker,
    ) {
        while let Ok(data) = prompts.recv() {
            if let Some(helper) = self.editor.helper_mut() {
                helper.data = data;
            }
            let event = loop {
                match self.editor.readline(PROMPT) {
                    Ok(line) if line.len() > MAX_LINE => break StdinEvent::TooLong,
                    Ok(line) => break StdinEvent::Line(line),
                    // Ctrl-C: the line is dropped and a fresh prompt shown.
                    Err(ReadlineError::Interrupted) => continue,
                    Err(ReadlineError::Eof) => break StdinEvent::Eof,
                    Err(e) => {
                        warn!("terminal: {e}; input ends");
                        break StdinEvent::Eof;
                    }
                }
            };
            self.reading.store(false, Ordering::SeqCst);
            self.after_reading();
            if let StdinEvent::Line(line) = &event {
                self.remember(line);
            }
            let eof = event == StdinEvent::Eof;
            if lines.send(event).is_err() {
                return;
            }
            let _ = waker.wake();
            if eof {
                return;
            }
        }
    }

    /// A line was entered. If the printer is still held up, a message is waiting in
    /// rustyline's slot (sent during a Ctrl-R search or a completion list, when rustyline does
    /// not print): it will be written at the next prompt, and may start by moving up a row to
    /// replace the progress line. A blank row is left for it, so that it cannot replace the
    /// line just entered.
    fn after_reading(&self) {
        let deadline = std::time::Instant::now() + STUCK_AFTER;
        while self.pending.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                let mut out = io::stdout().lock();
                let _ = writeln!(out);
                let _ = out.flush();
                return;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Adds `line` to the history (unless it must not be kept) and saves the file (unless it
    /// must stay off the disk).
    fn remember(&mut self, line: &str) {
        if !history::remember(line) {
            return;
        }
        let _ = self.editor.add_history_entry(line);
        if !history::persist(line) || self.entries.last().is_some_and(|last| last == line) {
            return;
        }
        self.entries.push(line.to_owned());
        let excess = self.entries.len().saturating_sub(history::MAX_ENTRIES);
        self.entries.drain(..excess);
        if let Some(path) = &self.history_path {
            if let Err(e) = history::save(path, self.entries.iter().map(String::as_str)) {
                warn!("history {}: {e}", path.display());
            }
        }
        debug_assert!(self.editor.history().len() <= history::MAX_ENTRIES);
    }
}

/// What the printer thread is given: text for rustyline's external printer (which writes it
/// above the line being typed, or straight to the terminal when no line is being read).
enum PrintJob {
    /// The text, and whether to follow it with [`PROBE`] (see [`Printer`]).
    Text(String, bool),
    /// Everything before this is written: say so.
    Barrier(mpsc::SyncSender<()>),
}

/// Printed after each message while a line is being read: it moves the cursor up a row and
/// back down, so it shows nothing, but rustyline's printer takes one message at a time, so
/// sending it returns only once the message before it was written.
const PROBE: &str = "\x1b[1A\n";

/// The printer thread: the only one that calls rustyline's external printer, which blocks
/// while its one-message slot is full. Rustyline empties the slot only while it edits a line
/// (not during a Ctrl-R search or a completion list), so a message may wait there until the
/// next prompt; this thread then waits with it, and nothing else does.
struct Printer<P> {
    printer: P,
    /// Jobs given and not yet done (the screen thread adds, this thread subtracts).
    pending: Arc<AtomicUsize>,
}

impl<P: ExternalPrinter> Printer<P> {
    fn run(mut self, jobs: &Receiver<PrintJob>) {
        while let Ok(job) = jobs.recv() {
            match job {
                PrintJob::Text(text, probe) => {
                    let _ = self.printer.print(text);
                    if probe {
                        let _ = self.printer.print(PROBE.to_owned());
                    }
                    self.pending.fetch_sub(1, Ordering::SeqCst);
                }
                PrintJob::Barrier(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }
}

/// The screen thread's state: it decides what each message looks like on the terminal and
/// never blocks (the printer thread does the writing).
struct Screen {
    printer: Sender<PrintJob>,
    /// Jobs the printer has not done yet.
    pending: Arc<AtomicUsize>,
    reader: Sender<CompletionData>,
    reading: Arc<AtomicBool>,
    /// Rustyline may have listed completions above the prompt (see [`ShellHelper`]).
    listed: Arc<AtomicBool>,
    stderr_tty: bool,
    /// The progress line is on the row just above the prompt.
    above_prompt: bool,
    /// The progress line is on the current row, the cursor at its end (no prompt shown).
    in_place: bool,
}

impl Screen {
    fn run(mut self, messages: &Receiver<ScreenMsg>) {
        while let Ok(msg) = messages.recv() {
            let reading = self.reading.load(Ordering::SeqCst);
            // A line was entered (the cursor moved below the prompt and what was above it), or
            // completions were listed: the row above the prompt is not the progress line.
            if !reading || self.listed.swap(false, Ordering::SeqCst) {
                self.above_prompt = false;
            }
            // While the printer waits for rustyline, a newer progress line replaces the one
            // that would have been queued (the next paint brings it).
            let printer_busy = self.pending.load(Ordering::SeqCst) > 0;
            match msg {
                ScreenMsg::Line(Stream::Stderr, line) if !self.stderr_tty => {
                    let _ = writeln!(io::stderr().lock(), "{line}");
                }
                ScreenMsg::Line(_, line) if reading => {
                    // Over the progress line if it is just above the prompt (the next paint
                    // puts it back below this line).
                    let prefix = if self.above_prompt { UP_AND_ERASE } else { "" };
                    self.print(format!("{prefix}{line}\n"), true);
                    self.above_prompt = false;
                }
                ScreenMsg::Line(_, line) => {
                    let prefix = if self.in_place { ERASE_LINE } else { "" };
                    self.print(format!("{prefix}{line}\n"), false);
                    self.in_place = false;
                }
                ScreenMsg::Progress(Some(_)) if printer_busy => {}
                ScreenMsg::Progress(Some(text)) if reading => {
                    let prefix = if self.above_prompt { UP_AND_ERASE } else { "" };
                    self.print(format!("{prefix}{text}\n"), true);
                    self.above_prompt = true;
                }
                ScreenMsg::Progress(Some(text)) => {
                    self.print(format!("{ERASE_LINE}{text}"), false);
                    self.in_place = true;
                }
                ScreenMsg::Progress(None) if reading => {
                    if self.above_prompt {
                        // Erase the row, then go up one more and down again with a newline,
                        // so that the prompt is drawn on the erased row and no blank row is
                        // left above it.
                        self.print(format!("{UP_AND_ERASE}\x1b[1A\n"), true);
                        self.above_prompt = false;
                    }
                }
                ScreenMsg::Progress(None) => {
                    if self.in_place {
                        self.print(ERASE_LINE.to_owned(), false);
                        self.in_place = false;
                    }
                }
                ScreenMsg::Prompt(data) => {
                    if self.in_place {
                        // The progress line stays, and the prompt goes below it.
                        self.print("\n".to_owned(), false);
                        self.in_place = false;
                        self.above_prompt = true;
                    }
                    // What was printed before the prompt is written before it appears; if
                    // the printer is held up, rustyline writes it above the prompt instead.
                    self.barrier(PROMPT_WAIT);
                    self.reading.store(true, Ordering::SeqCst);
                    if self.reader.send(data).is_err() {
                        self.reading.store(false, Ordering::SeqCst);
                    }
                }
                ScreenMsg::Flush(ack) => {
                    self.barrier(FINISH_WAIT);
                    let _ = ack.send(());
                }
            }
        }
    }

    fn print(&mut self, text: String, probe: bool) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.printer.send(PrintJob::Text(text, probe)).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Waits until the printer has written everything given so far, or `timeout`.
    fn barrier(&self, timeout: Duration) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        if self.printer.send(PrintJob::Barrier(ack_tx)).is_ok() {
            let _ = ack_rx.recv_timeout(timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An external printer that records what it is given.
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl ExternalPrinter for Recorder {
        fn print(&mut self, msg: String) -> rustyline::Result<()> {
            self.0.lock().unwrap().push(msg);
            Ok(())
        }
    }

    struct Harness {
        screen: Sender<ScreenMsg>,
        prompts: Receiver<CompletionData>,
        reading: Arc<AtomicBool>,
        listed: Arc<AtomicBool>,
        printed: Arc<Mutex<Vec<String>>>,
    }

    impl Harness {
        fn start() -> Harness {
            let printed = Arc::new(Mutex::new(Vec::new()));
            let pending = Arc::new(AtomicUsize::new(0));
            let reading = Arc::new(AtomicBool::new(false));
            let listed = Arc::new(AtomicBool::new(false));
            let (jobs_tx, jobs_rx) = mpsc::channel();
            let printer = Printer {
                printer: Recorder(Arc::clone(&printed)),
                pending: Arc::clone(&pending),
            };
            thread::spawn(move || printer.run(&jobs_rx));
            let (prompt_tx, prompts) = mpsc::channel();
            let (screen, screen_rx) = mpsc::channel();
            let state = Screen {
                printer: jobs_tx,
                pending,
                reader: prompt_tx,
                reading: Arc::clone(&reading),
                listed: Arc::clone(&listed),
                stderr_tty: true,
                above_prompt: false,
                in_place: false,
            };
            thread::spawn(move || state.run(&screen_rx));
            Harness {
                screen,
                prompts,
                reading,
                listed,
                printed,
            }
        }

        fn send(&self, msg: ScreenMsg) {
            self.screen.send(msg).unwrap();
        }

        /// What the printer was given since the last call, once everything sent is done.
        fn printed(&self) -> Vec<String> {
            let (ack_tx, ack_rx) = mpsc::sync_channel(1);
            self.send(ScreenMsg::Flush(ack_tx));
            ack_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            std::mem::take(&mut *self.printed.lock().unwrap())
        }
    }

    fn line(text: &str) -> ScreenMsg {
        ScreenMsg::Line(Stream::Stdout, text.to_owned())
    }

    fn progress(text: &str) -> ScreenMsg {
        ScreenMsg::Progress(Some(text.to_owned()))
    }

    #[test]
    fn the_progress_line_stays_just_above_the_prompt() {
        let h = Harness::start();
        // Each step waits for the printer, as paints are a quarter second apart (a progress
        // line that comes while the printer is busy is dropped; see the next test).
        let step = |msg: ScreenMsg| {
            h.send(msg);
            h.printed()
        };
        // A command runs: the line is drawn in place and erased before output.
        assert_eq!(step(progress("a 1%")), ["\r\x1b[2Ka 1%"]);
        assert_eq!(step(line("result")), ["\r\x1b[2Kresult\n"]);
        assert_eq!(step(progress("a 2%")), ["\r\x1b[2Ka 2%"]);
        // The prompt: the line stays and the prompt goes below it; the reader is asked.
        assert_eq!(step(ScreenMsg::Prompt(CompletionData::default())), ["\n"]);
        h.prompts.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(h.reading.load(Ordering::SeqCst));
        // While a line is typed: the progress line is rewritten in place above the prompt,
        // and a completion line takes its place; each message is followed by the probe.
        let up = |text: &str| [format!("{UP_AND_ERASE}{text}\n"), PROBE.to_owned()];
        assert_eq!(step(progress("a 3%")), up("a 3%"));
        assert_eq!(step(line("downloaded a")), up("downloaded a"));
        assert_eq!(step(progress("b 1%")), ["b 1%\n", PROBE]);
        assert_eq!(step(progress("b 2%")), up("b 2%"));
        assert_eq!(step(ScreenMsg::Progress(None)), up("\x1b[1A"));
        assert_eq!(step(ScreenMsg::Progress(None)), Vec::<String>::new());
        // A line was entered: output goes below it, nothing moves up.
        assert_eq!(step(progress("c 1%")), ["c 1%\n", PROBE]);
        h.reading.store(false, Ordering::SeqCst);
        assert_eq!(step(line("next")), ["next\n"]);
    }

    #[test]
    fn a_completion_list_ends_the_progress_lines_place() {
        let h = Harness::start();
        h.reading.store(true, Ordering::SeqCst);
        h.send(progress("a 1%"));
        assert_eq!(h.printed(), ["a 1%\n", PROBE]);
        // Rustyline listed completions below the line: the progress line is no longer just
        // above the prompt, so the next one is a new row and the list stays.
        h.listed.store(true, Ordering::SeqCst);
        h.send(progress("a 2%"));
        assert_eq!(h.printed(), ["a 2%\n", PROBE]);
        h.send(progress("a 3%"));
        assert_eq!(
            h.printed(),
            [format!("{UP_AND_ERASE}a 3%\n"), PROBE.to_owned()]
        );
    }

    #[test]
    fn lines_are_never_dropped_but_progress_waits_for_a_busy_printer() {
        let h = Harness::start();
        h.reading.store(true, Ordering::SeqCst);
        // Back to back: the lines all come, in order; progress lines that found the printer
        // busy were dropped (the next paint brings a newer one).
        for i in 0..50 {
            h.send(line(&format!("line {i}")));
            h.send(progress(&format!("p {i}")));
        }
        let printed = h.printed();
        let lines: Vec<&String> = printed.iter().filter(|p| p.contains("line ")).collect();
        assert_eq!(lines.len(), 50);
        for (i, l) in lines.iter().enumerate() {
            assert!(l.ends_with(&format!("line {i}\n")), "{l:?}");
        }
        assert!(printed.iter().filter(|p| p.contains("p ")).count() <= 50);
    }

    #[test]
    fn the_screen_link_carries_log_lines_only_while_the_shell_runs() {
        let link = ScreenLink::default();
        assert!(!link.is_active());
        assert!(!link.log_line("x"));
        let (tx, rx) = mpsc::channel();
        link.set(Some(tx));
        assert!(link.is_active());
        assert!(link.log_line("warn: x"));
        assert!(matches!(
            rx.try_recv(),
            Ok(ScreenMsg::Line(Stream::Stderr, l)) if l == "warn: x"
        ));
        link.set(None);
        assert!(!link.log_line("y"));
    }
}
