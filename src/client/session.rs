//! The client's command-loop core: command lines in, tracker requests and printed results out.
//!
//! [`ClientCore`] runs one command at a time. It parses the line, checks what can be checked
//! locally (arguments, being logged in, the file to upload), asks the driver to hash a file or
//! to send a request, and turns the tracker's reply into the lines the user sees. It does no
//! IO and reads no clock: the driver passes `now` and performs the [`Output`]s.
//!
//! Every failed command produces exactly one [`Output::Fail`], which the driver prints as one
//! `error: ` line; the core counts them for the exit status.
//!
//! Failover: the core keeps every request in flight and the session token from the login.
//! When the driver connects to another tracker (its tracker died), it sends
//! [`ClientCore::requests_for_new_link`]: a `Resume` with the token, then every request in
//! flight again with its original id, which the trackers recognise, so nothing is applied
//! twice. After the resume the core announces its shares again.
//!
//! Restarts: the driver hands the core what the state file remembers ([`ClientCore::restore`])
//! and saves [`ClientCore::saved_state`] whenever [`ClientCore::take_state_dirty`] says it
//! changed. Before a login is sent, the core has the driver look at that user's shared files
//! ([`Output::CheckShares`]): one whose size and modification time are unchanged is served
//! again at once, one whose size still fits is hashed again on the pool before it is, and the
//! rest are dropped with a warning. The login carries the shares this client holds
//! ([`RequestBody::Login`]), so the tracker never lists one it lost as online; once it is
//! answered, the user's remembered downloads start again by themselves.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::command::{parse_line, Command};
use super::disk::{Inspect, Inspected, PathError};
pub use super::download::engine::GiveUp;
use super::listing::Listings;
use super::outcome::{Completed, SharersError, Started};
use super::state_file::{
    ClientState, FileStamp, SavedDownload, SavedShare, MAX_DOWNLOADS_PER_USER, MAX_SHARES_PER_USER,
    MAX_STATE_LEN, MAX_USERS,
};
use crate::hasher::{FileHashes, HashDone, JobId};
use crate::wire::ticket::Ticket;
use crate::wire::tracker_link::{FileMeta, Listing, Reply, ReplyBody, Request, RequestBody};
use crate::wire::{FileName, GroupId, Password, Sha1Digest, UserId, PIECE_LEN};

/// How long a command waits for the tracker's answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Items of one listing gathered from its parts before it is printed, at most.
pub const MAX_LISTED: usize = 1_000_000;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A result line for stdout.
    Print(String),
    /// A failure: printed as `error: <reason>` on stderr.
    Fail(String),
    /// A request for the tracker.
    Send(Request),
    /// Look at the file system and call `handle_inspected` with [`inspect`](super::disk::inspect)'s answer
    /// (the command waits for it).
    Inspect(Inspect),
    /// Hash this file on the worker pool and call `handle_hashed` with the job id.
    HashFile { job: JobId, path: PathBuf },
    /// The user asked to quit.
    Quit,
    /// Start download `id` of `meta` from the sharers at `peers` into `target` (through
    /// `<target>.part`), then call `handle_download_started`.
    StartDownload {
        id: DownloadId,
        group: GroupId,
        meta: FileMeta,
        peers: Vec<SocketAddr>,
        target: PathBuf,
    },
    /// The tracker's ticket for download `download` (before the download starts, and each
    /// time it is renewed): sharers serve only with it.
    Ticket {
        download: DownloadId,
        ticket: Ticket,
        /// The identity key of each sharer the tracker named with it.
        peer_keys: Vec<(SocketAddr, [u8; 32])>,
    },
    /// The tracker's answer to `query_sharers` for download `download`.
    Sharers {
        download: DownloadId,
        result: Result<Vec<SocketAddr>, SharersError>,
    },
    /// Print `show_downloads` (the driver adds live progress on a terminal).
    ShowDownloads,
    /// The set of files this client may serve changed (login, logout, stop_share,
    /// leave_group): links serving what is no longer shared must close.
    SharesChanged,
    /// The user of these running downloads left their group: stop them (an honest client
    /// does not keep fetching what its user may no longer have), each ending with
    /// [`DownloadError::LeftGroup`].
    StopDownloads { downloads: Vec<DownloadId> },
    /// A user logged in: read the stamp of each of these shared files and call
    /// `handle_shares_checked` with them, in the same order.
    CheckShares { shares: Vec<LocalShare> },
}

/// Names a download of this client (in `show_downloads` order: ids grow). Its hash jobs (piece
/// checks, whole-file digest) carry [`DownloadId::job`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DownloadId(pub u64);

impl DownloadId {
    /// The hasher job id of this download's piece checks and whole-file digest.
    pub fn job(self) -> JobId {
        JobId(self.0)
    }

    /// The download a hash job of [`job`](Self::job) belongs to.
    pub fn of_job(job: JobId) -> Self {
        DownloadId(job.0)
    }
}

impl std::fmt::Display for DownloadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "download {}", self.0)
    }
}

/// Why a running download failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadError {
    /// The download engine gave up (no trusted peer holds a missing piece), with its reason.
    Engine(GiveUp),
    /// Every piece verified, but the whole file's SHA1 is not the tracker's.
    FileDigest { got: Sha1Digest, want: Sha1Digest },
    /// The verified file could not be linked to its target; the data stays in `part`.
    Link {
        target: PathBuf,
        part: PathBuf,
        reason: String,
    },
    /// The client is exiting (SIGINT or SIGTERM); the download resumes at the next run.
    Exiting,
    /// The download's user left the file's group (its `.part` is removed).
    LeftGroup,
}

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownloadError::Engine(reason) => reason.fmt(f),
            DownloadError::FileDigest { got, want } => {
                write!(f, "the whole file's SHA1 is {got}, the tracker says {want}")
            }
            DownloadError::Link {
                target,
                part,
                reason,
            } => write!(
                f,
                "cannot create {}: {reason} (the data is in {})",
                target.display(),
                part.display()
            ),
            DownloadError::Exiting => f.write_str("the client is exiting"),
            DownloadError::LeftGroup => f.write_str("its user left the group"),
        }
    }
}

/// Why the driver could not start a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// The target exists (it appeared after the command checked it): nothing is overwritten.
    TargetExists(PathBuf),
    /// `<target>.part` exists and is not a download of this content by this program: it is
    /// left untouched.
    ForeignPart { path: PathBuf, reason: String },
    /// `<target>.part` could not be created and mapped.
    CreatePart { path: PathBuf, reason: String },
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::TargetExists(path) => write!(f, "{} already exists", path.display()),
            StartError::ForeignPart { path, reason } => write!(
                f,
                "{} exists and {reason}; it is left untouched (move it away to download here)",
                path.display()
            ),
            StartError::CreatePart { path, reason } => {
                write!(f, "cannot create {}: {reason}", path.display())
            }
        }
    }
}

/// Where a download of this client stands, for `show_downloads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadStatus {
    Running,
    Complete,
    Failed,
}

/// A download this client started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadEntry {
    pub id: DownloadId,
    pub user: UserId,
    pub group: GroupId,
    pub name: FileName,
    pub target: PathBuf,
    pub meta: FileMeta,
    pub status: DownloadStatus,
    /// The first piece verified: the download should be registered as a share.
    pub wants_share: bool,
    /// Registered with the tracker (or being registered).
    pub registering: bool,
    /// The tracker confirmed the registration.
    pub registered: bool,
    /// The download failed after its registration while its user was not logged in here: the
    /// registration is withdrawn at the user's next login.
    pub withdraw_due: bool,
}

impl DownloadEntry {
    /// The share the download's target is (once it holds verified pieces): no stamp yet, the
    /// file being written.
    fn share(&self) -> LocalShare {
        LocalShare {
            user: self.user.clone(),
            group: self.group.clone(),
            name: self.name.clone(),
            path: self.target.clone(),
            meta: self.meta.clone(),
            stamp: None,
        }
    }
}

/// A request sent on the side, while commands go on.
#[derive(Debug, Clone)]
enum Background {
    /// Registering a download as a share.
    Register { download: DownloadId },
    /// Asking for a download's sharers.
    Sharers { download: DownloadId },
    /// Taking the session over on a new tracker link.
    Resume,
    /// Announcing a share again after a resume.
    Reannounce,
    /// Withdrawing the share of a download that failed after it was registered.
    Withdraw,
    /// Announcing a remembered share whose file was verified again after a restart.
    Rechecked,
    /// Asking for the sharers of a remembered download, to continue it.
    ResumeDownload { user: UserId, saved: SavedDownload },
}

/// A file this client shares, kept so that it can be served (and resumed at the next login).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalShare {
    pub user: UserId,
    pub group: GroupId,
    pub name: FileName,
    pub path: PathBuf,
    pub meta: FileMeta,
    /// Size and modification time of the file when it was hashed (`None`: unknown, so it is
    /// hashed again before it is served after a restart).
    pub stamp: Option<FileStamp>,
}

/// What a command would add to the state file.
#[derive(Clone, Copy)]
enum Remember<'a> {
    Share(&'a GroupId, &'a FileName),
    Download,
}

/// The command in progress.
#[derive(Debug)]
enum Pending {
    /// Hashing a file before registering it.
    Hashing {
        job: JobId,
        group: GroupId,
        name: FileName,
        path: PathBuf,
        stamp: FileStamp,
    },
    /// A login waits for `handle_shares_checked` before it is sent (it carries the shares
    /// this client holds for `user`).
    CheckingShares { user: UserId, password: Password },
    /// Waiting for the driver's answer to an [`Output::Inspect`] for `cmd`.
    Inspecting { cmd: Command },
    /// Waiting for the driver to start download `id`.
    Starting { id: DownloadId },
    /// Waiting for the tracker's reply to `request`.
    Awaiting {
        /// Boxed: a request (a login with its shares and key, say) is large beside the other
        /// variants.
        request: Box<Request>,
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
        stamp: FileStamp,
    },
    /// A login carrying `shares` (the user's shares this client holds), `resumed` of them
    /// kept from before a restart.
    Login {
        user: UserId,
        shares: Vec<(GroupId, FileName)>,
        resumed: usize,
    },
    Download {
        group: GroupId,
        name: FileName,
        target: PathBuf,
    },
}

pub struct ClientCore {
    peer_addr: SocketAddr,
    next_id: u64,
    pending: Option<Pending>,
    user: Option<UserId>,
    /// The session's token, to resume it through another tracker.
    token: Option<[u8; 16]>,
    shares: Vec<LocalShare>,
    downloads: Vec<DownloadEntry>,
    /// Requests in flight on the side, by id.
    background: BTreeMap<u64, (Background, Request)>,
    out: VecDeque<Output>,
    n_failed: u64,
    /// What the last listings said (for completion), and how listings are printed.
    listings: Listings,
    /// The parts of a listing received so far (see `on_part`).
    listing: Option<ReplyBody>,
    /// Remembered shares being hashed again (their file changed since), by hash job.
    rechecks: BTreeMap<JobId, LocalShare>,
    /// Remembered downloads whose target exists when they continue, by the hash job that
    /// tells whether it is the finished file (the client was killed after the download
    /// completed, before its state was saved).
    finished_checks: BTreeMap<JobId, DownloadId>,
    /// Downloads to continue at their user's next login here.
    remembered: BTreeMap<UserId, Vec<SavedDownload>>,
    /// What the state file holds changed.
    state_dirty: bool,
    /// This client's identity key (X25519 public), sent at login.
    client_key: [u8; 32],
}

impl ClientCore {
    /// `peer_addr` is where this client listens for peers; it is sent at login.
    pub fn new(peer_addr: SocketAddr) -> Self {
        ClientCore {
            peer_addr,
            next_id: 0,
            pending: None,
            user: None,
            token: None,
            shares: Vec::new(),
            downloads: Vec::new(),
            background: BTreeMap::new(),
            out: VecDeque::new(),
            n_failed: 0,
            listings: Listings::default(),
            listing: None,
            rechecks: BTreeMap::new(),
            finished_checks: BTreeMap::new(),
            remembered: BTreeMap::new(),
            state_dirty: false,
            client_key: [0; 32],
        }
    }

    /// The identity key this client registers at login (its peer links prove it).
    pub fn set_client_key(&mut self, key: [u8; 32]) {
        self.client_key = key;
    }

    /// Whether the state file has room for one more thing of the logged-in user: it must stay
    /// readable ([`state_file`](super::state_file)'s limits), so a command that would outgrow
    /// it is refused.
    fn state_room(&self, adding: Remember<'_>) -> Result<(), String> {
        let Some(user) = &self.user else {
            return Ok(());
        };
        let state = self.saved_state();
        let mine = state.users.get(user);
        if mine.is_none() && state.users.len() >= MAX_USERS {
            return Err(format!(
                "this client remembers the shares and downloads of {MAX_USERS} users already"
            ));
        }
        let mine = mine.cloned().unwrap_or_default();
        match adding {
            Remember::Share(group, name) => {
                let replaces = self
                    .shares
                    .iter()
                    .any(|s| &s.user == user && &s.group == group && &s.name == name);
                if !replaces && mine.shares.len() >= MAX_SHARES_PER_USER {
                    return Err(format!(
                        "you share {MAX_SHARES_PER_USER} files from this client already"
                    ));
                }
            }
            Remember::Download => {
                if mine.downloads.len() >= MAX_DOWNLOADS_PER_USER {
                    return Err(format!(
                        "you have {MAX_DOWNLOADS_PER_USER} unfinished downloads on this client \
                         already"
                    ));
                }
            }
        }
        // A generous estimate of the file's size (each share's piece hashes dominate).
        let approx: u64 = state
            .users
            .values()
            .flat_map(|u| &u.shares)
            .map(|s| 1024 + 20 * s.meta.piece_hashes.len() as u64)
            .sum::<u64>()
            + state
                .users
                .values()
                .map(|u| 8192 * u.downloads.len() as u64)
                .sum::<u64>();
        if approx >= MAX_STATE_LEN / 2 {
            return Err(format!(
                "this client's state file is near its limit of {MAX_STATE_LEN} bytes"
            ));
        }
        Ok(())
    }

    /// Takes in what the state file remembered: the shares (served again once their user logs
    /// in and they pass the check) and the downloads (continued at that login).
    pub fn restore(&mut self, state: ClientState) {
        for (user, u) in state.users {
            for s in u.shares {
                self.shares.push(LocalShare {
                    user: user.clone(),
                    group: s.group,
                    name: s.meta.name.clone(),
                    path: s.path,
                    meta: s.meta,
                    stamp: s.stamp,
                });
            }
            if !u.downloads.is_empty() {
                self.remembered.insert(user, u.downloads);
            }
        }
    }

    /// What the state file must hold now: every user's shares (but not a running download's
    /// registration, which the download makes again), the running downloads and those still
    /// to continue.
    pub fn saved_state(&self) -> ClientState {
        let mut state = ClientState::default();
        let running = |d: &&DownloadEntry| d.status == DownloadStatus::Running;
        for s in self.shares.iter().chain(self.rechecks.values()) {
            let downloading = self
                .downloads
                .iter()
                .filter(running)
                .any(|d| d.target == s.path);
            if downloading {
                continue;
            }
            let u = state.users.entry(s.user.clone()).or_default();
            u.shares.push(SavedShare {
                group: s.group.clone(),
                path: s.path.clone(),
                stamp: s.stamp,
                meta: s.meta.clone(),
            });
        }
        for d in self.downloads.iter().filter(running) {
            let u = state.users.entry(d.user.clone()).or_default();
            u.downloads.push(SavedDownload {
                group: d.group.clone(),
                name: d.name.clone(),
                target: d.target.clone(),
            });
        }
        for (user, downloads) in &self.remembered {
            let u = state.users.entry(user.clone()).or_default();
            u.downloads.extend(downloads.iter().cloned());
        }
        for (job, _) in self.background.values() {
            if let Background::ResumeDownload { user, saved } = job {
                let u = state.users.entry(user.clone()).or_default();
                u.downloads.push(saved.clone());
            }
        }
        state
    }

    /// Requests on the side whose outcome the state file or the tracker must see before the
    /// client exits: a download's registration as a share (else a download completed just
    /// before the end of input is not remembered), a withdrawal, an announcement, a resume,
    /// and a remembered download asking for its sharers (else the end of input right after
    /// `login` would leave it behind). A download's periodic sharer queries are not among
    /// them: a running download is waited for anyway, nor is a remembered share still being
    /// hashed again (the state file keeps it). All of them end when the tracker link is lost
    /// ([`ClientCore::handle_tracker_lost`]), and the driver waits for them at most a
    /// command's time after the end of input.
    pub fn has_background_work(&self) -> bool {
        self.background
            .values()
            .any(|(job, _)| !matches!(job, Background::Sharers { .. }))
    }

    /// Remembered downloads that are continuing: asked for their sharers after the login, not
    /// running yet (`show_downloads` lists them as running).
    pub fn resuming_downloads(&self) -> impl Iterator<Item = &SavedDownload> {
        self.background.values().filter_map(|(job, _)| match job {
            Background::ResumeDownload { saved, .. } => Some(saved),
            _ => None,
        })
    }

    /// Whether the state to save changed since the last call.
    pub fn take_state_dirty(&mut self) -> bool {
        std::mem::take(&mut self.state_dirty)
    }

    /// A file this client shares from `path` now has `stamp` (a download completed there).
    pub fn note_stamp(&mut self, path: &Path, stamp: FileStamp) {
        for s in self.shares.iter_mut().filter(|s| s.path == path) {
            s.stamp = Some(stamp);
            self.state_dirty = true;
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

    /// What the last listings said; printing them as tables is switched on here.
    pub fn listings(&self) -> &Listings {
        &self.listings
    }

    pub fn listings_mut(&mut self) -> &mut Listings {
        &mut self.listings
    }

    /// Files this client shares (for every user who shared from it).
    pub fn shares(&self) -> &[LocalShare] {
        &self.shares
    }

    /// The downloads started on this client, in order.
    pub fn downloads(&self) -> &[DownloadEntry] {
        &self.downloads
    }

    /// Whether some download is still running.
    pub fn has_running_downloads(&self) -> bool {
        self.downloads
            .iter()
            .any(|d| d.status == DownloadStatus::Running)
    }

    /// The share the logged-in user offers for `group`/`name` with content `file_sha1`: the
    /// only files this client serves.
    pub fn serving(
        &self,
        group: &GroupId,
        name: &FileName,
        file_sha1: &crate::wire::Sha1Digest,
    ) -> Option<&LocalShare> {
        let user = self.user.as_ref()?;
        self.shares.iter().find(|s| {
            &s.user == user
                && &s.group == group
                && &s.name == name
                && &s.meta.file_sha1 == file_sha1
        })
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
                | Command::Help { .. }
                | Command::Quit
        );
        if needs_session && self.user.is_none() {
            return self.fail("not logged in");
        }
        let body = match &cmd {
            Command::Quit => return self.out.push_back(Output::Quit),
            Command::ShowDownloads => return self.out.push_back(Output::ShowDownloads),
            Command::Help { topic } => return self.help(topic.as_deref()),
            // Both need facts from the file system first: the driver answers with
            // `handle_inspected`.
            Command::DownloadFile {
                name, destination, ..
            } => {
                let query = Inspect::DownloadTarget {
                    destination: destination.clone(),
                    name: name.clone(),
                };
                self.pending = Some(Pending::Inspecting { cmd });
                return self.out.push_back(Output::Inspect(query));
            }
            Command::UploadFile { path, .. } => {
                let query = Inspect::Upload { path: path.clone() };
                self.pending = Some(Pending::Inspecting { cmd });
                return self.out.push_back(Output::Inspect(query));
            }
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
                // The login carries the shares this client holds for the user, so the tracker
                // lists only those: they are checked first, and served again only once they
                // pass.
                let (mine, others) = std::mem::take(&mut self.shares)
                    .into_iter()
                    .partition(|s| s.user == *user);
                self.shares = others;
                self.pending = Some(Pending::CheckingShares {
                    user: user.clone(),
                    password: password.clone(),
                });
                return self.out.push_back(Output::CheckShares { shares: mine });
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
            // Listings come in parts (each far below a frame, whatever the listing's size),
            // gathered before anything is printed (`on_part`).
            Command::ListRequests { group } => RequestBody::ListPart {
                listing: Listing::Requests(group.clone()),
                from: 0,
            },
            Command::AcceptRequest { group, user } => RequestBody::AcceptRequest {
                group: group.clone(),
                user: user.clone(),
            },
            Command::RejectRequest { group, user } => RequestBody::RejectRequest {
                group: group.clone(),
                user: user.clone(),
            },
            Command::ListGroups => RequestBody::ListPart {
                listing: Listing::Groups,
                from: 0,
            },
            Command::ListFiles { group } => RequestBody::ListPart {
                listing: Listing::Files(group.clone()),
                from: 0,
            },
            Command::StopShare { group, name } => RequestBody::StopShare {
                group: group.clone(),
                name: name.clone(),
            },
        };
        self.send(body, Sent::Cmd(cmd), now);
    }

    fn send(&mut self, body: RequestBody, cmd: Sent, now: Instant) {
        let request = Request {
            req_id: self.next_id(),
            body,
        };
        self.pending = Some(Pending::Awaiting {
            request: Box::new(request.clone()),
            cmd,
            deadline: now + REPLY_TIMEOUT,
        });
        self.out.push_back(Output::Send(request));
    }

    /// Sends a request on the side; its reply goes to `handle_background`.
    fn send_background(&mut self, job: Background, body: RequestBody) {
        let request = Request {
            req_id: self.next_id(),
            body,
        };
        self.background
            .insert(request.req_id, (job, request.clone()));
        self.out.push_back(Output::Send(request));
    }

    /// What to send first on a new tracker link (after the hello): a resume of the session,
    /// if there is one, then every request in flight with its original id.
    pub fn requests_for_new_link(&mut self) -> Vec<Request> {
        let mut first = Vec::new();
        self.background
            .retain(|_, (job, _)| !matches!(job, Background::Resume));
        if let (Some(token), Some(_)) = (self.token, &self.user) {
            let request = Request {
                req_id: self.next_id(),
                // The link number is the uplink's to fill in as it sends.
                body: RequestBody::Resume { token, link: 0 },
            };
            self.background
                .insert(request.req_id, (Background::Resume, request.clone()));
            first.push(request);
        }
        let mut in_flight: Vec<Request> = self
            .background
            .values()
            .filter(|(job, _)| !matches!(job, Background::Resume))
            .map(|(_, r)| r.clone())
            .collect();
        if let Some(Pending::Awaiting { request, .. }) = &self.pending {
            in_flight.push((**request).clone());
        }
        in_flight.sort_by_key(|r| r.req_id);
        first.extend(in_flight);
        first
    }

    /// The driver's answer to an [`Output::Inspect`]: the command waiting for it goes on.
    pub fn handle_inspected(&mut self, answer: Inspected, now: Instant) {
        if !matches!(self.pending, Some(Pending::Inspecting { .. })) {
            return;
        }
        let Some(Pending::Inspecting { cmd }) = self.pending.take() else {
            return;
        };
        match (cmd, answer) {
            (Command::DownloadFile { group, name, .. }, Inspected::DownloadTarget(target)) => {
                let target = match target.and_then(|t| self.not_downloading(t)) {
                    Ok(t) => t,
                    Err(reason) => return self.fail(reason.to_string()),
                };
                if let Err(reason) = self.state_room(Remember::Download) {
                    return self.fail(reason);
                }
                let body = RequestBody::FileSharers {
                    group: group.clone(),
                    name: name.clone(),
                };
                self.send(
                    body,
                    Sent::Download {
                        group,
                        name,
                        target,
                    },
                    now,
                );
            }
            (Command::UploadFile { path, group }, Inspected::Upload(absolute)) => match absolute {
                Ok((absolute, stamp)) => self.start_upload(&path, absolute, stamp, &group),
                Err(reason) => self.fail(reason.to_string()),
            },
            (cmd, answer) => {
                self.fail(format!("internal error: {answer:?} for {cmd:?}"));
            }
        }
    }

    /// A download's target, unless a running download of this client is writing it already.
    fn not_downloading(&self, target: PathBuf) -> Result<PathBuf, PathError> {
        if self
            .downloads
            .iter()
            .any(|d| d.status == DownloadStatus::Running && d.target == target)
        {
            return Err(PathError::AlreadyDownloading(target));
        }
        Ok(target)
    }

    /// Records a share, replacing the same user's earlier share of that name in that group.
    fn add_share(&mut self, share: LocalShare) {
        self.shares
            .retain(|s| !(s.user == share.user && s.group == share.group && s.name == share.name));
        self.shares.push(share);
        self.state_dirty = true;
    }

    /// The driver started (or could not start) download `id`; `Ok` says what started, and is
    /// printed through its `Display`.
    pub fn handle_download_started(&mut self, id: DownloadId, result: Result<Started, StartError>) {
        self.state_dirty = true;
        if !matches!(self.pending, Some(Pending::Starting { id: pending }) if pending == id) {
            // A remembered download continued by itself after a login.
            let Some(d) = self.downloads.iter_mut().find(|d| d.id == id) else {
                return;
            };
            return match result {
                Ok(started) => self.print(started.to_string()),
                Err(StartError::TargetExists(target)) => {
                    // Killed after the download completed and before the state said so? The
                    // target is hashed: if it holds the file, it is shared; it is never
                    // touched either way.
                    log::info!(
                        "{} exists: checking whether it is the finished download of {}",
                        target.display(),
                        d.name
                    );
                    let job = JobId(self.next_id());
                    self.finished_checks.insert(job, id);
                    self.out.push_back(Output::HashFile { job, path: target });
                }
                Err(error) => {
                    d.status = DownloadStatus::Failed;
                    let reason = format!(
                        "download of {} from group {} cannot continue: {error}",
                        d.name, d.group
                    );
                    self.fail(reason)
                }
            };
        }
        self.pending = None;
        match result {
            Ok(started) => self.print(started.to_string()),
            Err(error @ (StartError::TargetExists(_) | StartError::ForeignPart { .. })) => {
                // Nothing was started: the command failed before any download existed.
                self.downloads.retain(|d| d.id != id);
                self.fail(error.to_string())
            }
            Err(error) => {
                if let Some(d) = self.downloads.iter_mut().find(|d| d.id == id) {
                    d.status = DownloadStatus::Failed;
                }
                self.fail(error.to_string())
            }
        }
    }

    /// Download `id` ended: `Ok` with what completed (printed through its `Display`), or `Err`
    /// with the reason.
    pub fn handle_download_finished(
        &mut self,
        id: DownloadId,
        result: Result<Completed, DownloadError>,
    ) {
        let Some(d) = self.downloads.iter_mut().find(|d| d.id == id) else {
            return;
        };
        if d.status != DownloadStatus::Running {
            return;
        }
        self.state_dirty = true;
        if matches!(result, Err(DownloadError::Exiting)) {
            // Interrupted, not failed for good: it goes on at the user's next login here.
            let saved = SavedDownload {
                group: d.group.clone(),
                name: d.name.clone(),
                target: d.target.clone(),
            };
            self.remembered
                .entry(d.user.clone())
                .or_default()
                .push(saved);
        }
        match result {
            Ok(completed) => {
                d.status = DownloadStatus::Complete;
                // A file with no pieces (0 bytes) never had a first piece to verify: the
                // completed download is what makes its client a sharer.
                d.wants_share = true;
                self.print(completed.to_string());
                self.register_downloads();
            }
            Err(reason) => {
                d.status = DownloadStatus::Failed;
                // The leave that stopped it ended the user's shares in the group already (at
                // the tracker and here): there is nothing to withdraw.
                let left = matches!(reason, DownloadError::LeftGroup);
                let reason = format!(
                    "download of {} from group {} failed: {reason}",
                    d.name, d.group
                );
                // Never registered from now on; a registration still on its way is withdrawn
                // when its answer comes.
                d.wants_share = false;
                let registered = d.registered && !left;
                self.fail(reason);
                if registered {
                    self.withdraw_share(id);
                }
            }
        }
    }

    /// Download `id` failed after it was registered as a share (or while its registration was
    /// on its way): its share is dropped here and, unless this user still shares the file
    /// another way, at the tracker, so that nobody is sent to a file that is not there.
    fn withdraw_share(&mut self, id: DownloadId) {
        let Some(d) = self.downloads.iter().find(|d| d.id == id) else {
            return;
        };
        let (user, group, name, target) = (
            d.user.clone(),
            d.group.clone(),
            d.name.clone(),
            d.target.clone(),
        );
        let before = self.shares.len();
        self.shares.retain(|s| {
            !(s.user == user && s.group == group && s.name == name && s.path == target)
        });
        if self.shares.len() != before {
            self.state_dirty = true;
            self.out.push_back(Output::SharesChanged);
        }
        let still_shared = self
            .shares
            .iter()
            .any(|s| s.user == user && s.group == group && s.name == name);
        if still_shared {
            return;
        }
        if self.user.as_ref() != Some(&user) {
            // Not this user's session now (the share is offline meanwhile): withdrawn at the
            // user's next login here.
            if let Some(d) = self.downloads.iter_mut().find(|d| d.id == id) {
                d.withdraw_due = true;
            }
            return;
        }
        log::info!("withdrawing the share of the failed download of {name} in group {group}");
        self.send_background(Background::Withdraw, RequestBody::StopShare { group, name });
    }

    /// Download `id` verified its first piece: register it as a share of its user (now, or
    /// at that user's next login).
    pub fn handle_first_piece(&mut self, id: DownloadId) {
        if let Some(d) = self.downloads.iter_mut().find(|d| d.id == id) {
            d.wants_share = true;
        }
        self.register_downloads();
    }

    /// Sends the registrations due: downloads whose first piece verified, of the logged-in user;
    /// and the withdrawals due, of the user's downloads that failed while logged out.
    fn register_downloads(&mut self) {
        let Some(user) = self.user.clone() else {
            return;
        };
        let withdrawals: Vec<DownloadId> = self
            .downloads
            .iter_mut()
            .filter(|d| d.withdraw_due && d.user == user)
            .map(|d| {
                d.withdraw_due = false;
                d.id
            })
            .collect();
        for id in withdrawals {
            self.withdraw_share(id);
        }
        let due: Vec<(DownloadId, GroupId, FileMeta)> = self
            .downloads
            .iter_mut()
            .filter(|d| d.wants_share && !d.registering && d.user == user)
            .map(|d| {
                d.registering = true;
                (d.id, d.group.clone(), d.meta.clone())
            })
            .collect();
        for (download, group, meta) in due {
            self.send_background(
                Background::Register { download },
                RequestBody::UploadFile { group, meta },
            );
        }
    }

    /// Download `id` needs the sharers online again; the answer comes as [`Output::Sharers`].
    pub fn query_sharers(&mut self, id: DownloadId) {
        let Some(d) = self.downloads.iter().find(|d| d.id == id) else {
            return;
        };
        if self.user.is_none() {
            return self.out.push_back(Output::Sharers {
                download: id,
                result: Err(SharersError::NotLoggedIn),
            });
        }
        let body = RequestBody::FileSharers {
            group: d.group.clone(),
            name: d.name.clone(),
        };
        self.send_background(Background::Sharers { download: id }, body);
    }

    /// A reply to a background request.
    fn handle_background(&mut self, job: Background, body: ReplyBody) {
        match job {
            Background::Resume => match body {
                ReplyBody::LoggedIn { .. } => {
                    let Some(user) = self.user.clone() else {
                        return;
                    };
                    log::info!("session of {user} resumed on the new tracker");
                    let shares: Vec<(GroupId, FileMeta)> = self
                        .shares
                        .iter()
                        .filter(|s| s.user == user)
                        .map(|s| (s.group.clone(), s.meta.clone()))
                        .collect();
                    for (group, meta) in shares {
                        self.send_background(
                            Background::Reannounce,
                            RequestBody::UploadFile { group, meta },
                        );
                    }
                }
                other => {
                    log::warn!("the session could not be resumed ({other:?}): logged out");
                    self.user = None;
                    self.token = None;
                    self.out.push_back(Output::SharesChanged);
                }
            },
            Background::Reannounce => {
                if !matches!(body, ReplyBody::Shared { .. }) {
                    log::warn!("a share could not be announced again: {body:?}");
                }
            }
            Background::Withdraw => {
                if !matches!(body, ReplyBody::Done) {
                    log::warn!("the share of a failed download could not be withdrawn: {body:?}");
                }
            }
            Background::Rechecked => {
                if !matches!(body, ReplyBody::Shared { .. }) {
                    log::warn!("a share verified again could not be announced: {body:?}");
                }
            }
            Background::ResumeDownload { user, saved } => self.resume_download(user, saved, body),
            Background::Sharers { download } => {
                let result = match body {
                    ReplyBody::Sharers {
                        peers,
                        ticket,
                        peer_keys,
                        ..
                    } => {
                        if let Some(ticket) = ticket {
                            self.out.push_back(Output::Ticket {
                                download,
                                ticket: *ticket,
                                peer_keys: peers.iter().copied().zip(peer_keys).collect(),
                            });
                        }
                        Ok(peers.into_iter().filter(|a| *a != self.peer_addr).collect())
                    }
                    ReplyBody::Refused { message, .. } => Err(SharersError::Refused(message)),
                    other => Err(SharersError::Unexpected(format!("{other:?}"))),
                };
                self.out.push_back(Output::Sharers { download, result });
            }
            Background::Register { download } => {
                let Some(d) = self.downloads.iter_mut().find(|d| d.id == download) else {
                    return;
                };
                match body {
                    ReplyBody::Shared { .. } if d.status == DownloadStatus::Failed => {
                        // The download failed while the registration was on its way.
                        self.withdraw_share(download);
                    }
                    ReplyBody::Shared { .. } => {
                        d.registered = true;
                        let share = d.share();
                        log::info!("now sharing {} in group {}", share.name, share.group);
                        self.add_share(share);
                        self.out.push_back(Output::SharesChanged);
                    }
                    other => {
                        d.registering = false;
                        log::warn!("could not register {} as a share: {other:?}", d.name);
                    }
                }
            }
        }
    }

    /// Hashes the regular file `path` (absolute: `absolute`) to share it in `group`.
    fn start_upload(&mut self, path: &Path, absolute: PathBuf, stamp: FileStamp, group: &GroupId) {
        let name = match path.file_name().and_then(|n| n.to_str()).map(FileName::new) {
            Some(Ok(name)) => name,
            Some(Err(e)) => return self.fail(format!("invalid file name: {e}")),
            None => return self.fail(format!("{} has no usable file name", path.display())),
        };
        if let Err(reason) = self.state_room(Remember::Share(group, &name)) {
            return self.fail(reason);
        }
        // Served from the absolute path, whatever the working directory becomes.
        let path = absolute;
        let job = JobId(self.next_id());
        self.pending = Some(Pending::Hashing {
            job,
            group: group.clone(),
            name,
            path: path.clone(),
            stamp,
        });
        self.out.push_back(Output::HashFile { job, path });
    }

    /// The hasher finished job `done.job`.
    pub fn handle_hashed(&mut self, done: HashDone, now: Instant) {
        if let Some(share) = self.rechecks.remove(&done.job) {
            return self.handle_rechecked(share, done);
        }
        if let Some(id) = self.finished_checks.remove(&done.job) {
            return self.handle_finished_check(id, done);
        }
        let Some(Pending::Hashing { job, .. }) = &self.pending else {
            return;
        };
        if *job != done.job {
            return;
        }
        let Some(Pending::Hashing {
            group,
            name,
            path,
            stamp,
            ..
        }) = self.pending.take()
        else {
            return;
        };
        let hashes: FileHashes = match done.result {
            Ok(h) => h,
            Err(e) => return self.fail(e.to_string()),
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
            Sent::Upload {
                group,
                path,
                meta,
                stamp,
            },
            now,
        );
    }

    /// The request could not be sent: no tracker answered.
    pub fn handle_send_failed(&mut self, reason: &str) {
        if let Some(Pending::Awaiting { request, .. }) = &self.pending {
            // A change may have reached a tracker before every link failed (all trackers
            // killed right after it was written, say); the service then holds it. The user
            // must not take the error for "not made".
            let reads_only = matches!(
                request.body,
                RequestBody::Ping
                    | RequestBody::ListRequests { .. }
                    | RequestBody::ListGroups
                    | RequestBody::ListFiles { .. }
                    | RequestBody::FileSharers { .. }
                    | RequestBody::ListPart { .. }
            );
            let why = if reads_only {
                reason.to_owned()
            } else {
                format!(
                    "{reason}; the change may have reached the service before its trackers \
                     went away: check before repeating it"
                )
            };
            self.pending = None;
            self.fail(why);
        }
    }

    /// The tracker connection broke. The tracker ends the session of a lost connection, so
    /// the client is logged out too.
    pub fn handle_tracker_lost(&mut self) {
        self.user = None;
        self.token = None;
        for (_, (job, _)) in std::mem::take(&mut self.background) {
            match job {
                Background::ResumeDownload { user, saved } => {
                    self.remembered.entry(user).or_default().push(saved);
                }
                Background::Rechecked => {}
                Background::Sharers { download } => self.out.push_back(Output::Sharers {
                    download,
                    result: Err(SharersError::ConnectionLost),
                }),
                Background::Register { download } => {
                    if let Some(d) = self.downloads.iter_mut().find(|d| d.id == download) {
                        d.registering = false;
                    }
                }
                Background::Resume | Background::Reannounce | Background::Withdraw => {}
            }
        }
        self.out.push_back(Output::SharesChanged);
        if matches!(self.pending, Some(Pending::Awaiting { .. })) {
            self.pending = None;
            self.fail("lost the connection to the tracker");
        }
    }

    /// The driver's answer to [`Output::CheckShares`]: each share with its file's stamp now
    /// (or why it could not be read). Unchanged files are served again at once; a file of the
    /// same size is hashed again first; the others are dropped with a warning. Then the login
    /// is sent, carrying the shares this client holds.
    pub fn handle_shares_checked(
        &mut self,
        checked: Vec<(LocalShare, Result<FileStamp, String>)>,
        now: Instant,
    ) {
        if !matches!(self.pending, Some(Pending::CheckingShares { .. })) {
            // Not asked for: nothing is checked, nothing forgotten.
            self.shares
                .extend(checked.into_iter().map(|(share, _)| share));
            return;
        }
        let Some(Pending::CheckingShares { user, password }) = self.pending.take() else {
            return;
        };
        let mut resumed = 0;
        for (share, stamp) in checked {
            let (path, group) = (share.path.display(), &share.group);
            match stamp {
                Ok(stamp) if Some(stamp) == share.stamp => {
                    resumed += 1;
                    self.shares.push(share);
                    continue;
                }
                Ok(stamp) if stamp.size == share.meta.size => {
                    log::warn!(
                        "{path} changed since it was shared in group {group}: verifying it again \
                         before it is served"
                    );
                    let job = JobId(self.next_id());
                    self.out.push_back(Output::HashFile {
                        job,
                        path: share.path.clone(),
                    });
                    self.rechecks.insert(
                        job,
                        LocalShare {
                            stamp: Some(stamp),
                            ..share
                        },
                    );
                }
                Ok(stamp) => log::warn!(
                    "{path} is {} bytes now, {} when it was shared in group {group}: no longer \
                     shared",
                    stamp.size,
                    share.meta.size
                ),
                Err(e) => log::warn!("{path} ({e}): no longer shared in group {group}"),
            }
            self.state_dirty = true;
        }
        let keep: Vec<(GroupId, FileName)> = self
            .shares
            .iter()
            .filter(|s| s.user == user)
            .map(|s| (s.group.clone(), s.name.clone()))
            .collect();
        self.send(
            RequestBody::Login {
                user: user.clone(),
                password,
                peer_addr: self.peer_addr,
                shares: keep.clone(),
                client_key: self.client_key,
                // The uplink stamps the number of the link each copy goes on.
                link: 0,
            },
            Sent::Login {
                user,
                shares: keep,
                resumed,
            },
            now,
        );
    }

    /// The existing target of remembered download `id` was hashed: if it holds the file, the
    /// download had finished (it is shared and announced); else it cannot continue.
    fn handle_finished_check(&mut self, id: DownloadId, done: HashDone) {
        self.state_dirty = true;
        let Some(d) = self.downloads.iter_mut().find(|d| d.id == id) else {
            return;
        };
        if d.status != DownloadStatus::Running {
            return;
        }
        let holds_it = done.result.as_ref().is_ok_and(|h| holds(h, &d.meta));
        if !holds_it {
            d.status = DownloadStatus::Failed;
            let reason = format!(
                "download of {} from group {} cannot continue: {} already exists",
                d.name,
                d.group,
                d.target.display()
            );
            return self.fail(reason);
        }
        d.status = DownloadStatus::Complete;
        let share = d.share();
        let line = format!(
            "download of {} from group {} had finished: {} (shared)",
            d.name,
            d.group,
            d.target.display()
        );
        self.share_again(share);
        self.print(line);
    }

    /// Serves a share found good again (its file hashed again), and tells the tracker if its
    /// user is logged in here (otherwise the next login carries it).
    fn share_again(&mut self, share: LocalShare) {
        let announce = self.user.as_ref() == Some(&share.user);
        let (group, meta) = (share.group.clone(), share.meta.clone());
        self.add_share(share);
        self.out.push_back(Output::SharesChanged);
        if announce {
            self.send_background(
                Background::Rechecked,
                RequestBody::UploadFile { group, meta },
            );
        }
    }

    /// A remembered share whose file changed was hashed again: served and announced again if
    /// it still holds the content, else dropped.
    fn handle_rechecked(&mut self, share: LocalShare, done: HashDone) {
        self.state_dirty = true;
        let (path, group) = (share.path.display().to_string(), share.group.clone());
        match done.result {
            Ok(h) if holds(&h, &share.meta) => {
                log::info!("{path} verified again: shared in group {group} again");
                self.share_again(share);
            }
            Ok(_) => log::warn!(
                "{path} no longer holds the {} shared in group {group}: no longer shared",
                share.name
            ),
            Err(e) => log::warn!("{path}: {e}: no longer shared in group {group}"),
        }
    }

    /// The login is complete (its shares reconciled with the tracker): say so, register the
    /// user's downloads and continue the ones remembered from an earlier run.
    fn logged_in(&mut self, user: UserId, sent: &[(GroupId, FileName)], resumed: usize) {
        self.out.push_back(Output::SharesChanged);
        // Shares verified again while the login was on its way were not in it (the tracker
        // ended them): announced again now.
        let verified_meanwhile: Vec<(GroupId, FileMeta)> = self
            .shares
            .iter()
            .filter(|s| s.user == user && !sent.contains(&(s.group.clone(), s.name.clone())))
            .map(|s| (s.group.clone(), s.meta.clone()))
            .collect();
        for (group, meta) in verified_meanwhile {
            self.send_background(
                Background::Rechecked,
                RequestBody::UploadFile { group, meta },
            );
        }
        self.register_downloads();
        if resumed > 0 {
            self.print(format!(
                "logged in as {user} ({resumed} shared files resumed)"
            ));
        } else {
            self.print(format!("logged in as {user}"));
        }
        if self.user.as_ref() != Some(&user) {
            return;
        }
        for saved in self.remembered.remove(&user).unwrap_or_default() {
            let body = RequestBody::FileSharers {
                group: saved.group.clone(),
                name: saved.name.clone(),
            };
            self.send_background(
                Background::ResumeDownload {
                    user: user.clone(),
                    saved,
                },
                body,
            );
        }
    }

    /// The tracker's answer about a remembered download: continue it.
    fn resume_download(&mut self, user: UserId, saved: SavedDownload, body: ReplyBody) {
        self.state_dirty = true;
        if self.user.as_ref() != Some(&user) {
            // The user logged out meanwhile: continued at the next login.
            self.remembered.entry(user).or_default().push(saved);
            return;
        }
        let what = format!("download of {} from group {}", saved.name, saved.group);
        let (meta, peers, ticket, peer_keys) = match body {
            ReplyBody::Sharers {
                meta,
                peers,
                ticket,
                peer_keys,
            } if meta.name == saved.name => (meta, peers, ticket, peer_keys),
            ReplyBody::Refused { message, .. } => {
                return self.fail(format!("{what} cannot continue: {message}"))
            }
            other => {
                return self.fail(format!(
                    "{what} cannot continue: unexpected answer {other:?}"
                ))
            }
        };
        let peer_keys: Vec<(SocketAddr, [u8; 32])> = peers.iter().copied().zip(peer_keys).collect();
        let peers: Vec<SocketAddr> = peers.into_iter().filter(|a| *a != self.peer_addr).collect();
        if peers.is_empty() {
            // Nobody to fetch from now: it waits for the user's next login here.
            self.remembered.entry(user).or_default().push(saved);
            return self.fail(format!(
                "{what} cannot continue now: no sharer is online (it goes on at the next login)"
            ));
        }
        if self.not_downloading(saved.target.clone()).is_err() {
            return;
        }
        let id = DownloadId(self.next_id());
        self.downloads.push(DownloadEntry {
            id,
            user,
            group: saved.group.clone(),
            name: saved.name,
            target: saved.target.clone(),
            meta: meta.clone(),
            status: DownloadStatus::Running,
            wants_share: false,
            registering: false,
            registered: false,
            withdraw_due: false,
        });
        if let Some(ticket) = ticket {
            self.out.push_back(Output::Ticket {
                download: id,
                ticket: *ticket,
                peer_keys,
            });
        }
        self.out.push_back(Output::StartDownload {
            id,
            group: saved.group,
            meta,
            peers,
            target: saved.target,
        });
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

    /// `help`: the command list, or one command's details.
    fn help(&mut self, topic: Option<&str>) {
        let lines = match topic {
            None => super::help::overview(),
            Some(name) => match super::help::details(name) {
                Some(lines) => lines,
                None => return self.fail(format!("no command '{name}' (help lists them)")),
            },
        };
        for line in lines {
            self.print(line);
        }
    }

    /// A reply from the tracker.
    pub fn handle_reply(&mut self, reply: Reply) {
        if let Some((job, _)) = self.background.remove(&reply.req_id) {
            return self.handle_background(job, reply.body);
        }
        let Some(Pending::Awaiting { request, .. }) = &self.pending else {
            return;
        };
        if request.req_id != reply.req_id {
            return;
        }
        let Some(Pending::Awaiting {
            cmd,
            request,
            deadline,
        }) = self.pending.take()
        else {
            return;
        };
        match reply.body {
            ReplyBody::Refused { message, .. } => {
                self.listing = None;
                self.fail(message)
            }
            ReplyBody::Part { next, items } => self.on_part(cmd, *request, deadline, next, *items),
            body => self.report(cmd, body),
        }
    }

    /// One part of a listing: kept with the parts before it; the next part is asked for
    /// (within the command's deadline), or, after the last, the whole listing is reported.
    fn on_part(
        &mut self,
        cmd: Sent,
        request: Request,
        deadline: Instant,
        next: u32,
        items: ReplyBody,
    ) {
        // A listing's first part starts afresh (an earlier listing may have been cut short).
        let first = matches!(request.body, RequestBody::ListPart { from: 0, .. });
        let prior = self.listing.take().filter(|_| !first);
        let whole = match (prior, items) {
            (None, items) => items,
            (Some(ReplyBody::Groups(mut all)), ReplyBody::Groups(more)) => {
                all.extend(more);
                ReplyBody::Groups(all)
            }
            (Some(ReplyBody::Users(mut all)), ReplyBody::Users(more)) => {
                all.extend(more);
                ReplyBody::Users(all)
            }
            (Some(ReplyBody::Files(mut all)), ReplyBody::Files(more)) => {
                all.extend(more);
                ReplyBody::Files(all)
            }
            (Some(_), items) => {
                return self.fail(format!(
                    "unexpected listing part from the tracker: {items:?}"
                ))
            }
        };
        let listing = match request.body {
            RequestBody::ListPart { listing, .. } if next > 0 => listing,
            _ => return self.report(cmd, whole),
        };
        let gathered = match &whole {
            ReplyBody::Groups(v) => v.len(),
            ReplyBody::Users(v) => v.len(),
            ReplyBody::Files(v) => v.len(),
            _ => 0,
        };
        if gathered > MAX_LISTED {
            return self.fail(format!(
                "the listing has more than {MAX_LISTED} items; not shown"
            ));
        }
        self.listing = Some(whole);
        let request = Request {
            req_id: self.next_id(),
            body: RequestBody::ListPart {
                listing,
                from: next,
            },
        };
        self.pending = Some(Pending::Awaiting {
            request: Box::new(request.clone()),
            cmd,
            deadline,
        });
        self.out.push_back(Output::Send(request));
    }

    /// The tracker's answer to `download_file`: start the download.
    fn report_sharers(&mut self, group: GroupId, name: FileName, target: PathBuf, body: ReplyBody) {
        let ReplyBody::Sharers {
            meta,
            peers,
            ticket,
            peer_keys,
        } = body
        else {
            return self.fail(format!("unexpected answer from the tracker: {body:?}"));
        };
        let Some(user) = self.user.clone() else {
            return self.fail("not logged in");
        };
        if meta.name != name {
            return self.fail(format!("the tracker answered about {} instead", meta.name));
        }
        let peer_keys: Vec<(SocketAddr, [u8; 32])> = peers.iter().copied().zip(peer_keys).collect();
        let peers: Vec<SocketAddr> = peers.into_iter().filter(|a| *a != self.peer_addr).collect();
        if peers.is_empty() {
            return self.fail(format!("no sharer of {name} is online in group {group}"));
        }
        // The target is checked again by the driver as the download starts (it may have
        // appeared since `handle_inspected`): `StartError::TargetExists`.
        let id = DownloadId(self.next_id());
        self.state_dirty = true;
        self.downloads.push(DownloadEntry {
            id,
            user,
            group: group.clone(),
            name,
            target: target.clone(),
            meta: meta.clone(),
            status: DownloadStatus::Running,
            wants_share: false,
            registering: false,
            registered: false,
            withdraw_due: false,
        });
        self.pending = Some(Pending::Starting { id });
        if let Some(ticket) = ticket {
            self.out.push_back(Output::Ticket {
                download: id,
                ticket: *ticket,
                peer_keys,
            });
        }
        self.out.push_back(Output::StartDownload {
            id,
            group,
            meta,
            peers,
            target,
        });
    }

    /// Prints the result of a successful command.
    fn report(&mut self, cmd: Sent, body: ReplyBody) {
        let cmd = match cmd {
            Sent::Download {
                group,
                name,
                target,
            } => return self.report_sharers(group, name, target, body),
            Sent::Login {
                user,
                shares,
                resumed,
            } => {
                let ReplyBody::LoggedIn { token } = body else {
                    return self.fail(format!("unexpected reply to login: {body:?}"));
                };
                self.user = Some(user.clone());
                self.token = Some(token);
                return self.logged_in(user, &shares, resumed);
            }
            Sent::Upload {
                group,
                path,
                meta,
                stamp,
            } => {
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
                self.add_share(LocalShare {
                    user,
                    group,
                    name: meta.name.clone(),
                    path,
                    meta,
                    stamp: Some(stamp),
                });
                return self.print(line);
            }
            Sent::Cmd(cmd) => cmd,
        };
        match (cmd, body) {
            (Command::CreateUser { user, .. }, _) => self.print(format!("user {user} created")),
            (Command::Logout, _) => {
                self.token = None;
                self.out.push_back(Output::SharesChanged);
                if let Some(user) = self.user.take() {
                    self.print(format!("logged out {user}"));
                }
            }
            (Command::CreateGroup { group }, _) => self.print(format!("group {group} created")),
            (Command::JoinGroup { group }, _) => {
                self.print(format!("request to join group {group} sent"))
            }
            (Command::LeaveGroup { group }, _) => {
                self.state_dirty = true;
                if let Some(user) = &self.user {
                    let user = user.clone();
                    self.shares
                        .retain(|s| !(s.user == user && s.group == group));
                }
                self.out.push_back(Output::SharesChanged);
                let stop: Vec<DownloadId> = self
                    .downloads
                    .iter()
                    .filter(|d| {
                        d.status == DownloadStatus::Running
                            && d.group == group
                            && self.user.as_ref() == Some(&d.user)
                    })
                    .map(|d| d.id)
                    .collect();
                self.print(format!("left group {group}"));
                if !stop.is_empty() {
                    self.out
                        .push_back(Output::StopDownloads { downloads: stop });
                }
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
                for line in self.listings.on_groups(&groups) {
                    self.print(line);
                }
            }
            (Command::ListFiles { group }, ReplyBody::Files(files)) => {
                for line in self.listings.on_files(&group, &files) {
                    self.print(line);
                }
            }
            (Command::StopShare { group, name }, _) => {
                self.state_dirty = true;
                if let Some(user) = &self.user {
                    let user = user.clone();
                    self.shares
                        .retain(|s| !(s.user == user && s.group == group && s.name == name));
                }
                self.out.push_back(Output::SharesChanged);
                self.print(format!("stopped sharing {name} in group {group}"))
            }
            (cmd, body) => self.fail(format!(
                "unexpected answer from the tracker to {cmd:?}: {body:?}"
            )),
        }
    }
}

/// Whether a file hashed to `h` holds the content `meta` names.
fn holds(h: &FileHashes, meta: &FileMeta) -> bool {
    h.size == meta.size && h.file_sha1 == meta.file_sha1 && h.piece_hashes == meta.piece_hashes
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
