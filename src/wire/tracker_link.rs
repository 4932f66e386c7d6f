//! Messages of the client-tracker link.
//!
//! A client opens with [`ClientMsg::Hello`]; the tracker answers [`TrackerMsg::Welcome`] (or
//! closes the connection on a version it does not speak). After that the client sends
//! [`Request`]s, each with a client-chosen `req_id`, and the tracker answers each with one
//! [`Reply`] carrying the same id, in order. Frame layouts are listed in the README; every
//! request starts with `u64 req_id`.
//!
//! A well-formed request that the tracker refuses gets [`ReplyBody::Refused`] and the connection
//! lives on; a frame that does not parse ([`DecodeError`]) closes the connection.

use std::fmt;
use std::net::SocketAddr;

use super::codec::*;
use super::frame;
use super::ids::{FileName, GroupId, Password, Sha1Digest, UserId, MAX_FILE_NAME_LEN, MAX_ID_LEN};
use super::ops::LinkNo;
use super::ticket::{Ticket, MAX_TICKET_LEN};
use super::{PROTOCOL_MAGIC, PROTOCOL_VERSION};

/// Longest human-readable reason in a refusal.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Largest piece length a file may be registered with.
pub const MAX_PIECE_LEN: u32 = 16 * 1024 * 1024;

/// Who is speaking on a freshly opened link to a tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A client process, with the random id it keeps for its whole run: a request retried
    /// through another tracker is recognised by this id and the request id.
    Client { client: u64 },
    /// Another tracker (its number in the tracker file and the random id of this run of it);
    /// the rest of the link speaks the tracker-to-tracker messages (`wire::replication`).
    Tracker { no: u16, incarnation: u64 },
}

/// Client to tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    /// `0x01`: `u32 magic | u16 version | u8 role | role body`, where role 1 (client) has
    /// `u64 client` and role 2 (tracker) has `u16 tracker_no | u64 incarnation`.
    Hello {
        version: u16,
        role: Role,
    },
    Request(Request),
}

/// A request with the id its reply will carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub req_id: u64,
    pub body: RequestBody,
}

/// Everything a client can ask of a tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// `0x10`: no fields. Answered with `Pong`; needs no session.
    Ping,
    /// `0x11`: `str user | bytes password`.
    CreateUser { user: UserId, password: Password },
    /// `0x12`: `str user | bytes password | addr peer_addr | u32 n | (str group | str name) * n
    /// | [32] client_key | (u64 link)?`: the shares this client holds for the user now (the
    /// files it serves; the session opens and the user's other shares at `peer_addr` end in
    /// one change, so no downloader is sent here for a file this client no longer holds), its
    /// identity key, and its number for this tracker link.
    Login {
        user: UserId,
        password: Password,
        peer_addr: SocketAddr,
        shares: Vec<(GroupId, FileName)>,
        /// The client's identity key (X25519 public): the tracker hands it to downloaders
        /// with `peer_addr` and names it in this user's tickets.
        client_key: [u8; 32],
        /// The client's number for the link this login is sent on ([`LinkNo`]: 1 for the
        /// process's first tracker link, growing with each new one), so that a copy of the
        /// login from a link the client has left neither moves nor ends its session. Written
        /// only when not 0; absent (an earlier build's client) reads as 0, not numbered.
        link: LinkNo,
    },
    /// `0x13`: no fields.
    Logout,
    /// `0x14`: `str group`.
    CreateGroup { group: GroupId },
    /// `0x15`: `str group`.
    JoinGroup { group: GroupId },
    /// `0x16`: `str group`.
    LeaveGroup { group: GroupId },
    /// `0x17`: `str group`.
    ListRequests { group: GroupId },
    /// `0x18`: `str group | str user`.
    AcceptRequest { group: GroupId, user: UserId },
    /// `0x19`: `str group | str user`.
    RejectRequest { group: GroupId, user: UserId },
    /// `0x1a`: no fields.
    ListGroups,
    /// `0x1b`: `str group`.
    ListFiles { group: GroupId },
    /// `0x1c`: `str group | file_meta`.
    UploadFile { group: GroupId, meta: FileMeta },
    /// `0x1d`: `str group | str name`.
    StopShare { group: GroupId, name: FileName },
    /// `0x1e`: `str group | str name`: the file's metadata and where its online sharers
    /// listen (members only).
    FileSharers { group: GroupId, name: FileName },
    /// `0x1f`: `[u8; 16] token | (u64 link)?`: take over the session holding `token` (after
    /// the client's tracker died). Answered with `LoggedIn` carrying the same token. `link`
    /// as in `Login`.
    Resume { token: [u8; 16], link: LinkNo },
    /// `0x21`: `u8 listing | str group (requests and files only) | u32 from`: the part of a
    /// listing that starts at item `from` (0 for the first), as large as fits in
    /// [`MAX_PART_BYTES`]; answered with [`ReplyBody::Part`]. Listing 1 is the groups, 2 a
    /// group's pending requests, 3 a group's files.
    ListPart { listing: Listing, from: u32 },
}

/// Which listing [`RequestBody::ListPart`] asks a part of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    Groups,
    Requests(GroupId),
    Files(GroupId),
}

/// The most a tracker puts in one [`ReplyBody::Part`] (its items' encoded bytes), so that
/// a listing of any size travels in frames far below the frame limit.
pub const MAX_PART_BYTES: usize = 1024 * 1024;

/// What a tracker records about a shared file's content.
/// Layout: `str name | u64 size | u32 piece_len | sha1 file_sha1 | u32 n_pieces | sha1 * n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub name: FileName,
    pub size: u64,
    pub piece_len: u32,
    pub file_sha1: Sha1Digest,
    pub piece_hashes: Vec<Sha1Digest>,
}

impl FileMeta {
    /// Number of pieces a file of `size` bytes has with pieces of `piece_len` bytes.
    pub fn n_pieces_for(size: u64, piece_len: u32) -> u64 {
        if piece_len == 0 {
            return 0;
        }
        size.div_ceil(u64::from(piece_len))
    }

    /// Same content: size, piece length and every hash agree (the name is not compared).
    pub fn same_content(&self, other: &FileMeta) -> bool {
        self.size == other.size
            && self.piece_len == other.piece_len
            && self.file_sha1 == other.file_sha1
            && self.piece_hashes == other.piece_hashes
    }

    /// Reads the layout above (also used by `replication` and the state snapshot).
    pub(crate) fn parse(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let name = file_name(r)?;
        let size = r.u64()?;
        let piece_len = r.u32()?;
        if piece_len == 0 || piece_len > MAX_PIECE_LEN {
            return Err(DecodeError::BadValue("piece length"));
        }
        let file_sha1 = r.sha1()?;
        let n_pieces = r.count(20)?;
        if n_pieces as u64 != FileMeta::n_pieces_for(size, piece_len) {
            return Err(DecodeError::BadValue("piece count does not match the size"));
        }
        let mut piece_hashes = Vec::with_capacity(n_pieces);
        for _ in 0..n_pieces {
            piece_hashes.push(r.sha1()?);
        }
        Ok(FileMeta {
            name,
            size,
            piece_len,
            file_sha1,
            piece_hashes,
        })
    }

    /// Writes the layout above.
    pub(crate) fn emit(&self, out: &mut Vec<u8>) {
        put_str16(out, self.name.as_str());
        put_u64(out, self.size);
        put_u32(out, self.piece_len);
        put_sha1(out, &self.file_sha1);
        put_count(out, self.piece_hashes.len());
        for h in &self.piece_hashes {
            put_sha1(out, h);
        }
    }
}

/// Tracker to client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackerMsg {
    /// `0x81`: `u32 magic | u16 version | u16 tracker_no`.
    Welcome {
        version: u16,
        tracker_no: u16,
    },
    Reply(Reply),
}

/// The answer to the request with the same `req_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub req_id: u64,
    pub body: ReplyBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// `0x90`: the change was made; nothing to report.
    Done,
    /// `0x91`: `u16 code | str message`.
    Refused { code: RejectCode, message: String },
    /// `0x92`: answer to `Ping`.
    Pong,
    /// `0x93`: `[u8; 16] token`: the session is open.
    LoggedIn { token: [u8; 16] },
    /// `0x94`: `u32 n | (str group | str owner | u32 n_members | u8 relation) * n`.
    Groups(Vec<GroupInfo>),
    /// `0x95`: `u32 n | str user * n`.
    Users(Vec<UserId>),
    /// `0x96`: `u32 n | (str name | u64 size | u32 online | u32 sharers | sha1) * n`.
    Files(Vec<FileInfo>),
    /// `0x97`: `u8 new_file` (1 if the upload created the file, 0 if it added a sharer).
    Shared { new_file: bool },
    /// `0x98`: `file_meta | u32 n | addr * n | u8 has_ticket | ticket? | u32 n | [32] key *
    /// n`: a file, the peer addresses of its online sharers, the asking member's ticket for it
    /// (sharers serve only with one), and each sharer's identity key, in the order of `peers`
    /// (both counts equal).
    Sharers {
        meta: FileMeta,
        peers: Vec<SocketAddr>,
        ticket: Option<Box<Ticket>>,
        peer_keys: Vec<[u8; 32]>,
    },
    /// `0x99`: `u32 next | u8 type | body`: one part of a listing ([`RequestBody::ListPart`]):
    /// `items` is a `Groups`, `Users` or `Files` (its type byte and body as above), and
    /// `next` the index of the next part's first item, 0 when this part is the last.
    Part { next: u32, items: Box<ReplyBody> },
}

/// One line of `list_groups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub group: GroupId,
    pub owner: UserId,
    pub n_members: u32,
    pub relation: Relation,
}

/// How the asking user stands towards a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    None = 0,
    Requested = 1,
    Member = 2,
    Owner = 3,
}

/// One line of `list_files`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub name: FileName,
    pub size: u64,
    pub n_online: u32,
    pub n_sharers: u32,
    pub file_sha1: Sha1Digest,
}

/// Why a tracker refused a well-formed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    BadRequest,
    UserExists,
    UnknownUser,
    WrongPassword,
    UserLoggedInElsewhere,
    SessionAlreadyOpen,
    NotLoggedIn,
    GroupExists,
    NoSuchGroup,
    AlreadyMember,
    AlreadyRequested,
    NotMember,
    NotOwner,
    NoSuchRequest,
    NoSuchFile,
    ContentMismatch,
    NotSharer,
    Unavailable,
    Internal,
    /// A quota of the user's was reached.
    QuotaExceeded,
    /// A code from a newer tracker.
    Other(u16),
}

impl RejectCode {
    const TABLE: [RejectCode; 20] = [
        RejectCode::BadRequest,
        RejectCode::UserExists,
        RejectCode::UnknownUser,
        RejectCode::WrongPassword,
        RejectCode::UserLoggedInElsewhere,
        RejectCode::SessionAlreadyOpen,
        RejectCode::NotLoggedIn,
        RejectCode::GroupExists,
        RejectCode::NoSuchGroup,
        RejectCode::AlreadyMember,
        RejectCode::AlreadyRequested,
        RejectCode::NotMember,
        RejectCode::NotOwner,
        RejectCode::NoSuchRequest,
        RejectCode::NoSuchFile,
        RejectCode::ContentMismatch,
        RejectCode::NotSharer,
        RejectCode::Unavailable,
        RejectCode::Internal,
        RejectCode::QuotaExceeded,
    ];

    pub fn to_u16(self) -> u16 {
        match self {
            RejectCode::Other(c) => c,
            known => RejectCode::TABLE
                .iter()
                .position(|c| *c == known)
                .map_or(0, |i| i as u16 + 1),
        }
    }

    pub fn from_u16(code: u16) -> Self {
        usize::from(code)
            .checked_sub(1)
            .and_then(|i| RejectCode::TABLE.get(i).copied())
            .unwrap_or(RejectCode::Other(code))
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

mod ty {
    pub const HELLO: u8 = 0x01;
    pub const PING: u8 = 0x10;
    pub const CREATE_USER: u8 = 0x11;
    pub const LOGIN: u8 = 0x12;
    pub const LOGOUT: u8 = 0x13;
    pub const CREATE_GROUP: u8 = 0x14;
    pub const JOIN_GROUP: u8 = 0x15;
    pub const LEAVE_GROUP: u8 = 0x16;
    pub const LIST_REQUESTS: u8 = 0x17;
    pub const ACCEPT_REQUEST: u8 = 0x18;
    pub const REJECT_REQUEST: u8 = 0x19;
    pub const LIST_GROUPS: u8 = 0x1a;
    pub const LIST_FILES: u8 = 0x1b;
    pub const UPLOAD_FILE: u8 = 0x1c;
    pub const STOP_SHARE: u8 = 0x1d;
    pub const FILE_SHARERS: u8 = 0x1e;
    pub const RESUME: u8 = 0x1f;
    pub const LIST_PART: u8 = 0x21;

    pub const WELCOME: u8 = 0x81;
    pub const DONE: u8 = 0x90;
    pub const REFUSED: u8 = 0x91;
    pub const PONG: u8 = 0x92;
    pub const LOGGED_IN: u8 = 0x93;
    pub const GROUPS: u8 = 0x94;
    pub const USERS: u8 = 0x95;
    pub const FILES: u8 = 0x96;
    pub const SHARED: u8 = 0x97;
    pub const SHARERS: u8 = 0x98;
    pub const PART: u8 = 0x99;
}

const ROLE_CLIENT: u8 = 1;
/// The role byte of a tracker's handshake (the tracker-to-tracker link's hello uses it too).
pub(crate) const ROLE_TRACKER: u8 = 2;

pub(crate) fn user_id(r: &mut Reader<'_>) -> Result<UserId, DecodeError> {
    Ok(UserId::new(r.str16(MAX_ID_LEN)?)?)
}

pub(crate) fn group_id(r: &mut Reader<'_>) -> Result<GroupId, DecodeError> {
    Ok(GroupId::new(r.str16(MAX_ID_LEN)?)?)
}

pub(crate) fn file_name(r: &mut Reader<'_>) -> Result<FileName, DecodeError> {
    Ok(FileName::new(r.str16(MAX_FILE_NAME_LEN)?)?)
}

fn password(r: &mut Reader<'_>) -> Result<Password, DecodeError> {
    Ok(Password::new(r.bytes16(super::ids::MAX_PASSWORD_LEN)?)?)
}

/// The `(u64 link)?` ending a `Login` or `Resume`: absent is 0 (not numbered: an earlier
/// build's client); a present 0 is refused, so that each request has one encoding.
fn optional_link(r: &mut Reader<'_>) -> Result<LinkNo, DecodeError> {
    if r.remaining() == 0 {
        return Ok(0);
    }
    match r.u64()? {
        0 => Err(DecodeError::BadValue("link number 0 (written as absent)")),
        link => Ok(link),
    }
}

fn put_optional_link(out: &mut Vec<u8>, link: LinkNo) {
    if link != 0 {
        put_u64(out, link);
    }
}

impl ClientMsg {
    /// Parses a frame payload (type byte + body).
    pub fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let (frame_type, body) = frame::split(payload)?;
        let mut r = Reader::new(body);
        let msg = if frame_type == ty::HELLO {
            let magic = r.u32()?;
            if magic != PROTOCOL_MAGIC {
                return Err(DecodeError::BadMagic(magic));
            }
            let version = r.u16()?;
            let role = match r.u8()? {
                ROLE_CLIENT => Role::Client { client: r.u64()? },
                ROLE_TRACKER => Role::Tracker {
                    no: r.u16()?,
                    incarnation: r.u64()?,
                },
                _ => return Err(DecodeError::BadValue("role")),
            };
            ClientMsg::Hello { version, role }
        } else {
            let req_id = r.u64()?;
            let body = match frame_type {
                ty::PING => RequestBody::Ping,
                ty::CREATE_USER => RequestBody::CreateUser {
                    user: user_id(&mut r)?,
                    password: password(&mut r)?,
                },
                ty::LOGIN => RequestBody::Login {
                    user: user_id(&mut r)?,
                    password: password(&mut r)?,
                    peer_addr: r.socket_addr()?,
                    shares: share_list(&mut r)?,
                    client_key: r.array()?,
                    link: optional_link(&mut r)?,
                },
                ty::LOGOUT => RequestBody::Logout,
                ty::CREATE_GROUP => RequestBody::CreateGroup {
                    group: group_id(&mut r)?,
                },
                ty::JOIN_GROUP => RequestBody::JoinGroup {
                    group: group_id(&mut r)?,
                },
                ty::LEAVE_GROUP => RequestBody::LeaveGroup {
                    group: group_id(&mut r)?,
                },
                ty::LIST_REQUESTS => RequestBody::ListRequests {
                    group: group_id(&mut r)?,
                },
                ty::ACCEPT_REQUEST => RequestBody::AcceptRequest {
                    group: group_id(&mut r)?,
                    user: user_id(&mut r)?,
                },
                ty::REJECT_REQUEST => RequestBody::RejectRequest {
                    group: group_id(&mut r)?,
                    user: user_id(&mut r)?,
                },
                ty::LIST_GROUPS => RequestBody::ListGroups,
                ty::LIST_FILES => RequestBody::ListFiles {
                    group: group_id(&mut r)?,
                },
                ty::UPLOAD_FILE => RequestBody::UploadFile {
                    group: group_id(&mut r)?,
                    meta: FileMeta::parse(&mut r)?,
                },
                ty::STOP_SHARE => RequestBody::StopShare {
                    group: group_id(&mut r)?,
                    name: file_name(&mut r)?,
                },
                ty::FILE_SHARERS => RequestBody::FileSharers {
                    group: group_id(&mut r)?,
                    name: file_name(&mut r)?,
                },
                ty::RESUME => RequestBody::Resume {
                    token: r.array()?,
                    link: optional_link(&mut r)?,
                },
                ty::LIST_PART => {
                    let listing = match r.u8()? {
                        1 => Listing::Groups,
                        2 => Listing::Requests(group_id(&mut r)?),
                        3 => Listing::Files(group_id(&mut r)?),
                        _ => return Err(DecodeError::BadValue("listing")),
                    };
                    RequestBody::ListPart {
                        listing,
                        from: r.u32()?,
                    }
                }
                other => return Err(DecodeError::UnknownType(other)),
            };
            ClientMsg::Request(Request { req_id, body })
        };
        r.finish()?;
        Ok(msg)
    }

    /// Appends the whole frame (length prefix included) to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        match self {
            ClientMsg::Hello { version, role } => {
                let start = frame::begin(out, ty::HELLO);
                put_u32(out, PROTOCOL_MAGIC);
                put_u16(out, *version);
                match role {
                    Role::Client { client } => {
                        put_u8(out, ROLE_CLIENT);
                        put_u64(out, *client);
                    }
                    Role::Tracker { no, incarnation } => {
                        put_u8(out, ROLE_TRACKER);
                        put_u16(out, *no);
                        put_u64(out, *incarnation);
                    }
                }
                frame::end(out, start);
            }
            ClientMsg::Request(req) => req.emit(out),
        }
    }

    /// The handshake this build sends as client `client`.
    pub fn hello(client: u64) -> Self {
        ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Client { client },
        }
    }
}

impl Request {
    pub fn emit(&self, out: &mut Vec<u8>) {
        let frame_type = match &self.body {
            RequestBody::Ping => ty::PING,
            RequestBody::CreateUser { .. } => ty::CREATE_USER,
            RequestBody::Login { .. } => ty::LOGIN,
            RequestBody::Logout => ty::LOGOUT,
            RequestBody::CreateGroup { .. } => ty::CREATE_GROUP,
            RequestBody::JoinGroup { .. } => ty::JOIN_GROUP,
            RequestBody::LeaveGroup { .. } => ty::LEAVE_GROUP,
            RequestBody::ListRequests { .. } => ty::LIST_REQUESTS,
            RequestBody::AcceptRequest { .. } => ty::ACCEPT_REQUEST,
            RequestBody::RejectRequest { .. } => ty::REJECT_REQUEST,
            RequestBody::ListGroups => ty::LIST_GROUPS,
            RequestBody::ListFiles { .. } => ty::LIST_FILES,
            RequestBody::UploadFile { .. } => ty::UPLOAD_FILE,
            RequestBody::StopShare { .. } => ty::STOP_SHARE,
            RequestBody::FileSharers { .. } => ty::FILE_SHARERS,
            RequestBody::Resume { .. } => ty::RESUME,
            RequestBody::ListPart { .. } => ty::LIST_PART,
        };
        let start = frame::begin(out, frame_type);
        put_u64(out, self.req_id);
        match &self.body {
            RequestBody::Ping | RequestBody::Logout | RequestBody::ListGroups => {}
            RequestBody::CreateUser { user, password } => {
                put_str16(out, user.as_str());
                put_bytes16(out, password.as_bytes());
            }
            RequestBody::Login {
                user,
                password,
                peer_addr,
                shares,
                client_key,
                link,
            } => {
                put_str16(out, user.as_str());
                put_bytes16(out, password.as_bytes());
                put_socket_addr(out, peer_addr);
                put_share_list(out, shares);
                out.extend_from_slice(client_key);
                put_optional_link(out, *link);
            }
            RequestBody::CreateGroup { group }
            | RequestBody::JoinGroup { group }
            | RequestBody::LeaveGroup { group }
            | RequestBody::ListRequests { group }
            | RequestBody::ListFiles { group } => put_str16(out, group.as_str()),
            RequestBody::AcceptRequest { group, user }
            | RequestBody::RejectRequest { group, user } => {
                put_str16(out, group.as_str());
                put_str16(out, user.as_str());
            }
            RequestBody::UploadFile { group, meta } => {
                put_str16(out, group.as_str());
                meta.emit(out);
            }
            RequestBody::StopShare { group, name } | RequestBody::FileSharers { group, name } => {
                put_str16(out, group.as_str());
                put_str16(out, name.as_str());
            }
            RequestBody::Resume { token, link } => {
                out.extend_from_slice(token);
                put_optional_link(out, *link);
            }
            RequestBody::ListPart { listing, from } => {
                match listing {
                    Listing::Groups => put_u8(out, 1),
                    Listing::Requests(group) => {
                        put_u8(out, 2);
                        put_str16(out, group.as_str());
                    }
                    Listing::Files(group) => {
                        put_u8(out, 3);
                        put_str16(out, group.as_str());
                    }
                }
                put_u32(out, *from);
            }
        }
        frame::end(out, start);
    }
}

impl TrackerMsg {
    /// Parses a frame payload (type byte + body).
    pub fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        let (frame_type, body) = frame::split(payload)?;
        let mut r = Reader::new(body);
        let msg = if frame_type == ty::WELCOME {
            let magic = r.u32()?;
            if magic != PROTOCOL_MAGIC {
                return Err(DecodeError::BadMagic(magic));
            }
            TrackerMsg::Welcome {
                version: r.u16()?,
                tracker_no: r.u16()?,
            }
        } else {
            let req_id = r.u64()?;
            let body = parse_reply_body(frame_type, &mut r)?;
            TrackerMsg::Reply(Reply { req_id, body })
        };
        r.finish()?;
        Ok(msg)
    }

    /// Appends the whole frame (length prefix included) to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        match self {
            TrackerMsg::Welcome {
                version,
                tracker_no,
            } => {
                let start = frame::begin(out, ty::WELCOME);
                put_u32(out, PROTOCOL_MAGIC);
                put_u16(out, *version);
                put_u16(out, *tracker_no);
                frame::end(out, start);
            }
            TrackerMsg::Reply(reply) => reply.emit(out),
        }
    }
}

/// A reply's body of type `frame_type` (after its `req_id`).
fn parse_reply_body(frame_type: u8, r: &mut Reader<'_>) -> Result<ReplyBody, DecodeError> {
    Ok(match frame_type {
        ty::DONE => ReplyBody::Done,
        ty::REFUSED => ReplyBody::Refused {
            code: RejectCode::from_u16(r.u16()?),
            message: r.str16(MAX_MESSAGE_LEN)?.to_owned(),
        },
        ty::PONG => ReplyBody::Pong,
        ty::LOGGED_IN => ReplyBody::LoggedIn { token: r.array()? },
        ty::GROUPS => {
            let n = r.count(2 + 1 + 2 + 1 + 4 + 1)?;
            let mut groups = Vec::with_capacity(n);
            for _ in 0..n {
                groups.push(GroupInfo {
                    group: group_id(r)?,
                    owner: user_id(r)?,
                    n_members: r.u32()?,
                    relation: match r.u8()? {
                        0 => Relation::None,
                        1 => Relation::Requested,
                        2 => Relation::Member,
                        3 => Relation::Owner,
                        _ => return Err(DecodeError::BadValue("relation")),
                    },
                });
            }
            ReplyBody::Groups(groups)
        }
        ty::USERS => {
            let n = r.count(2 + 1)?;
            let mut users = Vec::with_capacity(n);
            for _ in 0..n {
                users.push(user_id(r)?);
            }
            ReplyBody::Users(users)
        }
        ty::FILES => {
            let n = r.count(2 + 1 + 8 + 4 + 4 + 20)?;
            let mut files = Vec::with_capacity(n);
            for _ in 0..n {
                files.push(FileInfo {
                    name: file_name(r)?,
                    size: r.u64()?,
                    n_online: r.u32()?,
                    n_sharers: r.u32()?,
                    file_sha1: r.sha1()?,
                });
            }
            ReplyBody::Files(files)
        }
        ty::SHARED => ReplyBody::Shared {
            new_file: r.bool()?,
        },
        ty::SHARERS => {
            let meta = FileMeta::parse(r)?;
            // The smallest address is 1 + 4 + 2 bytes.
            let n = r.count(7)?;
            let mut peers = Vec::with_capacity(n);
            for _ in 0..n {
                peers.push(r.socket_addr()?);
            }
            let ticket = match r.bool()? {
                true => Some(Box::new(Ticket::read(r)?)),
                false => None,
            };
            let m = r.count(32)?;
            if m != peers.len() {
                return Err(DecodeError::BadValue("sharer key count"));
            }
            let mut peer_keys = Vec::with_capacity(m);
            for _ in 0..m {
                peer_keys.push(r.array()?);
            }
            ReplyBody::Sharers {
                meta,
                peers,
                ticket,
                peer_keys,
            }
        }
        ty::PART => {
            let next = r.u32()?;
            let items = match r.u8()? {
                t @ (ty::GROUPS | ty::USERS | ty::FILES) => parse_reply_body(t, r)?,
                _ => return Err(DecodeError::BadValue("listing part")),
            };
            ReplyBody::Part {
                next,
                items: Box::new(items),
            }
        }
        other => return Err(DecodeError::UnknownType(other)),
    })
}

impl Reply {
    /// An upper bound of the bytes [`emit`](Self::emit) writes (frame header included),
    /// without writing them: what the tracker counts against a connection's output cap.
    pub fn size_bound(&self) -> usize {
        const HEADER: usize = 4 + 1 + 8;
        HEADER + body_bound(&self.body)
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        let start = frame::begin(out, reply_type(&self.body));
        put_u64(out, self.req_id);
        emit_reply_body(&self.body, out);
        frame::end(out, start);
    }
}

/// The type byte of a reply with `body`.
fn reply_type(body: &ReplyBody) -> u8 {
    match body {
        ReplyBody::Done => ty::DONE,
        ReplyBody::Refused { .. } => ty::REFUSED,
        ReplyBody::Pong => ty::PONG,
        ReplyBody::LoggedIn { .. } => ty::LOGGED_IN,
        ReplyBody::Groups(_) => ty::GROUPS,
        ReplyBody::Users(_) => ty::USERS,
        ReplyBody::Files(_) => ty::FILES,
        ReplyBody::Shared { .. } => ty::SHARED,
        ReplyBody::Sharers { .. } => ty::SHARERS,
        ReplyBody::Part { .. } => ty::PART,
    }
}

/// Writes a reply's body (what follows its `req_id`).
fn emit_reply_body(body: &ReplyBody, out: &mut Vec<u8>) {
    match body {
        ReplyBody::Done | ReplyBody::Pong => {}
        ReplyBody::Refused { code, message } => {
            put_u16(out, code.to_u16());
            // Cut an over-long reason at a character boundary so it always parses.
            let mut cut = message.len().min(MAX_MESSAGE_LEN);
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            put_str16(out, message.get(..cut).unwrap_or(""));
        }
        ReplyBody::LoggedIn { token } => out.extend_from_slice(token),
        ReplyBody::Groups(groups) => {
            put_count(out, groups.len());
            for g in groups {
                put_str16(out, g.group.as_str());
                put_str16(out, g.owner.as_str());
                put_u32(out, g.n_members);
                put_u8(out, g.relation as u8);
            }
        }
        ReplyBody::Users(users) => {
            put_count(out, users.len());
            for u in users {
                put_str16(out, u.as_str());
            }
        }
        ReplyBody::Files(files) => {
            put_count(out, files.len());
            for f in files {
                put_str16(out, f.name.as_str());
                put_u64(out, f.size);
                put_u32(out, f.n_online);
                put_u32(out, f.n_sharers);
                put_sha1(out, &f.file_sha1);
            }
        }
        ReplyBody::Shared { new_file } => put_bool(out, *new_file),
        ReplyBody::Sharers {
            meta,
            peers,
            ticket,
            peer_keys,
        } => {
            meta.emit(out);
            put_count(out, peers.len());
            for p in peers {
                put_socket_addr(out, p);
            }
            put_bool(out, ticket.is_some());
            if let Some(ticket) = ticket {
                ticket.emit(out);
            }
            put_count(out, peer_keys.len());
            for k in peer_keys {
                out.extend_from_slice(k);
            }
        }
        ReplyBody::Part { next, items } => {
            put_u32(out, *next);
            put_u8(out, reply_type(items));
            emit_reply_body(items, out);
        }
    }
}

/// An upper bound of a reply body's encoded bytes.
fn body_bound(body: &ReplyBody) -> usize {
    const ADDR: usize = 1 + 16 + 2;
    let body = match body {
        ReplyBody::Done | ReplyBody::Pong => 0,
        ReplyBody::Refused { message, .. } => 2 + 2 + message.len().min(MAX_MESSAGE_LEN),
        ReplyBody::LoggedIn { token } => token.len(),
        ReplyBody::Groups(groups) => {
            4 + groups
                .iter()
                .map(|g| 2 + g.group.as_str().len() + 2 + g.owner.as_str().len() + 4 + 1)
                .sum::<usize>()
        }
        ReplyBody::Users(users) => 4 + users.iter().map(|u| 2 + u.as_str().len()).sum::<usize>(),
        ReplyBody::Files(files) => {
            4 + files
                .iter()
                .map(|f| 2 + f.name.as_str().len() + 8 + 4 + 4 + 20)
                .sum::<usize>()
        }
        ReplyBody::Shared { .. } => 1,
        ReplyBody::Part { items, .. } => 4 + 1 + body_bound(items),
        ReplyBody::Sharers {
            meta,
            peers,
            ticket,
            ..
        } => {
            2 + meta.name.as_str().len()
                + 8
                + 4
                + 20
                + 4
                + 20 * meta.piece_hashes.len()
                + 4
                + ADDR * peers.len()
                + 1
                + ticket.as_ref().map_or(0, |_| MAX_TICKET_LEN)
                + 4
                + 32 * peers.len()
        }
    };
    body
}

#[cfg(test)]
#[path = "tracker_link_tests.rs"]
mod tests;

/// A list of shares: `u32 n | (str group | str name) * n`.
pub(crate) fn put_share_list(out: &mut Vec<u8>, shares: &[(GroupId, FileName)]) {
    put_count(out, shares.len());
    for (group, name) in shares {
        put_str16(out, group.as_str());
        put_str16(out, name.as_str());
    }
}

/// Reads what [`put_share_list`] wrote; the count is checked against the bytes left (each
/// pair takes at least 6) before anything is allocated.
pub(crate) fn share_list(r: &mut Reader<'_>) -> Result<Vec<(GroupId, FileName)>, DecodeError> {
    let n = r.count(2 + 1 + 2 + 1)?;
    let mut shares = Vec::with_capacity(n);
    for _ in 0..n {
        shares.push((group_id(r)?, file_name(r)?));
    }
    Ok(shares)
}
