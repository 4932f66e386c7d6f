//! Command lines: splitting into words (with double quotes) and parsing into [`Command`]s.
//!
//! Pure functions, no IO. A parse error is the text of the `error: ` line the user sees.

use std::fmt;
use std::path::PathBuf;

use crate::wire::{FileName, GroupId, IdError, Password, UserId};

/// One command of the client's command loop (see SPEC.md for each one's meaning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    CreateUser {
        user: UserId,
        password: Password,
    },
    Login {
        user: UserId,
        password: Password,
    },
    CreateGroup {
        group: GroupId,
    },
    JoinGroup {
        group: GroupId,
    },
    LeaveGroup {
        group: GroupId,
    },
    ListRequests {
        group: GroupId,
    },
    AcceptRequest {
        group: GroupId,
        user: UserId,
    },
    RejectRequest {
        group: GroupId,
        user: UserId,
    },
    ListGroups,
    ListFiles {
        group: GroupId,
    },
    UploadFile {
        path: PathBuf,
        group: GroupId,
    },
    DownloadFile {
        group: GroupId,
        name: FileName,
        destination: PathBuf,
    },
    ShowDownloads,
    StopShare {
        group: GroupId,
        name: FileName,
    },
    Logout,
    /// `help` (no topic) or `help <command>`.
    Help {
        topic: Option<String>,
    },
    Quit,
}

/// Why a line is not a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    UnterminatedQuote,
    Unknown(String),
    Usage(&'static str),
    BadArg { what: &'static str, err: IdError },
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::UnterminatedQuote => write!(f, "unterminated double quote"),
            CommandError::Unknown(name) => write!(f, "unknown command '{name}'"),
            CommandError::Usage(usage) => write!(f, "usage: {usage}"),
            CommandError::BadArg { what, err } => write!(f, "invalid {what}: {err}"),
        }
    }
}

impl std::error::Error for CommandError {}

/// Splits a line into words separated by white space. A double-quoted stretch keeps its white
/// space (`"my file.txt"`); inside quotes `\"` and `\\` stand for `"` and `\`.
pub fn split_words(line: &str) -> Result<Vec<String>, CommandError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        None => return Err(CommandError::UnterminatedQuote),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(e @ ('"' | '\\')) => word.push(e),
                            Some(other) => {
                                word.push('\\');
                                word.push(other);
                            }
                            None => return Err(CommandError::UnterminatedQuote),
                        },
                        Some(other) => word.push(other),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

fn user(s: &str) -> Result<UserId, CommandError> {
    UserId::new(s).map_err(|err| CommandError::BadArg {
        what: "user id",
        err,
    })
}

fn group(s: &str) -> Result<GroupId, CommandError> {
    GroupId::new(s).map_err(|err| CommandError::BadArg {
        what: "group id",
        err,
    })
}

fn file_name(s: &str) -> Result<FileName, CommandError> {
    FileName::new(s).map_err(|err| CommandError::BadArg {
        what: "file name",
        err,
    })
}

fn password(s: &str) -> Result<Password, CommandError> {
    Password::new(s.as_bytes()).map_err(|err| CommandError::BadArg {
        what: "password",
        err,
    })
}

/// Parses one input line. Blank lines and lines starting with `#` give `Ok(None)`.
pub fn parse_line(line: &str) -> Result<Option<Command>, CommandError> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    let words = split_words(trimmed)?;
    let Some((name, args)) = words.split_first() else {
        return Ok(None);
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cmd = match (name.as_str(), args.as_slice()) {
        ("create_user", [u, p]) => Command::CreateUser {
            user: user(u)?,
            password: password(p)?,
        },
        ("create_user", _) => return Err(CommandError::Usage("create_user <user_id> <passwd>")),
        ("login", [u, p]) => Command::Login {
            user: user(u)?,
            password: password(p)?,
        },
        ("login", _) => return Err(CommandError::Usage("login <user_id> <passwd>")),
        ("create_group", [g]) => Command::CreateGroup { group: group(g)? },
        ("create_group", _) => return Err(CommandError::Usage("create_group <group_id>")),
        ("join_group", [g]) => Command::JoinGroup { group: group(g)? },
        ("join_group", _) => return Err(CommandError::Usage("join_group <group_id>")),
        ("leave_group", [g]) => Command::LeaveGroup { group: group(g)? },
        ("leave_group", _) => return Err(CommandError::Usage("leave_group <group_id>")),
        ("list_requests", [g]) => Command::ListRequests { group: group(g)? },
        ("list_requests", _) => return Err(CommandError::Usage("list_requests <group_id>")),
        ("accept_request", [g, u]) => Command::AcceptRequest {
            group: group(g)?,
            user: user(u)?,
        },
        ("accept_request", _) => {
            return Err(CommandError::Usage("accept_request <group_id> <user_id>"))
        }
        ("reject_request", [g, u]) => Command::RejectRequest {
            group: group(g)?,
            user: user(u)?,
        },
        ("reject_request", _) => {
            return Err(CommandError::Usage("reject_request <group_id> <user_id>"))
        }
        ("list_groups", []) => Command::ListGroups,
        ("list_groups", _) => return Err(CommandError::Usage("list_groups")),
        ("list_files", [g]) => Command::ListFiles { group: group(g)? },
        ("list_files", _) => return Err(CommandError::Usage("list_files <group_id>")),
        ("upload_file", [p, g]) if !p.is_empty() => Command::UploadFile {
            path: PathBuf::from(p),
            group: group(g)?,
        },
        ("upload_file", _) => {
            return Err(CommandError::Usage("upload_file <file_path> <group_id>"))
        }
        ("download_file", [g, f, d]) if !d.is_empty() => Command::DownloadFile {
            group: group(g)?,
            name: file_name(f)?,
            destination: PathBuf::from(d),
        },
        ("download_file", _) => {
            return Err(CommandError::Usage(
                "download_file <group_id> <file_name> <destination_path>",
            ))
        }
        ("show_downloads", []) => Command::ShowDownloads,
        ("show_downloads", _) => return Err(CommandError::Usage("show_downloads")),
        ("stop_share", [g, f]) => Command::StopShare {
            group: group(g)?,
            name: file_name(f)?,
        },
        ("stop_share", _) => return Err(CommandError::Usage("stop_share <group_id> <file_name>")),
        ("logout", []) => Command::Logout,
        ("logout", _) => return Err(CommandError::Usage("logout")),
        ("help", []) => Command::Help { topic: None },
        ("help", [topic]) => Command::Help {
            topic: Some((*topic).to_owned()),
        },
        ("help", _) => return Err(CommandError::Usage("help [command]")),
        ("quit", []) => Command::Quit,
        ("quit", _) => return Err(CommandError::Usage("quit")),
        (other, _) => return Err(CommandError::Unknown(other.to_owned())),
    };
    Ok(Some(cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_quotes() {
        assert_eq!(split_words("  a  b\tc ").unwrap(), ["a", "b", "c"]);
        assert_eq!(
            split_words(r#"upload_file "my file.txt" g1"#).unwrap(),
            ["upload_file", "my file.txt", "g1"]
        );
        assert_eq!(split_words(r#""""#).unwrap(), [""]);
        assert_eq!(split_words(r#"a"b c"d"#).unwrap(), ["ab cd"]);
        assert_eq!(
            split_words(r#""say \"hi\" \\ \n""#).unwrap(),
            [r#"say "hi" \ \n"#]
        );
        assert_eq!(split_words(r#"a "b"#), Err(CommandError::UnterminatedQuote));
        assert!(split_words("").unwrap().is_empty());
    }

    #[test]
    fn blank_and_comment_lines() {
        assert_eq!(parse_line("").unwrap(), None);
        assert_eq!(parse_line("   ").unwrap(), None);
        assert_eq!(parse_line("# create_user a b").unwrap(), None);
        assert_eq!(parse_line("  # x").unwrap(), None);
    }

    #[test]
    fn every_command_parses() {
        let ok = [
            "create_user alice pw",
            "login alice pw",
            "create_group g",
            "join_group g",
            "leave_group g",
            "list_requests g",
            "accept_request g bob",
            "reject_request g bob",
            "list_groups",
            "list_files g",
            "upload_file /tmp/x g",
            "download_file g x /tmp/",
            "show_downloads",
            "stop_share g x",
            "logout",
            "help",
            "help list_files",
            "quit",
        ];
        for line in ok {
            assert!(parse_line(line).unwrap().is_some(), "{line}");
        }
    }

    #[test]
    fn wrong_argument_counts_are_usage_errors() {
        for line in [
            "create_user alice",
            "login",
            "create_group",
            "create_group a b",
            "list_groups x",
            "upload_file only_path",
            "download_file g x",
            "logout now",
            "quit now",
            "help a b",
        ] {
            assert!(
                matches!(parse_line(line), Err(CommandError::Usage(_))),
                "{line}"
            );
        }
    }

    #[test]
    fn bad_ids_and_unknown_commands() {
        assert_eq!(
            parse_line("frobnicate"),
            Err(CommandError::Unknown("frobnicate".into()))
        );
        assert!(matches!(
            parse_line(&format!("create_group {}", "g".repeat(65))),
            Err(CommandError::BadArg {
                what: "group id",
                ..
            })
        ));
        assert!(matches!(
            parse_line(r#"create_user "a b" pw"#),
            Err(CommandError::BadArg {
                what: "user id",
                ..
            })
        ));
        assert!(matches!(
            parse_line("stop_share g a/b"),
            Err(CommandError::BadArg {
                what: "file name",
                ..
            })
        ));
        assert!(matches!(
            parse_line("download_file g .. /tmp"),
            Err(CommandError::BadArg {
                what: "file name",
                ..
            })
        ));
    }

    #[test]
    fn quoted_file_names() {
        assert_eq!(
            parse_line(r#"stop_share g "my file.txt""#).unwrap(),
            Some(Command::StopShare {
                group: GroupId::new("g").unwrap(),
                name: FileName::new("my file.txt").unwrap()
            })
        );
    }
}
