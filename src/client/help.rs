//! The client's commands described for people: the `help` command, the command list in
//! `client_program --help`, and what each argument is (which the shell's completion uses).
//!
//! One table, [`COMMANDS`], in the order the README lists them. Pure text; no IO.

/// What an argument holds, for completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// An id the user makes up (a new user or group): nothing to complete.
    NewId,
    /// A password: nothing to complete, and the line never goes to history.
    Password,
    /// A user id.
    User,
    /// A group id the client has seen in a listing.
    Group,
    /// A file on this machine (to share).
    LocalFile,
    /// Where a download goes on this machine (an existing directory, or a new file in one).
    Destination,
    /// The name of a file shared in the group named by the first argument.
    GroupFile,
    /// A command name.
    Command,
}

/// One command, as `help` shows it.
#[derive(Debug, Clone, Copy)]
pub struct CommandHelp {
    pub name: &'static str,
    /// The arguments as the usage line shows them (`<group_id> <file_name>`).
    pub args: &'static str,
    pub arg_kinds: &'static [ArgKind],
    /// One line: what it does.
    pub summary: &'static str,
    /// More lines for `help <command>`.
    pub details: &'static str,
}

impl CommandHelp {
    /// `name args`, as in the usage line.
    pub fn synopsis(&self) -> String {
        if self.args.is_empty() {
            self.name.to_owned()
        } else {
            format!("{} {}", self.name, self.args)
        }
    }
}

use ArgKind::*;

/// Every command of the command loop.
pub const COMMANDS: &[CommandHelp] = &[
    CommandHelp {
        name: "create_user",
        args: "<user_id> <passwd>",
        arg_kinds: &[NewId, Password],
        summary: "create an account",
        details: "Fails if the user id is taken. Ids are 1-64 bytes without white space.\n\
                  The line is never written to the shell history.",
    },
    CommandHelp {
        name: "login",
        args: "<user_id> <passwd>",
        arg_kinds: &[User, Password],
        summary: "start a session on this client",
        details: "Fails on a wrong password, an unknown user, a session already open on this\n\
                  client, or the user logged in on another live client. The files this user\n\
                  shared from this client are shared again (after a restart too, once checked\n\
                  unchanged), and the user's unfinished downloads go on. The line is never\n\
                  written to the shell history.",
    },
    CommandHelp {
        name: "logout",
        args: "",
        arg_kinds: &[],
        summary: "end the session; your shares pause",
        details: "The shares come back when the same user logs in on this client again.",
    },
    CommandHelp {
        name: "create_group",
        args: "<group_id>",
        arg_kinds: &[NewId],
        summary: "create a group that you own",
        details: "Fails if the group id is taken.",
    },
    CommandHelp {
        name: "join_group",
        args: "<group_id>",
        arg_kinds: &[Group],
        summary: "ask to join a group",
        details: "The owner sees the request with list_requests and answers with\n\
                  accept_request or reject_request.",
    },
    CommandHelp {
        name: "leave_group",
        args: "<group_id>",
        arg_kinds: &[Group],
        summary: "leave a group; your shares in it end",
        details: "An owner who leaves hands the group to the longest-standing member; a group\n\
                  left with no members is deleted.",
    },
    CommandHelp {
        name: "list_requests",
        args: "<group_id>",
        arg_kinds: &[Group],
        summary: "requests to join a group you own",
        details: "One user id per line; nothing when there is none.",
    },
    CommandHelp {
        name: "accept_request",
        args: "<group_id> <user_id>",
        arg_kinds: &[Group, User],
        summary: "let a user into a group you own",
        details: "Fails if that user has no pending request.",
    },
    CommandHelp {
        name: "reject_request",
        args: "<group_id> <user_id>",
        arg_kinds: &[Group, User],
        summary: "turn a request down",
        details: "",
    },
    CommandHelp {
        name: "list_groups",
        args: "",
        arg_kinds: &[],
        summary: "every group, its owner and members",
        details: "Piped or redirected, one line per group, sorted:\n\
                  group_id<TAB>owner=<user><TAB>members=<n><TAB>you=owner|member|requested|-\n\
                  At a terminal, aligned columns with a header.",
    },
    CommandHelp {
        name: "list_files",
        args: "<group_id>",
        arg_kinds: &[Group],
        summary: "the files shared in a group",
        details: "Piped or redirected, one line per file, sorted by name:\n\
                  name<TAB>size<TAB>online<TAB>sharers<TAB>sha1\n\
                  (online = sharers logged in now). At a terminal, aligned columns with a\n\
                  header and sizes such as 1.4 MiB.",
    },
    CommandHelp {
        name: "upload_file",
        args: "<file_path> <group_id>",
        arg_kinds: &[LocalFile, Group],
        summary: "share a file of this machine",
        details: "The file is shared under its base name and served from where it is; it is\n\
                  split into 512 KiB pieces whose SHA1 digests go to the tracker. Quote a\n\
                  path with spaces: upload_file \"my file.txt\" team",
    },
    CommandHelp {
        name: "download_file",
        args: "<group_id> <file_name> <destination_path>",
        arg_kinds: &[Group, GroupFile, Destination],
        summary: "fetch a file, in the background",
        details: "A destination that is a directory or ends with / gets the file under its\n\
                  own name. Nothing is overwritten. The download runs while you type other\n\
                  commands; a line tells when it ends, and show_downloads lists them all.\n\
                  Data goes to <target>.part: one left by an interrupted download of the\n\
                  same file is resumed; any other is refused and left alone.",
    },
    CommandHelp {
        name: "show_downloads",
        args: "",
        arg_kinds: &[],
        summary: "[D] running, [C] complete, [F] failed",
        details: "At a terminal, running downloads also show percent, rate and peers.",
    },
    CommandHelp {
        name: "stop_share",
        args: "<group_id> <file_name>",
        arg_kinds: &[Group, GroupFile],
        summary: "stop sharing a file in a group",
        details: "A file nobody shares any more disappears from list_files.",
    },
    CommandHelp {
        name: "help",
        args: "[command]",
        arg_kinds: &[Command],
        summary: "list the commands, or explain one",
        details: "",
    },
    CommandHelp {
        name: "quit",
        args: "",
        arg_kinds: &[],
        summary: "leave once running downloads end",
        details: "At a terminal Ctrl-D on an empty line does the same.",
    },
];

/// The command called `name`, if there is one.
pub fn find(name: &str) -> Option<&'static CommandHelp> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Where the summaries start in [`command_list`] (a longer synopsis has its summary on the
/// next line), so that the list fits 80 columns.
const SUMMARY_COLUMN: usize = 40;

/// Every command with its summary, aligned: `  synopsis  summary`.
pub fn command_list() -> Vec<String> {
    let width = SUMMARY_COLUMN - 4;
    let mut lines = Vec::new();
    for c in COMMANDS {
        let synopsis = c.synopsis();
        if synopsis.len() > width {
            lines.push(format!("  {synopsis}"));
            lines.push(format!("  {:width$}  {}", "", c.summary));
        } else {
            lines.push(format!("  {synopsis:<width$}  {}", c.summary));
        }
    }
    lines
}

/// The lines `help` prints.
pub fn overview() -> Vec<String> {
    let mut lines = vec!["Commands (an argument in double quotes may hold spaces):".to_owned()];
    lines.extend(command_list());
    lines.push("help <command> tells more. At a terminal: Tab completes, Up/Down and".to_owned());
    lines.push("Ctrl-R search the history, Ctrl-C clears the line, Ctrl-D ends.".to_owned());
    lines
}

/// The lines `help <name>` prints, or `None` for an unknown command.
pub fn details(name: &str) -> Option<Vec<String>> {
    let c = find(name)?;
    let mut lines = vec![
        format!("usage: {}", c.synopsis()),
        format!("  {}", c.summary),
    ];
    lines.extend(
        c.details
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| format!("  {l}")),
    );
    Some(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::command::{parse_line, CommandError};

    #[test]
    fn every_usage_error_matches_the_help_synopsis() {
        // A command given too many arguments reports its usage; it must be the one help shows.
        for c in COMMANDS.iter().filter(|c| c.name != "help") {
            let line = format!("{} a b c d e", c.name);
            match parse_line(&line) {
                Err(CommandError::Usage(usage)) => assert_eq!(usage, c.synopsis(), "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn overview_lists_every_command_and_details_know_them() {
        let text = overview().join("\n");
        for line in command_list() {
            assert!(line.len() <= 79, "{line}");
        }
        for c in COMMANDS {
            assert!(text.contains(&c.synopsis()), "{}", c.name);
            let d = details(c.name).unwrap();
            for line in &d {
                assert!(line.len() <= 79, "{line}");
            }
            assert_eq!(d[0], format!("usage: {}", c.synopsis()));
        }
        assert_eq!(details("frobnicate"), None);
        assert_eq!(COMMANDS.len(), 17);
    }
}
