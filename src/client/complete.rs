//! Tab completion for the interactive shell: command names, group ids and file names from the
//! last listings (and the user's own shares), and local paths for `upload_file`'s file and
//! `download_file`'s destination.
//!
//! [`complete`] is pure apart from the directory listing, which goes through [`DirLister`] so
//! that tests can use a temporary directory. The words of the line are split as the command
//! parser splits them (double quotes hold spaces; `\"` and `\\` inside quotes), and a candidate
//! that needs quotes is written with them, so what completion inserts always parses back to
//! the name it showed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::help::{self, ArgKind};
use super::session::ClientCore;

/// Most directory entries looked at for one completion (a huge directory stays snappy).
pub const MAX_DIR_ENTRIES: usize = 10_000;

/// What completion knows about the tracker's side, copied from the core when the prompt is
/// shown (the shell's thread never touches the core).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompletionData {
    pub groups: BTreeSet<String>,
    /// File names per group id.
    pub files: BTreeMap<String, BTreeSet<String>>,
}

impl CompletionData {
    /// The groups and files of the core's last listings, plus the groups and files the
    /// logged-in user shares from this client.
    pub fn from_core(core: &ClientCore) -> Self {
        let listings = core.listings();
        let mut data = CompletionData {
            groups: listings.groups().iter().map(|g| g.to_string()).collect(),
            files: listings
                .files()
                .iter()
                .map(|(g, names)| (g.to_string(), names.iter().map(|n| n.to_string()).collect()))
                .collect(),
        };
        if let Some(user) = core.logged_in_user() {
            for share in core.shares().iter().filter(|s| &s.user == user) {
                data.groups.insert(share.group.to_string());
                data.files
                    .entry(share.group.to_string())
                    .or_default()
                    .insert(share.name.to_string());
            }
        }
        data
    }
}

/// One completion: what the list shows, and what replaces the word being typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub display: String,
    pub replacement: String,
}

/// Lists a directory for path completion: `(name, is_dir)` of at most [`MAX_DIR_ENTRIES`]
/// entries (symbolic links followed for `is_dir`).
pub trait DirLister {
    fn list(&self, dir: &Path) -> Vec<(String, bool)>;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealDirs;

impl DirLister for RealDirs {
    fn list(&self, dir: &Path) -> Vec<(String, bool)> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .take(MAX_DIR_ENTRIES)
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let is_dir = std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir());
                Some((name, is_dir))
            })
            .collect()
    }
}

/// The word under completion.
#[derive(Debug, Default)]
struct Words {
    /// The complete words before it, unquoted.
    before: Vec<String>,
    /// Its byte offset in the line.
    start: usize,
    /// Its value so far, unquoted.
    value: String,
    /// Whether it is (or was) inside double quotes.
    quoted: bool,
}

/// Splits `line` (up to the cursor) as `command::split_words` does, but leniently: an open
/// quote is the word being typed.
fn scan(line: &str) -> Words {
    let mut w = Words {
        start: line.len(),
        ..Words::default()
    };
    let mut in_word = false;
    let mut in_quote = false;
    let mut chars = line.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if in_quote {
            match c {
                '"' => in_quote = false,
                '\\' => match chars.peek() {
                    Some(&(_, e @ ('"' | '\\'))) => {
                        w.value.push(e);
                        chars.next();
                    }
                    _ => w.value.push('\\'),
                },
                c => w.value.push(c),
            }
            continue;
        }
        if c.is_whitespace() {
            if in_word {
                w.before.push(std::mem::take(&mut w.value));
                in_word = false;
                w.quoted = false;
            }
            continue;
        }
        if !in_word {
            in_word = true;
            w.start = i;
        }
        if c == '"' {
            in_quote = true;
            w.quoted = true;
        } else {
            w.value.push(c);
        }
    }
    if !in_word {
        w.start = line.len();
    }
    w
}

/// `value` as the command parser reads it back: in double quotes if it holds white space or a
/// quote (or `quote` is set because the user opened one), closed and followed by a space when
/// `done` (nothing more to type in this word).
fn render(value: &str, done: bool, quote: bool) -> String {
    let needs = quote || value.is_empty() || value.chars().any(|c| c.is_whitespace() || c == '"');
    let mut out = String::new();
    if needs {
        out.push('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        if done {
            out.push('"');
        }
    } else {
        out.push_str(value);
    }
    if done {
        out.push(' ');
    }
    out
}

fn words_from<'a>(
    names: impl IntoIterator<Item = &'a str>,
    prefix: &str,
    quote: bool,
) -> Vec<Candidate> {
    names
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .map(|n| Candidate {
            display: n.to_owned(),
            replacement: render(n, true, quote),
        })
        .collect()
}

/// Paths starting with `typed`: `dirs_only` for a destination. Hidden entries only when the
/// typed name starts with a dot.
fn paths(typed: &str, dirs_only: bool, quote: bool, fs: &dyn DirLister) -> Vec<Candidate> {
    let (dir_part, prefix) = match typed.rfind('/') {
        Some(i) => typed.split_at(i + 1),
        None => ("", typed),
    };
    let dir = if dir_part.is_empty() {
        Path::new(".")
    } else {
        Path::new(dir_part)
    };
    let mut found: Vec<(String, bool)> = fs
        .list(dir)
        .into_iter()
        .filter(|(name, is_dir)| {
            name.starts_with(prefix)
                && (prefix.starts_with('.') || !name.starts_with('.'))
                && (*is_dir || !dirs_only)
        })
        .collect();
    found.sort();
    found
        .into_iter()
        .map(|(name, is_dir)| {
            let value = format!("{dir_part}{name}{}", if is_dir { "/" } else { "" });
            Candidate {
                display: format!("{name}{}", if is_dir { "/" } else { "" }),
                // A directory is not finished: the user goes on into it.
                replacement: render(&value, !is_dir, quote),
            }
        })
        .collect()
}

/// Completions of `line` with the cursor at byte `pos`: the byte offset where the word being
/// completed starts, and the candidates that may replace `line[start..pos]`.
pub fn complete(
    line: &str,
    pos: usize,
    data: &CompletionData,
    fs: &dyn DirLister,
) -> (usize, Vec<Candidate>) {
    let Some(before_cursor) = line.get(..pos) else {
        return (pos, Vec::new());
    };
    let w = scan(before_cursor);
    let Some(command) = w.before.first() else {
        let names = help::COMMANDS.iter().map(|c| c.name);
        return (w.start, words_from(names, &w.value, w.quoted));
    };
    let Some(kind) = help::find(command).and_then(|c| c.arg_kinds.get(w.before.len() - 1)) else {
        return (w.start, Vec::new());
    };
    let candidates = match kind {
        ArgKind::Command => words_from(help::COMMANDS.iter().map(|c| c.name), &w.value, w.quoted),
        ArgKind::Group => words_from(data.groups.iter().map(String::as_str), &w.value, w.quoted),
        ArgKind::GroupFile => match w.before.get(1).and_then(|g| data.files.get(g)) {
            Some(names) => words_from(names.iter().map(String::as_str), &w.value, w.quoted),
            None => Vec::new(),
        },
        ArgKind::LocalFile => paths(&w.value, false, w.quoted, fs),
        ArgKind::Destination => paths(&w.value, true, w.quoted, fs),
        ArgKind::NewId | ArgKind::Password | ArgKind::User => Vec::new(),
    };
    (w.start, candidates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::command::split_words;

    fn data() -> CompletionData {
        let mut d = CompletionData::default();
        d.groups
            .extend(["team".to_owned(), "tea".to_owned(), "other".to_owned()]);
        d.files.insert(
            "team".to_owned(),
            ["notes 2026.pdf", "notes.txt", "say \"hi\".txt"]
                .into_iter()
                .map(String::from)
                .collect(),
        );
        d
    }

    /// The replacements for `line` with the cursor at its end.
    fn at_end(line: &str, fs: &dyn DirLister) -> (usize, Vec<String>) {
        let (start, c) = complete(line, line.len(), &data(), fs);
        (start, c.into_iter().map(|c| c.replacement).collect())
    }

    struct NoFs;
    impl DirLister for NoFs {
        fn list(&self, _: &Path) -> Vec<(String, bool)> {
            Vec::new()
        }
    }

    #[test]
    fn command_names() {
        let all: Vec<String> = help::COMMANDS
            .iter()
            .map(|c| format!("{} ", c.name))
            .collect();
        assert_eq!(at_end("", &NoFs), (0, all));
        assert_eq!(
            at_end("list_", &NoFs),
            (
                0,
                vec![
                    "list_requests ".into(),
                    "list_groups ".into(),
                    "list_files ".into()
                ]
            )
        );
        assert_eq!(at_end("  logo", &NoFs), (2, vec!["logout ".into()]));
        assert_eq!(
            at_end("help dow", &NoFs),
            (5, vec!["download_file ".into()])
        );
        assert_eq!(at_end("frobnicate ", &NoFs), (11, vec![]));
        assert_eq!(at_end("logout ", &NoFs), (7, vec![]), "no arguments");
    }

    #[test]
    fn group_ids_from_the_last_listing() {
        assert_eq!(
            at_end("list_files te", &NoFs),
            (11, vec!["tea ".into(), "team ".into()])
        );
        assert_eq!(at_end("join_group o", &NoFs), (11, vec!["other ".into()]));
        assert_eq!(
            at_end("download_file team", &NoFs),
            (14, vec!["team ".into()])
        );
        // The second argument of accept_request is a user, not a group.
        assert_eq!(at_end("accept_request team t", &NoFs), (20, vec![]));
        // A new group id is not completed.
        assert_eq!(at_end("create_group t", &NoFs), (13, vec![]));
        assert_eq!(at_end("login t", &NoFs), (6, vec![]));
    }

    #[test]
    fn file_names_of_a_group_quoted_when_needed() {
        let (start, got) = at_end("download_file team no", &NoFs);
        assert_eq!(start, 19);
        assert_eq!(got, ["\"notes 2026.pdf\" ", "notes.txt "]);
        // An opened quote is kept and the value matched inside it.
        let (start, got) = at_end("stop_share team \"notes ", &NoFs);
        assert_eq!(start, 16);
        assert_eq!(got, ["\"notes 2026.pdf\" "]);
        let (_, got) = at_end("stop_share team say", &NoFs);
        assert_eq!(got, ["\"say \\\"hi\\\".txt\" "]);
        // Every replacement parses back to the name.
        for name in &data().files["team"] {
            let line = format!("stop_share team {}", render(name, true, false));
            assert_eq!(split_words(&line).unwrap()[2], *name);
        }
        // Unknown group: nothing.
        assert_eq!(
            at_end("download_file other n", &NoFs).1,
            Vec::<String>::new()
        );
        // The cursor in the middle of the line: only what is before it counts.
        let line = "list_files te extra";
        let (start, c) = complete(line, 13, &data(), &NoFs);
        assert_eq!(start, 11);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn local_paths_for_upload_and_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("report.pdf"), b"x").unwrap();
        std::fs::write(root.join("my notes.txt"), b"x").unwrap();
        std::fs::write(root.join(".hidden"), b"x").unwrap();
        std::fs::create_dir(root.join("reports")).unwrap();
        std::fs::create_dir(root.join("my dir")).unwrap();
        let dir = format!("{}/", root.display());
        assert!(!dir.contains(' ') && !dir.contains('"'));

        let (start, got) = at_end(&format!("upload_file {dir}rep"), &RealDirs);
        assert_eq!(start, 12);
        assert_eq!(got, [format!("{dir}report.pdf "), format!("{dir}reports/")]);
        let (_, got) = at_end(&format!("upload_file {dir}my"), &RealDirs);
        assert_eq!(
            got,
            [format!("\"{dir}my dir/"), format!("\"{dir}my notes.txt\" ")]
        );
        // Into a quoted directory.
        let (_, got) = at_end(&format!("upload_file \"{dir}my dir/"), &RealDirs);
        assert!(got.is_empty());
        std::fs::write(root.join("my dir/inner file"), b"x").unwrap();
        let (_, got) = at_end(&format!("upload_file \"{dir}my dir/"), &RealDirs);
        assert_eq!(got, [format!("\"{dir}my dir/inner file\" ")]);
        // Hidden entries only when asked for.
        let (_, got) = at_end(&format!("upload_file {dir}"), &RealDirs);
        assert_eq!(got.len(), 4);
        let (_, got) = at_end(&format!("upload_file {dir}.h"), &RealDirs);
        assert_eq!(got, [format!("{dir}.hidden ")]);
        // A destination is a directory.
        let (start, got) = at_end(&format!("download_file team notes.txt {dir}"), &RealDirs);
        assert_eq!(start, 29);
        assert_eq!(got, [format!("\"{dir}my dir/"), format!("{dir}reports/")]);
        // The group id argument of upload_file is a group.
        assert_eq!(
            at_end(&format!("upload_file {dir}report.pdf te"), &RealDirs).1,
            ["tea ", "team "]
        );
    }
}
