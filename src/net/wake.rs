//! Helpers that feed a reactor from outside: a thread reading standard input line by line
//! (epoll refuses regular files, so `client_program < commands.txt` cannot register fd 0), and
//! SIGINT/SIGTERM delivered as a readable mio source.

use std::io::{self, BufRead, Read};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;

use mio::{Interest, Registry, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

/// Longest command line accepted; a longer one is skipped and reported.
pub const MAX_LINE: usize = 64 * 1024;

/// What the stdin thread saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdinEvent {
    Line(String),
    /// A line longer than [`MAX_LINE`] bytes (its contents are dropped).
    TooLong,
    /// End of input (or a read error, which ends input just the same).
    Eof,
}

/// Starts the thread that reads standard input. Each event is sent on the returned channel
/// and then the reactor is woken. The caller must keep its own handle on `waker` for as long
/// as it polls: the thread drops this one when input ends, and a dropped waker's eventfd is
/// closed, taking its pending wake-up with it.
pub fn spawn_stdin_reader(waker: Arc<Waker>) -> io::Result<Receiver<StdinEvent>> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new().name("stdin".into()).spawn(move || {
        let stdin = io::stdin();
        let mut input = stdin.lock();
        loop {
            let event = read_line(&mut input);
            let eof = event == StdinEvent::Eof;
            if tx.send(event).is_err() {
                return;
            }
            let _ = waker.wake();
            if eof {
                return;
            }
        }
    })?;
    Ok(rx)
}

/// Reads one line without ever holding more than `MAX_LINE` bytes of it.
fn read_line(input: &mut impl BufRead) -> StdinEvent {
    let mut buf = Vec::new();
    match input
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
    {
        Ok(0) | Err(_) => StdinEvent::Eof,
        Ok(_) => {
            if buf.last() == Some(&b'\n') {
                buf.pop();
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                return StdinEvent::Line(String::from_utf8_lossy(&buf).into_owned());
            }
            if buf.len() <= MAX_LINE {
                // The last line of the input, without a newline.
                return StdinEvent::Line(String::from_utf8_lossy(&buf).into_owned());
            }
            // Too long: skip the rest of it.
            loop {
                buf.clear();
                match input
                    .by_ref()
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut buf)
                {
                    Ok(0) | Err(_) => return StdinEvent::TooLong,
                    Ok(_) if buf.last() == Some(&b'\n') => return StdinEvent::TooLong,
                    Ok(_) => {}
                }
            }
        }
    }
}

/// SIGINT and SIGTERM as a mio source: when `token` is readable, a shutdown was asked for.
pub fn register_signals(registry: &Registry, token: Token) -> io::Result<Signals> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    registry.register(&mut signals, token, Interest::READABLE)?;
    Ok(signals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_crlf_and_last_line_without_newline() {
        let mut input = io::Cursor::new(b"a b\r\nc\n\nlast".to_vec());
        assert_eq!(read_line(&mut input), StdinEvent::Line("a b".into()));
        assert_eq!(read_line(&mut input), StdinEvent::Line("c".into()));
        assert_eq!(read_line(&mut input), StdinEvent::Line("".into()));
        assert_eq!(read_line(&mut input), StdinEvent::Line("last".into()));
        assert_eq!(read_line(&mut input), StdinEvent::Eof);
    }

    #[test]
    fn overlong_line_is_skipped() {
        let mut data = vec![b'x'; MAX_LINE * 3];
        data.extend_from_slice(b"\nok\n");
        let mut input = io::Cursor::new(data);
        assert_eq!(read_line(&mut input), StdinEvent::TooLong);
        assert_eq!(read_line(&mut input), StdinEvent::Line("ok".into()));
    }
}
