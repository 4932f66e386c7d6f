//! The live progress line shown on a terminal while downloads run.
//!
//! When stderr is a terminal, the client keeps one line there up to date, four times a second,
//! with each running download's percent, size, rate (over the last two seconds, from
//! [`RecentRates`]; the average since the start until then) and peers. [`summary`] builds the text
//! (pure); [`StatusLine`] paints it:
//!
//! - With commands from a file or a pipe (or after the end of typed input), the line is redrawn
//!   in place (carriage return, erase line) and erased before any other output, so the output
//!   itself is never mixed with it.
//! - At an interactive prompt, the line is drawn just above the prompt when the prompt is
//!   printed, and then rewritten there with the cursor saved and restored, so that what the
//!   user is typing is left alone. Once other output has moved the prompt, the line waits for
//!   the next prompt.
//!
//! The line is cut to the terminal's width, measured in display columns (a wrapped line would
//! not be erased by a carriage return and erase-line, nor found one line up). Log output to
//! stderr goes through a [`LogSink`], which erases the line first; both share a [`Drawn`].
//!
//! Nothing is drawn when stderr is not a terminal (the tests, a log file) or `TERM` is `dumb`,
//! so stdout and stderr keep exactly the lines the SPEC defines.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use unicode_width::UnicodeWidthChar;

use super::download::engine::Progress;
use super::shell::ScreenLink;

/// How often the line is redrawn.
pub const PAINT_EVERY: Duration = Duration::from_millis(250);
/// How far back the rate shown looks.
pub const RATE_SPAN: Duration = Duration::from_secs(2);
/// Width assumed when the terminal does not tell.
pub const DEFAULT_WIDTH: usize = 80;

/// Where the progress line is on screen, shared by the [`StatusLine`] and the [`LogSink`]; and,
/// while the interactive shell runs, the way to its screen thread.
#[derive(Debug, Clone, Default)]
pub struct Drawn(Arc<AtomicU8>, ScreenLink);

/// Not on screen (or no longer where it was drawn).
const NOWHERE: u8 = 0;
/// On the current line, the cursor at its end.
const IN_PLACE: u8 = 1;
/// On the line just above the prompt.
const ABOVE_PROMPT: u8 = 2;

impl Drawn {
    fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, state: u8) {
        self.0.store(state, Ordering::Release);
    }

    fn take(&self) -> u8 {
        self.0.swap(NOWHERE, Ordering::AcqRel)
    }

    /// The way to the shell's screen thread (unused when no shell runs).
    pub fn screen(&self) -> &ScreenLink {
        &self.1
    }
}

/// Stderr for the logger: erases the progress line before a log line is written, and marks it
/// gone from above the prompt (the log line moved the prompt). While the interactive shell
/// runs, whole log lines go to its screen thread instead, which writes them above the line
/// being typed.
#[derive(Debug)]
pub struct LogSink {
    drawn: Drawn,
    /// The start of a log line for the shell, until its newline comes.
    partial: Vec<u8>,
}

/// Longest log line held back for the shell before it is sent anyway.
const MAX_PARTIAL: usize = 64 * 1024;

impl LogSink {
    pub fn new(drawn: Drawn) -> Self {
        LogSink {
            drawn,
            partial: Vec::new(),
        }
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.drawn.screen().is_active() {
            // The logger writes a line in several pieces; the screen takes whole lines.
            self.partial.extend_from_slice(buf);
            while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line[..end]);
                if !self.drawn.screen().log_line(&text) {
                    io::stderr().lock().write_all(&line)?;
                }
            }
            if self.partial.len() > MAX_PARTIAL {
                let text = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                self.drawn.screen().log_line(&text);
            }
            return Ok(buf.len());
        }
        let mut err = io::stderr().lock();
        if self.drawn.take() == IN_PLACE {
            err.write_all(ERASE_LINE.as_bytes())?;
        }
        err.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// The terminal's width in columns, for the line: one less, as writing the last column makes
/// some terminals wrap.
pub fn line_width() -> usize {
    let columns = terminal_size::terminal_size_of(io::stderr())
        .map_or(DEFAULT_WIDTH, |(terminal_size::Width(w), _)| usize::from(w));
    columns.saturating_sub(1).max(1)
}

/// Erase the current line, cursor to its start.
const ERASE_LINE: &str = "\r\x1b[2K";
/// Save the cursor, move it up a line (to the line above the prompt).
const TO_LINE_ABOVE: &str = "\x1b7\x1b[1A\r\x1b[2K";
/// Restore the saved cursor.
const BACK_TO_PROMPT: &str = "\x1b8";

/// One running download, as the line shows it.
#[derive(Debug, Clone)]
pub struct Item<'a> {
    pub name: &'a str,
    pub progress: Progress,
    pub elapsed: Duration,
    /// Bytes per second lately, if known; else the average since the start is shown.
    pub recent_rate: Option<f64>,
}

/// Each download's rate over the last [`RATE_SPAN`], from the byte counts seen at each paint.
#[derive(Debug, Default)]
pub struct RecentRates {
    samples: BTreeMap<u64, VecDeque<(Instant, u64)>>,
}

impl RecentRates {
    /// Records that download `id` has `bytes` at `now`; returns its rate in bytes per second
    /// since the oldest sample of the last [`RATE_SPAN`], once the samples span at least a
    /// quarter of it.
    pub fn sample(&mut self, id: u64, bytes: u64, now: Instant) -> Option<f64> {
        let samples = self.samples.entry(id).or_default();
        samples.push_back((now, bytes));
        while samples.len() > 2
            && samples
                .get(1)
                .is_some_and(|&(t, _)| now.saturating_duration_since(t) >= RATE_SPAN)
        {
            samples.pop_front();
        }
        let &(since, from) = samples.front()?;
        let span = now.saturating_duration_since(since);
        if span < RATE_SPAN / 4 {
            return None;
        }
        Some(bytes.saturating_sub(from) as f64 / span.as_secs_f64())
    }

    /// Forgets the downloads for which `running` is false.
    pub fn retain(&mut self, running: impl Fn(u64) -> bool) {
        self.samples.retain(|&id, _| running(id));
    }
}

/// The progress line for `items`, at most `width` characters; `None` when nothing runs.
pub fn summary(items: &[Item<'_>], width: usize) -> Option<String> {
    if items.is_empty() {
        return None;
    }
    let parts: Vec<String> = items.iter().map(describe).collect();
    let line = parts.join(" | ");
    Some(cut(&line, width))
}

fn describe(item: &Item<'_>) -> String {
    let p = &item.progress;
    let pct = p.percent();
    let rate = match item.recent_rate {
        Some(bytes_per_s) => bytes_per_s / (1024.0 * 1024.0),
        None => p.average_mib_s(item.elapsed),
    };
    let peers = if p.active_peers == 1 { "peer" } else { "peers" };
    format!(
        "{} {pct:.1}% of {} {rate:.1} MiB/s {} {peers}",
        item.name,
        size_text(p.size),
        p.active_peers
    )
}

/// `size` bytes in the largest unit that keeps a number of at least 1 (`1.4 MiB`).
pub fn size_text(size: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = size as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{size} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `line` cut to `width` display columns, ending in `...` when cut. Control characters (a file
/// name may hold any) are shown as `?` so that they cannot move the cursor; other characters
/// without a width (combining marks) as well, so that every character takes its own columns.
fn cut(line: &str, width: usize) -> String {
    let clean: Vec<(char, usize)> = line
        .chars()
        .map(|c| match c.width() {
            Some(w) if w > 0 && !c.is_control() => (c, w),
            _ => ('?', 1),
        })
        .collect();
    if clean.iter().map(|&(_, w)| w).sum::<usize>() <= width {
        return clean.into_iter().map(|(c, _)| c).collect();
    }
    let room = width.saturating_sub(3);
    let mut used = 0;
    let mut out = String::new();
    for (c, w) in clean {
        if used + w > room {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push_str(&".".repeat(width.min(3)));
    out
}

/// Display columns of `text`, as [`cut`] counts them.
#[cfg(test)]
fn columns(text: &str) -> usize {
    text.chars().map(|c| c.width().unwrap_or(1).max(1)).sum()
}

/// The progress line on the terminal (see the module doc).
#[derive(Debug)]
pub struct StatusLine {
    enabled: bool,
    drawn: Drawn,
    last_paint: Option<Instant>,
}

impl StatusLine {
    /// A line drawn only if stderr is a terminal that understands the escape sequences.
    pub fn for_stderr(drawn: Drawn) -> Self {
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        Self::new(io::stderr().is_terminal() && !dumb, drawn)
    }

    /// Whether anything is drawn at all.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The line was drawn by someone else (the interactive shell's screen) at `now`.
    pub fn painted_elsewhere(&mut self, now: Instant) {
        self.last_paint = Some(now);
    }

    pub fn new(enabled: bool, drawn: Drawn) -> Self {
        StatusLine {
            enabled,
            drawn,
            last_paint: None,
        }
    }

    /// When the line should next be redrawn (`now` if it never was), if downloads run.
    pub fn next_paint(&self, running: bool, now: Instant) -> Option<Instant> {
        if !self.enabled || !running {
            return None;
        }
        Some(self.last_paint.map_or(now, |t| t + PAINT_EVERY))
    }

    /// Other output is about to be written: the line is erased (batch style) or given up
    /// (prompt style: the output moves the prompt away from it).
    pub fn before_output(&mut self, out: &mut impl Write) {
        if self.drawn.take() == IN_PLACE {
            let _ = out.write_all(ERASE_LINE.as_bytes());
            let _ = out.flush();
        }
    }

    /// The prompt is about to be printed: with downloads running, the line goes just above it.
    pub fn at_prompt(&mut self, text: Option<&str>, now: Instant, out: &mut impl Write) {
        self.before_output(out);
        let (true, Some(text)) = (self.enabled, text) else {
            return;
        };
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
        self.drawn.set(ABOVE_PROMPT);
        self.last_paint = Some(now);
    }

    /// Redraws the line: in place (`at_prompt` false), or above the prompt if it is still
    /// there. `text` `None` erases the line.
    pub fn paint(
        &mut self,
        text: Option<&str>,
        at_prompt: bool,
        now: Instant,
        out: &mut impl Write,
    ) {
        if !self.enabled {
            return;
        }
        self.last_paint = Some(now);
        let state = self.drawn.get();
        if at_prompt {
            if state == ABOVE_PROMPT {
                let text = text.unwrap_or("");
                let _ = write!(out, "{TO_LINE_ABOVE}{text}{BACK_TO_PROMPT}");
                let _ = out.flush();
            }
            return;
        }
        match text {
            Some(text) => {
                let _ = write!(out, "{ERASE_LINE}{text}");
                self.drawn.set(IN_PLACE);
            }
            None if state == IN_PLACE => {
                let _ = out.write_all(ERASE_LINE.as_bytes());
                self.drawn.set(NOWHERE);
            }
            None => self.drawn.set(NOWHERE),
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, verified: u64, size: u64, secs: f64, peers: usize) -> Item<'_> {
        Item {
            name,
            progress: Progress {
                bytes_verified: verified,
                size,
                pieces_verified: 0,
                n_pieces: 0,
                active_peers: peers,
            },
            elapsed: Duration::from_secs_f64(secs),
            recent_rate: None,
        }
    }

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn one_download_shows_percent_size_rate_and_peers() {
        let line = summary(&[item("movie.bin", 512 * MIB, 1024 * MIB, 2.0, 4)], 79);
        assert_eq!(
            line.as_deref(),
            Some("movie.bin 50.0% of 1.0 GiB 256.0 MiB/s 4 peers")
        );
        let line = summary(&[item("a", 0, 1000, 0.0, 1)], 79);
        assert_eq!(line.as_deref(), Some("a 0.0% of 1000 B 0.0 MiB/s 1 peer"));
        let line = summary(&[item("empty", 0, 0, 1.0, 0)], 79);
        assert_eq!(
            line.as_deref(),
            Some("empty 100.0% of 0 B 0.0 MiB/s 0 peers")
        );
    }

    #[test]
    fn nothing_running_shows_nothing() {
        assert_eq!(summary(&[], 79), None);
    }

    #[test]
    fn several_downloads_share_the_line_and_it_never_wraps() {
        let items = [
            item("first.iso", 5 * MIB, 50 * MIB, 1.0, 2),
            item("second.iso", MIB, 10 * MIB, 1.0, 1),
        ];
        let line = summary(&items, 200).unwrap();
        assert_eq!(
            line,
            "first.iso 10.0% of 50.0 MiB 5.0 MiB/s 2 peers | second.iso 10.0% of 10.0 MiB 1.0 MiB/s 1 peer"
        );
        let cut_line = summary(&items, 79).unwrap();
        assert_eq!(cut_line.chars().count(), 79);
        assert!(cut_line.ends_with("..."));
        assert!(line.starts_with(&cut_line[..79 - 3]));
    }

    #[test]
    fn control_characters_in_names_cannot_move_the_cursor() {
        let line = summary(&[item("evil\x1b[2Jname\r", 0, 10, 1.0, 1)], 79).unwrap();
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(line.starts_with("evil?[2Jname?"));
        // Long names are cut by display columns, not bytes or characters.
        let name = "é".repeat(100);
        let line = summary(&[item(&name, 0, 10, 1.0, 1)], 20).unwrap();
        assert_eq!(line.chars().count(), 20);
        assert_eq!(columns(&line), 20);
        // Wide characters take two columns each: 8 of them and "..." in 19 columns.
        let name = "映".repeat(50);
        let line = summary(&[item(&name, 0, 10, 1.0, 1)], 19).unwrap();
        assert_eq!(line, format!("{}...", "映".repeat(8)));
        assert_eq!(columns(&line), 19);
        // A combining mark (no width of its own) is shown as `?`.
        let line = summary(&[item("e\u{301}", 0, 10, 1.0, 1)], 79).unwrap();
        assert!(line.starts_with("e? "), "{line:?}");
        // Tiny widths still give a line that fits.
        for width in 0..6 {
            let line = summary(&[item("name", 0, 10, 1.0, 1)], width).unwrap();
            assert!(columns(&line) <= width, "{width}: {line:?}");
        }
    }

    #[test]
    fn sizes_use_the_largest_fitting_unit() {
        assert_eq!(size_text(0), "0 B");
        assert_eq!(size_text(1023), "1023 B");
        assert_eq!(size_text(1024), "1.0 KiB");
        assert_eq!(size_text(5 * 1024 * MIB + 512 * MIB), "5.5 GiB");
        assert_eq!(size_text(u64::MAX), "16777216.0 TiB");
    }

    fn painted(f: impl FnOnce(&mut StatusLine, &mut Vec<u8>)) -> String {
        let mut line = StatusLine::new(true, Drawn::default());
        let mut out = Vec::new();
        f(&mut line, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn batch_style_redraws_in_place_and_erases_before_output() {
        let now = Instant::now();
        let out = painted(|l, out| {
            l.paint(Some("a 1%"), false, now, out);
            l.paint(Some("a 2%"), false, now, out);
            l.before_output(out);
            // Erasing twice writes nothing more.
            l.before_output(out);
            l.paint(None, false, now, out);
        });
        assert_eq!(out, "\r\x1b[2Ka 1%\r\x1b[2Ka 2%\r\x1b[2K");
    }

    #[test]
    fn prompt_style_draws_above_the_prompt_until_output_moves_it() {
        let now = Instant::now();
        let out = painted(|l, out| {
            l.at_prompt(Some("a 1%"), now, out);
            l.paint(Some("a 2%"), true, now, out);
            l.before_output(out);
            // The prompt moved: nothing is drawn until the next one.
            l.paint(Some("a 3%"), true, now, out);
        });
        assert_eq!(out, "a 1%\n\x1b7\x1b[1A\r\x1b[2Ka 2%\x1b8");
        // Nothing running at the prompt: no line is reserved.
        let out = painted(|l, out| {
            l.at_prompt(None, now, out);
            l.paint(Some("a 1%"), true, now, out);
        });
        assert_eq!(out, "");
    }

    #[test]
    fn a_disabled_line_draws_nothing_and_asks_for_no_wake_ups() {
        let now = Instant::now();
        let mut line = StatusLine::new(false, Drawn::default());
        let mut out = Vec::new();
        line.at_prompt(Some("a"), now, &mut out);
        line.paint(Some("a"), false, now, &mut out);
        line.paint(Some("a"), true, now, &mut out);
        line.before_output(&mut out);
        assert!(out.is_empty());
        assert_eq!(line.next_paint(true, now), None);
        let mut on = StatusLine::new(true, Drawn::default());
        assert_eq!(on.next_paint(false, now), None);
        assert_eq!(on.next_paint(true, now), Some(now), "due at once at first");
        on.paint(Some("a"), false, now, &mut out);
        assert_eq!(on.next_paint(true, now), Some(now + PAINT_EVERY));
    }

    #[test]
    fn a_log_line_erases_the_line_first_and_ends_its_place_above_the_prompt() {
        let now = Instant::now();
        let drawn = Drawn::default();
        let mut line = StatusLine::new(true, drawn.clone());
        let mut out = Vec::new();
        line.paint(Some("a 1%"), false, now, &mut out);
        assert_eq!(drawn.get(), IN_PLACE);
        // What the log sink does before writing: it finds the line drawn in place, so it
        // erases it; then nothing is left to erase.
        assert_eq!(drawn.take(), IN_PLACE);
        line.before_output(&mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "\r\x1b[2Ka 1%");
        // Above the prompt: after a log line, the next paint does not move up a line (the log
        // line moved the prompt).
        let mut out = Vec::new();
        line.at_prompt(Some("a 2%"), now, &mut out);
        assert_eq!(drawn.get(), ABOVE_PROMPT);
        drawn.take();
        line.paint(Some("a 3%"), true, now, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "a 2%\n");
    }

    #[test]
    fn the_recent_rate_wins_over_the_average() {
        let mut it = item("movie.bin", 512 * MIB, 1024 * MIB, 2.0, 4);
        it.recent_rate = Some(10.0 * MIB as f64);
        assert_eq!(
            summary(&[it], 79).as_deref(),
            Some("movie.bin 50.0% of 1.0 GiB 10.0 MiB/s 4 peers")
        );
    }

    #[test]
    fn recent_rates_look_back_two_seconds() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut rates = RecentRates::default();
        // Too short a span at first: no rate yet.
        assert_eq!(rates.sample(1, 0, at(0)), None);
        assert_eq!(rates.sample(1, 100, at(250)), None);
        // 1,000 bytes in 500 ms.
        assert_eq!(rates.sample(1, 1000, at(500)), Some(2000.0));
        // Fast for 4 s, then a stall of 2 s: the rate falls to 0 instead of the average.
        let mut bytes = 1000;
        for ms in (750..=4000).step_by(250) {
            bytes += 1000;
            rates.sample(1, bytes, at(ms));
        }
        let mut last = None;
        for ms in (4250..=6250).step_by(250) {
            last = rates.sample(1, bytes, at(ms));
        }
        assert_eq!(last, Some(0.0));
        // Another download has its own samples; forgetting one keeps the other.
        assert_eq!(rates.sample(2, 0, at(6250)), None);
        rates.retain(|id| id == 2);
        assert_eq!(
            rates.sample(1, bytes, at(6500)),
            None,
            "download 1 starts over"
        );
        // A clock that goes backwards (it cannot, but) gives no rate rather than a panic.
        assert_eq!(rates.sample(3, 10, at(1000)), None);
        assert_eq!(rates.sample(3, 20, at(0)), None);
    }
}
