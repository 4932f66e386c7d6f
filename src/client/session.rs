//! The client's command-loop core: command lines in, tracker requests and printed results out.
//!
//! [`ClientCore`] runs one command at a time. It parses the line, checks what can be checked
//! locally (arguments, being logged in, the file to upload), asks the driver to hash a file or
//! to send a request, and turns the tracker's reply into the lines the user sees. It does no
//! IO and reads no clock: the driver passes `now` and performs the [`Output`]s.
//!
//! Every failed command produces exactly one [`Output::Fail`], which the driver prints as one
//! `error: ` line; the core counts them for the exit status.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::command::{parse_line, Command};
use crate::hasher::{FileHashes, HashDone};
use crate::wire::tracker_link::{FileMeta, Relation, Reply, ReplyBody, Request, RequestBody};
use crate::wire::{FileName, GroupId, UserId, PIECE_LEN};

/// How long a command waits for the tracker's answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A result line for stdout.
    Print(String),
    /// A failure: printed as `error: <reason>` on stderr.
    Fail(String),
    /// A request for the tracker.
    Send(Request),
    /// Hash this file on the worker pool and call `handle_hashed` with the job id.
    HashFile { job: u64, path: PathBuf },
    /// The user asked to quit.
    Quit,
}

/// A file this client shares, kept so that it can be served (and resumed at the next login).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalShare {
    pub user: UserId,
    pub group: GroupId,
    pub name: FileName,
    pub path: PathBuf,
    pub meta: FileMeta,
}

/// The command in progress.
#[derive(Debug)]
enum Pending {
    /// Hashing a file before registering it.
    Hashing {
        job: u64,
        group: GroupId,
        name: FileName,
        path: PathBuf,
    },
    /// Waiting for the tracker's reply to `req_id`.
    Awaiting {
        req_id: u64,
        cmd: Sent,
        deadline: Instant,
    },
}

/// What was asked of the tracker, to interpret the reply.
#[derive(Debug)]
enum Sent {
    Cmd(Command),
    Upload {
        group: GroupId,
        path: PathBuf,
        meta: FileMeta,
    },
}

pub struct ClientCore {
    peer_addr: SocketAddr,
    next_id: u64,
    pending: Option<Pending>,
    user: Option<UserId>,
    shares: Vec<LocalShare>,
    out: VecDeque<Output>,
    n_failed: u64,
}

impl ClientCore {
    /// `peer_addr` is where this client listens for peers; it is sent at login.
    pub fn new(peer_addr: SocketAddr) -> Self {
        ClientCore {
            peer_addr,
            next_id: 0,
            pending: None,
            user: None,
            shares: Vec::new(),
            out: VecDeque::new(),
            n_failed: 0,
        }
    }

    /// A command is in progress; the next line must wait.
    pub fn is_busy(&self) -> bool {
        self.pending.is_some()
    }

    /// How many commands failed so far.
    pub fn n_failed(&self) -> u64 {
        self.n_failed
    }

    pub fn logged_in_user(&self) -> Option<&UserId> {
        self.user.as_ref()
    }

    /// Files this client shares (for every user who shared from it).
    pub fn shares(&self) -> &[LocalShare] {
        &self.shares
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When `handle_timeout` next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.pending {
            Some(Pending::Awaiting { deadline, .. }) => Some(*deadline),
            _ => None,
        }
    }

    fn fail(&mut self, reason: impl Into<String>) {
        self.n_failed += 1;
        self.out.push_back(Output::Fail(reason.into()));
    }

    fn print(&mut self, line: impl Into<String>) {
        self.out.push_back(Output::Print(line.into()));
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Records a failure that happened outside any command (a download, for example), so
    /// that it counts for the exit status.
    pub fn record_failure(&mut self) {
        self.n_failed += 1;
    }

    /// One line of input. Must not be called while [`is_busy`](Self::is_busy).
    pub fn handle_line(&mut self, line: &str, now: Instant) {
        debug_assert!(!self.is_busy());
        match parse_line(line) {
            Ok(None) => {}
            Ok(Some(cmd)) => self.start(cmd, now),
            Err(e) => self.fail(e.to_string()),
        }
    }

    fn start(&mut self, cmd: Command, now: Instant) {
        let needs_session = !matches!(
            cmd,
            Command::CreateUser { .. }
                | Command::Login { .. }
                | Command::ShowDownloads
                | Command::Quit
        );
        if needs_session && self.user.is_none() {
            return self.fail("not logged in");
        }
        let body = match &cmd {
            Command::Quit => return self.out.push_back(Output::Quit),
            Command::ShowDownloads => return,
            Command::DownloadFile { .. } => {
                return self.fail("download_file is not supported by this build yet")
            }
            Command::UploadFile { path, group } => return self.start_upload(path, group),
            Command::CreateUser { user, password } => RequestBody::CreateUser {
                user: user.clone(),
                password: password.clone(),
            },
            Command::Login { user, password } => {
                if let Some(current) = &self.user {
                    return self.fail(format!(
                        "a session is already open on this client (logged in as {current})"
                    ));
                }
                RequestBody::Login {
                    user: user.clone(),
                    password: password.clone(),
                    peer_addr: self.peer_addr,
                }
            }
            Command::Logout => RequestBody::Logout,
            Command::CreateGroup { group } => RequestBody::CreateGroup {
                group: group.clone(),
            },
            Command::JoinGroup { group } => RequestBody::JoinGroup {
                group: group.clone(),
            },
            Command::LeaveGroup { group } => RequestBody::LeaveGroup {
                group: group.clone(),
            },
            Command::ListRequests { group } => RequestBody::ListRequests {
                group: group.clone(),
            },
            Command::AcceptRequest { group, user } => RequestBody::AcceptRequest {
                group: group.clone(),
                user: user.clone(),
            },
            Command::RejectRequest { group, user } => RequestBody::RejectRequest {
                group: group.clone(),
                user: user.clone(),
            },
            Command::ListGroups => RequestBody::ListGroups,
            Command::ListFiles { group } => RequestBody::ListFiles {
                group: group.clone(),
            },
            Command::StopShare { group, name } => RequestBody::StopShare {
                group: group.clone(),
                name: name.clone(),
            },
        };
        self.send(body, Sent::Cmd(cmd), now);
    }

    fn send(&mut self, body: RequestBody, cmd: Sent, now: Instant) {
        let req_id = self.next_id();
        self.pending = Some(Pending::Awaiting {
            req_id,
            cmd,
            deadline: now + REPLY_TIMEOUT,
        });
        self.out.push_back(Output::Send(Request { req_id, body }));
    }

    fn start_upload(&mut self, path: &std::path::Path, group: &GroupId) {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => return self.fail(format!("cannot read {}: {e}", path.display())),
        };
        if !meta.is_file() {
            return self.fail(format!("{} is not a regular file", path.display()));
        }
        let name = match path.file_name().and_then(|n| n.to_str()).map(FileName::new) {
            Some(Ok(name)) => name,
            Some(Err(e)) => return self.fail(format!("invalid file name: {e}")),
            None => return self.fail(format!("{} has no usable file name", path.display())),
        };
        // Serve from an absolute path, whatever the working directory becomes.
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let job = self.next_id();
        self.pending = Some(Pending::Hashing {
            job,
            group: group.clone(),
            name,
            path: path.clone(),
        });
        self.out.push_back(Output::HashFile { job, path });
    }

    /// The hasher finished job `done.job`.
    pub fn handle_hashed(&mut self, done: HashDone, now: Instant) {
        let Some(Pending::Hashing { job, .. }) = &self.pending else {
            return;
        };
        if *job != done.job {
            return;
        }
        let Some(Pending::Hashing {
            group, name, path, ..
        }) = self.pending.take()
        else {
            return;
        };
        let hashes: FileHashes = match done.result {
            Ok(h) => h,
            Err(e) => return self.fail(e),
        };
        if self.user.is_none() {
            // The session ended (the tracker link broke) while the file was being hashed.
            return self.fail("not logged in");
        }
        let meta = FileMeta {
            name,
            size: hashes.size,
            piece_len: PIECE_LEN,
            file_sha1: hashes.file_sha1,
            piece_hashes: hashes.piece_hashes,
        };
        self.send(
            RequestBody::UploadFile {
                group: group.clone(),
                meta: meta.clone(),
            },
            Sent::Upload { group, path, meta },
            now,
        );
    }

    /// The request could not be sent: no tracker answered.
    pub fn handle_send_failed(&mut self, reason: &str) {
        if matches!(self.pending, Some(Pending::Awaiting { .. })) {
            self.pending = None;
            self.fail(reason.to_owned());
        }
    }

    /// The tracker connection broke. The tracker ends the session of a lost connection, so
    /// the client is logged out too.
    pub fn handle_tracker_lost(&mut self) {
        self.user = None;
        if matches!(self.pending, Some(Pending::Awaiting { .. })) {
            self.pending = None;
            self.fail("lost the connection to the tracker");
        }
    }

    /// Fails a command whose answer is overdue.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(Pending::Awaiting { deadline, .. }) = &self.pending {
            if *deadline <= now {
                self.pending = None;
                self.fail("the tracker did not answer in time");
            }
        }
    }

    /// A reply from the tracker.
    pub fn handle_reply(&mut self, reply: Reply) {
        let Some(Pending::Awaiting { req_id, .. }) = &self.pending else {
            return;
        };
        if *req_id != reply.req_id {
            return;
        }
        let Some(Pending::Awaiting { cmd, .. }) = self.pending.take() else {
            return;
        };
        match reply.body {
            ReplyBody::Refused { message, .. } => self.fail(message),
            body => self.report(cmd, body),
        }
    }

    /// Prints the result of a successful command.
    fn report(&mut self, cmd: Sent, body: ReplyBody) {
        let cmd = match cmd {
            Sent::Upload { group, path, meta } => {
                let user = self.user.clone();
                let Some(user) = user else {
                    return self.fail("not logged in");
                };
                let line = match body {
                    ReplyBody::Shared { new_file: true } => format!(
                        "uploaded {} to group {group} ({} bytes, {} pieces)",
                        meta.name,
                        meta.size,
                        meta.piece_hashes.len()
                    ),
                    _ => format!(
                        "sharing {} in group {group} (same content as the file already there)",
                        meta.name
                    ),
                };
                self.shares
                    .retain(|s| !(s.user == user && s.group == group && s.name == meta.name));
                self.shares.push(LocalShare {
                    user,
                    group,
                    name: meta.name.clone(),
                    path,
                    meta,
                });
                return self.print(line);
            }
            Sent::Cmd(cmd) => cmd,
        };
        match (cmd, body) {
            (Command::CreateUser { user, .. }, _) => self.print(format!("user {user} created")),
            (Command::Login { user, .. }, ReplyBody::LoggedIn { .. }) => {
                let resumed = self.shares.iter().filter(|s| s.user == user).count();
                self.user = Some(user.clone());
                if resumed > 0 {
                    self.print(format!(
                        "logged in as {user} ({resumed} shared files resumed)"
                    ));
                } else {
                    self.print(format!("logged in as {user}"));
                }
            }
            (Command::Logout, _) => {
                if let Some(user) = self.user.take() {
                    self.print(format!("logged out {user}"));
                }
            }
            (Command::CreateGroup { group }, _) => self.print(format!("group {group} created")),
            (Command::JoinGroup { group }, _) => {
                self.print(format!("request to join group {group} sent"))
            }
            (Command::LeaveGroup { group }, _) => {
                if let Some(user) = &self.user {
                    let user = user.clone();
                    self.shares
                        .retain(|s| !(s.user == user && s.group == group));
                }
                self.print(format!("left group {group}"))
            }
            (Command::AcceptRequest { group, user }, _) => {
                self.print(format!("{user} accepted into group {group}"))
            }
            (Command::RejectRequest { group, user }, _) => {
                self.print(format!("request of {user} to join group {group} rejected"))
            }
            (Command::ListRequests { .. }, ReplyBody::Users(users)) => {
                for u in users {
                    self.print(u.to_string());
                }
            }
            (Command::ListGroups, ReplyBody::Groups(groups)) => {
                for g in groups {
                    let relation = match g.relation {
                        Relation::Owner => "owner",
                        Relation::Member => "member",
                        Relation::Requested => "requested",
                        Relation::None => "-",
                    };
                    self.print(format!(
                        "{}\towner={}\tmembers={}\tyou={relation}",
                        g.group, g.owner, g.n_members
                    ));
                }
            }
            (Command::ListFiles { .. }, ReplyBody::Files(files)) => {
                for f in files {
                    self.print(format!(
                        "{}\t{}\t{}\t{}\t{}",
                        f.name, f.size, f.n_online, f.n_sharers, f.file_sha1
                    ));
                }
            }
            (Command::StopShare { group, name }, _) => {
                if let Some(user) = &self.user {
                    let user = user.clone();
                    self.shares
                        .retain(|s| !(s.user == user && s.group == group && s.name == name));
                }
                self.print(format!("stopped sharing {name} in group {group}"))
            }
            (cmd, body) => self.fail(format!(
                "unexpected answer from the tracker to {cmd:?}: {body:?}"
            )),
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
