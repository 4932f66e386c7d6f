//! The shell's history file: which lines may be remembered, and how they are kept on disk.
//!
//! Lines of `create_user` and `login` carry a password and are never remembered (nor are lines
//! typed with a leading space, as in bash). A line that does not start with a command name is
//! remembered for this run only (Up brings it back to fix a typo) but never written to the
//! file: `crate_user alice secret` holds a password too. The file holds at most [`MAX_ENTRIES`] lines, one
//! entry per line with `\` and newlines escaped, and is replaced atomically (temporary file,
//! fsync, rename) so that a crash leaves the old or the new history, never half of one.
//! [`remember`], [`encode`] and [`decode`] are pure; [`load`] and [`save`] do the file IO
//! (called from the shell's thread, never from the reactor).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::command::split_words;

/// Most entries kept (older ones are dropped first).
pub const MAX_ENTRIES: usize = 1000;
/// Longest entry kept, in bytes (a longer line is run but not remembered).
pub const MAX_ENTRY_LEN: usize = 4096;
/// The history file's name in the state directory.
pub const FILE_NAME: &str = "history";

/// Commands whose lines hold a password.
const SECRET_COMMANDS: [&str; 2] = ["create_user", "login"];

/// Whether `line` may go to the history of this run: not blank, not a secret, not typed with a
/// leading space, not over-long. The command is recognised however it is written (`login`,
/// `"login"`, `LOGIN`), and even on a line that does not parse.
pub fn remember(line: &str) -> bool {
    first_word(line).is_some_and(|first| {
        !SECRET_COMMANDS
            .iter()
            .any(|secret| first.eq_ignore_ascii_case(secret))
    })
}

/// Whether `line` may be written to the history file: it is remembered and starts with the
/// name of a command (so a mistyped command, which may hold a password, stays off the disk).
pub fn persist(line: &str) -> bool {
    remember(line) && first_word(line).is_some_and(|first| super::help::find(&first).is_some())
}

/// The first word of a line that may be remembered at all.
fn first_word(line: &str) -> Option<String> {
    if line.trim().is_empty() || line.starts_with(char::is_whitespace) || line.len() > MAX_ENTRY_LEN
    {
        return None;
    }
    let first = match split_words(line) {
        Ok(words) => words.into_iter().next(),
        // An unterminated quote: the first white-space separated word, quotes dropped.
        Err(_) => line.split_whitespace().next().map(|w| w.replace('"', "")),
    };
    first
}

/// The file's text for `entries` (oldest first), keeping the newest [`MAX_ENTRIES`].
pub fn encode<'a>(entries: impl IntoIterator<Item = &'a str>) -> String {
    let kept: Vec<&str> = entries.into_iter().filter(|e| persist(e)).collect();
    let skip = kept.len().saturating_sub(MAX_ENTRIES);
    let mut text = String::new();
    for entry in &kept[skip..] {
        for c in entry.chars() {
            match c {
                '\\' => text.push_str("\\\\"),
                '\n' => text.push_str("\\n"),
                c => text.push(c),
            }
        }
        text.push('\n');
    }
    text
}

/// The entries in a history file's text, oldest first: the newest [`MAX_ENTRIES`] of those
/// [`persist`] accepts (a file edited by hand cannot bring a password back into the list).
pub fn decode(text: &str) -> Vec<String> {
    let mut entries: Vec<String> = text
        .lines()
        .map(|line| {
            let mut entry = String::with_capacity(line.len());
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                match (c, c == '\\') {
                    (_, true) => match chars.next() {
                        Some('n') => entry.push('\n'),
                        Some(other) => entry.push(other),
                        None => entry.push('\\'),
                    },
                    (c, false) => entry.push(c),
                }
            }
            entry
        })
        .filter(|e| persist(e))
        .collect();
    let skip = entries.len().saturating_sub(MAX_ENTRIES);
    entries.drain(..skip);
    entries
}

/// The history file of the state directory `dir`.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Reads the history at `path`; a missing file is an empty history. At most a few MiB are
/// read, so a huge file cannot fill memory.
pub fn load(path: &Path) -> io::Result<Vec<String>> {
    use std::io::Read;
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let limit = (MAX_ENTRIES * (2 * MAX_ENTRY_LEN + 1)) as u64;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(decode(&String::from_utf8_lossy(&bytes)))
}

/// Replaces the history at `path` with `entries` atomically (temporary file, fsync, rename),
/// readable by its owner only.
pub fn save<'a>(path: &Path, entries: impl IntoIterator<Item = &'a str>) -> io::Result<()> {
    let text = encode(entries);
    let tmp = path.with_extension("tmp");
    let mut options = File::options();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_remembered() {
        for line in [
            "create_user alice pw",
            "login alice pw",
            "LOGIN alice pw",
            "\"login\" alice pw",
            "login \"alice pw",
            "login",
            "  list_groups",
            " login alice pw",
            "",
            "   ",
        ] {
            assert!(!remember(line), "{line:?}");
        }
        for line in [
            "list_groups",
            "logout",
            "download_file g \"a b\" /tmp/",
            "list_files \"unterminated",
            "help",
        ] {
            assert!(remember(line) && persist(line), "{line:?}");
        }
        // Typos are kept for this run only: they may hold a password.
        for line in ["loginx a b", "crate_user alice secret", "# a comment"] {
            assert!(remember(line) && !persist(line), "{line:?}");
        }
        assert!(!remember(&"x".repeat(MAX_ENTRY_LEN + 1)));
    }

    #[test]
    fn encode_decode_round_trip_and_bound() {
        let entries = [
            "help a",
            "help back\\slash",
            "help two\nlines",
            "login x y",
            "typo x y",
            "list_groups",
        ];
        let text = encode(entries);
        assert_eq!(
            text,
            "help a\nhelp back\\\\slash\nhelp two\\nlines\nlist_groups\n"
        );
        assert_eq!(
            decode(&text),
            [
                "help a",
                "help back\\slash",
                "help two\nlines",
                "list_groups"
            ]
        );
        // A hand-edited file loses its secrets on load.
        assert_eq!(decode("login a b\nlogout\n"), ["logout"]);
        let many: Vec<String> = (0..MAX_ENTRIES + 10)
            .map(|i| format!("help c{i}"))
            .collect();
        let decoded = decode(&encode(many.iter().map(String::as_str)));
        assert_eq!(decoded.len(), MAX_ENTRIES);
        assert_eq!(decoded[0], "help c10");
        let decoded = decode(&many.join("\n"));
        assert_eq!(decoded.len(), MAX_ENTRIES);
        assert_eq!(
            decoded.last().unwrap(),
            &format!("help c{}", MAX_ENTRIES + 9)
        );
    }

    #[test]
    fn save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        assert!(load(&path).unwrap().is_empty());
        save(&path, ["list_groups", "login a b", "logout"]).unwrap();
        assert_eq!(load(&path).unwrap(), ["list_groups", "logout"]);
        save(&path, ["show_downloads"]).unwrap();
        assert_eq!(load(&path).unwrap(), ["show_downloads"]);
        assert!(!path.with_extension("tmp").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
    }
}
