//! The client's interactive shell, through a pseudo-terminal (a small helper over `rustix`'s
//! pty calls), and the `help` command and `--help` text in batch use.
//!
//! No tracker runs here: `help` and the history need none, and a `login` against a tracker
//! file whose port nobody listens on fails at once (a refused loopback connection).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{free_addr, ProcGuard};

/// How long any one expected output may take on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The master side of a pseudo-terminal, and everything the child wrote to it so far.
struct Pty {
    master: File,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    /// Opens a pty of 100x30 and returns it with its slave side (for the child's stdio).
    fn open() -> (Pty, File) {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let slave = File::options()
            .read(true)
            .write(true)
            .open(Path::new(name.to_str().expect("pts name")))
            .expect("open pts");
        rustix::termios::tcsetwinsize(
            &slave,
            rustix::termios::Winsize {
                ws_row: 30,
                ws_col: 100,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .expect("window size");
        let master = File::from(master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().expect("clone master");
        let sink = Arc::clone(&output);
        // Reads until the slave side is closed by everyone (EIO), i.e. the child has exited.
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        (Pty { master, output }, slave)
    }

    fn type_keys(&mut self, keys: &str) {
        self.master
            .write_all(keys.as_bytes())
            .expect("write to pty");
        self.master.flush().expect("flush pty");
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until `ready` holds for the output so far; panics with the output on timeout.
    fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = self.text();
            if ready(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the terminal shows:\n{text:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether a prompt was drawn after the last occurrence of `after`.
fn prompt_after(text: &str, after: &str) -> bool {
    text.rfind(after)
        .is_some_and(|i| text[i + after.len()..].contains("> "))
}

#[test]
fn up_arrow_and_enter_run_the_last_command_again_and_passwords_stay_out_of_history() {
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("tracker_info.txt");
    // A tracker nobody runs: nothing here needs one.
    std::fs::write(&info, format!("{}\n", free_addr())).unwrap();
    let state = dir.path().join("state");
    let (mut pty, slave) = Pty::open();
    let child = Command::new(env!("CARGO_BIN_EXE_client_program"))
        .arg(free_addr().to_string())
        .arg(&info)
        .arg("--state-dir")
        .arg(&state)
        .env("TERM", "xterm")
        .env("XDG_STATE_HOME", dir.path())
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("start client_program");
    let mut client = ProcGuard::new(child);

    pty.wait_for("the first prompt", |t| t.contains("> "));
    pty.type_keys("help quit\r");
    const DETAIL: &str = "usage: quit";
    pty.wait_for("help's answer", |t| prompt_after(t, DETAIL));
    // Up brings the line back; Enter runs it again.
    pty.type_keys("\x1b[A");
    pty.wait_for("the recalled line", |t| {
        t.rfind(DETAIL)
            .is_some_and(|i| t[i..].contains("help quit"))
    });
    pty.type_keys("\r");
    let text = pty.wait_for("the second answer", |t| {
        t.matches(DETAIL).count() == 2 && prompt_after(t, DETAIL)
    });
    assert!(!text.contains("^[[A"), "{text:?}");
    assert!(!text.contains("unknown command"), "{text:?}");

    // A login (it fails: no tracker) must not reach the history, in memory or on disk.
    pty.type_keys("login alice s3cret-pw\r");
    pty.wait_for("the login's error", |t| prompt_after(t, "error: "));
    pty.type_keys("\x1b[A");
    pty.wait_for("the recalled line", |t| {
        t.rfind("error: ")
            .is_some_and(|i| t[i..].contains("help quit"))
    });
    // Ctrl-C drops the recalled line and shows a fresh prompt; Ctrl-D on the empty line ends
    // the input. (The keys go one at a time, as typed: keys that arrive together with the
    // Ctrl-C are dropped with the line.)
    let before = pty.text().len();
    pty.type_keys("\x03");
    pty.wait_for("a fresh prompt", |t| {
        t.get(before..).is_some_and(|t| t.contains("> "))
    });
    pty.type_keys("\x04");
    let Some(status) = client.wait_timeout(TIMEOUT) else {
        panic!(
            "client_program still runs after Ctrl-D; the terminal shows:\n{:?}",
            pty.text()
        );
    };
    assert_eq!(status.code(), Some(1), "the login failed");
    let history = std::fs::read_to_string(state.join("history")).expect("history file");
    assert_eq!(history, "help quit\n");
    assert!(!history.contains("s3cret"));
}

#[test]
fn with_stdout_redirected_the_prompt_goes_to_the_terminal_and_stdout_holds_results_only() {
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("tracker_info.txt");
    std::fs::write(&info, format!("{}\n", free_addr())).unwrap();
    let out_path = dir.path().join("out.txt");
    let out = File::create(&out_path).unwrap();
    let (mut pty, slave) = Pty::open();
    let child = Command::new(env!("CARGO_BIN_EXE_client_program"))
        .arg(free_addr().to_string())
        .arg(&info)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("TERM", "xterm")
        .env("XDG_STATE_HOME", dir.path())
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("start client_program");
    let mut client = ProcGuard::new(child);
    // The user still sees a prompt (on the terminal, standard error)...
    pty.wait_for("the first prompt", |t| t.contains("> "));
    pty.type_keys("show_downloads\r");
    pty.wait_for("the second prompt", |t| t.matches("> ").count() >= 2);
    pty.type_keys("help quit\r");
    pty.wait_for("the third prompt", |t| t.matches("> ").count() >= 3);
    pty.type_keys("quit\r");
    let Some(status) = client.wait_timeout(TIMEOUT) else {
        panic!("client_program still runs after quit: {:?}", pty.text());
    };
    assert_eq!(status.code(), Some(0));
    // ...and the file gets the results alone.
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    assert!(!stdout.contains("> "), "{stdout:?}");
    assert!(stdout.starts_with("usage: quit"), "{stdout:?}");
}

fn run_batch(stdin: &str, args: &[&str]) -> (String, String, Option<i32>) {
    let dir = tempfile::tempdir().unwrap();
    let info = dir.path().join("tracker_info.txt");
    std::fs::write(&info, format!("{}\n", free_addr())).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_client_program"))
        .args(args)
        .arg(free_addr().to_string())
        .arg(&info)
        .env("XDG_STATE_HOME", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start client_program");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + TIMEOUT;
    let waiter = thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() {
        if Instant::now() >= deadline {
            common::send_signal(pid, "KILL");
            panic!("client_program did not exit");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let out = waiter.join().unwrap().unwrap();
    // Batch use keeps no history (the state directory holds only the client's lock and,
    // once something is shared, its state file).
    for entry in std::fs::read_dir(dir.path().join("p2pshare"))
        .into_iter()
        .flatten()
    {
        let client_dir = entry.unwrap().path();
        assert!(!client_dir.join("history").exists(), "{client_dir:?}");
    }
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.code(),
    )
}

#[test]
fn help_works_without_a_session_in_batch_use() {
    let (stdout, stderr, code) = run_batch("help\nhelp list_files\n", &[]);
    assert_eq!(stderr, "");
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("Commands"), "{stdout}");
    for name in ["create_user", "download_file", "show_downloads", "quit"] {
        assert!(stdout.contains(&format!("\n  {name} ")), "{name}: {stdout}");
    }
    assert!(
        stdout.contains("usage: list_files <group_id>\n"),
        "{stdout}"
    );

    let (stdout, stderr, code) = run_batch("help frobnicate\nhelp a b\n", &[]);
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    assert!(stderr.lines().all(|l| l.starts_with("error: ")), "{stderr}");
    assert_eq!(code, Some(1));
}

#[test]
fn dash_dash_help_lists_the_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_client_program"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("--state-dir DIR"), "{text}");
    assert!(text.contains("Commands"), "{text}");
    for line in [
        "create_user <user_id> <passwd>",
        "download_file <group_id> <file_name> <destination_path>",
        "help [command]",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
}
