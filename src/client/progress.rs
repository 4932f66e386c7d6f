//! The live progress line shown on a terminal while downloads run.
//!
//! When stderr is a terminal, the client keeps one line there up to date, four times a second,
//! with each running download's percent, average rate and peers. [`summary`] builds the text
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
//! Nothing is drawn when stderr is not a terminal (the tests, a log file) or `TERM` is `dumb`,
//! so stdout and stderr keep exactly the lines the SPEC defines.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use super::download::engine::Progress;

/// How often the line is redrawn.
pub const PAINT_EVERY: Duration = Duration::from_millis(250);
/// Longest line drawn: longer lines would wrap, and a wrapped line is not erased by the
/// carriage return and erase-line sequence.
pub const WIDTH: usize = 79;

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
    let pct = if p.size == 0 {
        100.0
    } else {
        p.bytes_verified as f64 * 100.0 / p.size as f64
    };
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let rate = mib(p.bytes_verified) / item.elapsed.as_secs_f64().max(1e-3);
    let peers = if p.active_peers == 1 { "peer" } else { "peers" };
    format!(
        "{} {pct:.1}% of {} {rate:.1} MiB/s {} {peers}",
        item.name,
        size_text(p.size),
        p.active_peers
    )
}

/// `size` bytes in the largest unit that keeps a number of at least 1.
fn size_text(size: u64) -> String {
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

/// `line` cut to `width` characters, ending in `...` when cut. Control characters (a file name
/// may hold any) are shown as `?` so that they cannot move the cursor.
fn cut(line: &str, width: usize) -> String {
    let clean: Vec<char> = line
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if clean.len() <= width {
        return clean.into_iter().collect();
    }
    let keep = width.saturating_sub(3);
    let mut out: String = clean.into_iter().take(keep).collect();
    out.push_str("...");
    out
}

/// The progress line on the terminal (see the module doc).
#[derive(Debug)]
pub struct StatusLine {
    enabled: bool,
    /// Batch style: the line is on screen and the cursor at its end.
    shown: bool,
    /// Prompt style: the line above the prompt is ours.
    above: bool,
    last_paint: Option<Instant>,
}

impl StatusLine {
    /// A line drawn only if stderr is a terminal that understands the escape sequences.
    pub fn for_stderr() -> Self {
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        Self::new(io::stderr().is_terminal() && !dumb)
    }

    pub fn new(enabled: bool) -> Self {
        StatusLine {
            enabled,
            shown: false,
            above: false,
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
        if self.shown {
            let _ = out.write_all(ERASE_LINE.as_bytes());
            let _ = out.flush();
            self.shown = false;
        }
        self.above = false;
    }

    /// The prompt is about to be printed: with downloads running, the line goes just above it.
    pub fn at_prompt(&mut self, text: Option<&str>, now: Instant, out: &mut impl Write) {
        self.before_output(out);
        let (true, Some(text)) = (self.enabled, text) else {
            return;
        };
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
        self.above = true;
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
        if at_prompt {
            if self.above {
                let text = text.unwrap_or("");
                let _ = write!(out, "{TO_LINE_ABOVE}{text}{BACK_TO_PROMPT}");
                let _ = out.flush();
            }
            return;
        }
        self.above = false;
        match text {
            Some(text) => {
                let _ = write!(out, "{ERASE_LINE}{text}");
                self.shown = true;
            }
            None if self.shown => {
                let _ = out.write_all(ERASE_LINE.as_bytes());
                self.shown = false;
            }
            None => {}
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
        }
    }

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn one_download_shows_percent_size_rate_and_peers() {
        let line = summary(&[item("movie.bin", 512 * MIB, 1024 * MIB, 2.0, 4)], WIDTH);
        assert_eq!(
            line.as_deref(),
            Some("movie.bin 50.0% of 1.0 GiB 256.0 MiB/s 4 peers")
        );
        let line = summary(&[item("a", 0, 1000, 0.0, 1)], WIDTH);
        assert_eq!(line.as_deref(), Some("a 0.0% of 1000 B 0.0 MiB/s 1 peer"));
        let line = summary(&[item("empty", 0, 0, 1.0, 0)], WIDTH);
        assert_eq!(
            line.as_deref(),
            Some("empty 100.0% of 0 B 0.0 MiB/s 0 peers")
        );
    }

    #[test]
    fn nothing_running_shows_nothing() {
        assert_eq!(summary(&[], WIDTH), None);
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
        let cut_line = summary(&items, WIDTH).unwrap();
        assert_eq!(cut_line.chars().count(), WIDTH);
        assert!(cut_line.ends_with("..."));
        assert!(line.starts_with(&cut_line[..WIDTH - 3]));
    }

    #[test]
    fn control_characters_in_names_cannot_move_the_cursor() {
        let line = summary(&[item("evil\x1b[2Jname\r", 0, 10, 1.0, 1)], WIDTH).unwrap();
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(line.starts_with("evil?[2Jname?"));
        // Long names are cut by characters, not bytes.
        let name = "é".repeat(100);
        let line = summary(&[item(&name, 0, 10, 1.0, 1)], 20).unwrap();
        assert_eq!(line.chars().count(), 20);
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
        let mut line = StatusLine::new(true);
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
        let mut line = StatusLine::new(false);
        let mut out = Vec::new();
        line.at_prompt(Some("a"), now, &mut out);
        line.paint(Some("a"), false, now, &mut out);
        line.paint(Some("a"), true, now, &mut out);
        line.before_output(&mut out);
        assert!(out.is_empty());
        assert_eq!(line.next_paint(true, now), None);
        let mut on = StatusLine::new(true);
        assert_eq!(on.next_paint(false, now), None);
        assert_eq!(on.next_paint(true, now), Some(now), "due at once at first");
        on.paint(Some("a"), false, now, &mut out);
        assert_eq!(on.next_paint(true, now), Some(now + PAINT_EVERY));
    }
}
