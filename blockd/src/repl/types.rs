//! The core's interface: the events it takes, the actions it returns, the
//! commands it decides, and its settings (re-exported by `repl::core`).

use nbd_server::NbdError;
use nbd_server::buf::{Buf, BufMut};
use nix::errno::Errno;

use crate::config::{IoErrorPolicy, Protocol};
use crate::meta::BitmapBlock;
use crate::peer::msg::Message;
use crate::state::{DiskState, Generations};
use crate::storage::IoOp;

use super::JobId;

/// An NBD request as the core sees it (validated by nbd-server).
#[derive(Debug)]
pub enum Request {
    /// Only for a Primary whose disk cannot serve it (detached, or the read
    /// failed): reads otherwise bypass the core.
    Read {
        offset: u64,
        buf: BufMut,
    },
    Write {
        offset: u64,
        data: Buf,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    },
    Flush,
}

/// Everything that can happen to the core.
#[derive(Debug)]
pub enum Event {
    /// A client request (the shell holds its responder under `job`).
    Nbd { job: JobId, request: Request },
    /// A local storage op of `job` finished; `buf` is the op's buffer coming back.
    LocalDone { job: JobId, result: Result<(), Errno>, buf: Option<BufMut> },
    /// A peer link is up (the shell holds no other): the core tells the peer its
    /// state and decides once it has the peer's (`repl::connect`).
    LinkUp,
    /// A message from the peer.
    PeerMessage(Message),
    /// The link wrote `bytes` of queued frames to the socket.
    PeerSent { bytes: u64 },
    /// The link is gone.
    LinkDown,
    /// The metadata update with this sequence number was carried out: durable, or
    /// failed with the error's text.
    MetaDone { seq: u64, result: Result<(), String> },
    /// An operator command (`blockctl`); `Action::Done { id }` answers it.
    Command { id: CmdId, cmd: Command },
    /// Before a clean stop: make every write so far durable locally and on the peer
    /// under any protocol; `Reply { job }` comes when done (or the peer is gone).
    Drain { job: JobId },
    /// The fence-peer handler returned (`Ok(exit code)`), or could not be run or timed
    /// out (`Err`). Either way, writes are acknowledged again.
    FenceDone { result: Result<i32, String> },
    /// A client read served straight from the local disk failed with `errno` (the
    /// client has its error): the failure policy applies (`repl::failure`).
    ReadFailed { offset: u64, errno: Errno },
    /// Time passed (the core reads no clock): drives the resync rate, its measured
    /// rate, and lazy bitmap writes. `app_requests`: NBD requests (reads included)
    /// since the last tick, for the `auto` resync rate.
    Tick { elapsed_ms: u64, app_requests: u64 },
    /// The undo journal of the running catch-up (`Action::CatchUpBegin`) could not
    /// be kept (full, or an I/O error on it): there is no fallback image now.
    FallbackLost { reason: String },
    /// `Action::RollBack` is done: the disk holds the image from before the
    /// catch-up again; `Ok` carries the ranges it restored.
    RolledBack { result: Result<Vec<std::ops::Range<u64>>, String> },
}

/// How an NBD request ends.
#[derive(Debug)]
pub enum Outcome {
    Ok,
    /// A read's data (served through the peer).
    Read(BufMut),
    Error(NbdError),
}

/// What the shell must do.
#[derive(Debug)]
pub enum Action {
    /// Submit `op` to local storage; its completion comes back as `LocalDone { job }`.
    Local { job: JobId, op: IoOp },
    /// Queue `msg` for the peer (its frame size counts against the send buffer).
    Send(Message),
    /// Answer the NBD request `job`.
    Reply { job: JobId, outcome: Outcome },
    /// Make this state durable (metadata update + fsync), then send
    /// `MetaDurable { seq }`. Every metadata action (`Persist`, `WriteBitmap`,
    /// `WriteAl`) is carried out in the order given.
    Persist { seq: u64, gens: Generations, disk: DiskState, was_primary: bool },
    /// Write these encoded bitmap blocks and fsync.
    WriteBitmap { seq: u64, blocks: Vec<BitmapBlock> },
    /// Record this hot-extent set as the activity log and fsync.
    WriteAl { seq: u64, extents: Vec<u32> },
    /// Run the `fence-peer` handler; `FenceDone` comes back when it returned.
    FencePeer,
    /// Run the `after-resync-target` handler (nothing waits for it).
    AfterResyncTarget,
    /// The answer to `Event::Command { id }`.
    Done { id: CmdId, result: Result<CmdOutput, String> },
    /// Close the peer link (sending `reason` to the peer first); no `LinkDown`
    /// follows for it.
    DropLink { reason: String },
    /// Whether the shell should connect to the peer at all (false: StandAlone).
    LinkPolicy { enabled: bool },
    /// A resync is about to overwrite this disk's consistent image: before any
    /// later `Local` write, trim or zeroes reaches the disk, keep the old contents
    /// of what it overwrites in an undo journal (`crate::undo`), durable before
    /// the overwrite. `discarded`: a split brain resolved against this node (the
    /// journal is kept at the end, for `blockctl export-discarded`).
    CatchUpBegin { discarded: bool },
    /// The catch-up ended (the target is UpToDate) or was rolled back: once the
    /// metadata update `after_seq` is durable, remove the journal (or keep it as a
    /// discarded node's data if it was begun so).
    CatchUpEnd { after_seq: u64 },
    /// `primary --force` on a target that has a fallback: write the journal's old
    /// contents back (durably); `Event::RolledBack` follows.
    RollBack,
}

/// Identifies an operator command until its `Action::Done`.
pub type CmdId = u64;

/// An operator command the core decides (SPEC §8 verbs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `primary [--force]`.
    Promote { force: bool },
    /// `secondary` (the shell has closed the NBD clients first).
    Demote,
    /// `connect [--discard-my-data]`: leave StandAlone.
    Connect { discard_my_data: bool },
    /// `disconnect`: drop the link and stay StandAlone.
    Disconnect,
    /// `invalidate`: this node's data is resynced in full from the peer.
    Invalidate,
    /// `invalidate-remote`: the peer's data is resynced in full from this node.
    InvalidateRemote,
    /// `pause-sync` (true) / `resume-sync` (false).
    SetSyncPaused(bool),
    /// `verify [--repair]`: answered when the verify ends.
    Verify { repair: bool },
    /// `detach-disk`: detach the local disk on purpose, as after an I/O error
    /// (refused on a Primary: it would fail closed).
    DetachDisk,
}

/// What a successful command reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdOutput {
    Done,
    Verified { verified_bytes: u64, out_of_sync_bytes: u64 },
}

/// The connection to the peer, as status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Trying to reach the peer (or a link is being set up).
    Connecting,
    /// Replicating.
    Connected,
    /// Not connecting: refused (split brain, …) or `blockctl disconnect`.
    StandAlone,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connecting => "Connecting",
            ConnState::Connected => "Connected",
            ConnState::StandAlone => "StandAlone",
        }
    }
}

/// The core's fixed settings.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub protocol: Protocol,
    /// Protocol A: bytes of frames queued but not yet written to the socket beyond
    /// which writes wait for their acknowledgement.
    pub send_buffer_bytes: u64,
    /// Dirty-set granularity (bytes per tracked unit).
    pub granularity_bytes: u64,
    /// The replicated device's size (a full sync covers it all).
    pub size_bytes: u64,
    /// Activity-log capacity in hot 4 MiB extents.
    pub al_extents: u32,
    /// Resync rate: `Some(bytes/s)` fixed, `None` auto (full speed while the
    /// application is idle, `resync_min_rate` while it does I/O).
    pub resync_rate_bytes_per_sec: Option<u64>,
    pub resync_min_rate_bytes_per_sec: u64,
    /// Checksum-based resync: only granules whose digests differ are sent.
    pub resync_checksum: bool,
    /// A `fence-peer` handler is configured (used with protocol C): a Primary that
    /// loses its peer runs it and acknowledges no write until it returned.
    pub fence_peer: bool,
    /// This node's name sorts before the peer's (a tie-break both sides agree on).
    pub name_sorts_first: bool,
    /// `on-io-error`: what an I/O error on this node's disk does (`repl::failure`).
    pub on_io_error: IoErrorPolicy,
    /// `ack-timeout`: a peer that leaves a replicated write, barrier, resync chunk
    /// or read unanswered this long is disconnected.
    pub ack_timeout_ms: u64,
    /// Protocol A with `on-congestion = "pull-ahead"`: the `congestion-fill` beyond
    /// which the Primary pulls ahead of its peer (`repl::ahead`); `None`: block.
    pub pull_ahead_fill_bytes: Option<u64>,
    /// Known defects the simulator's own tests put back, to show it catches each.
    /// Always off outside those tests (no config key or flag reaches it).
    #[doc(hidden)]
    pub bugs: InjectedBugs,
}

/// See [`CoreConfig::bugs`].
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// The Secondary acknowledges a write (protocol C) before it completes.
    pub ack_before_write: bool,
    /// The resync source skips every third chunk (clears its bits unsent).
    pub skip_chunk: bool,
    /// A promotion while connected does not ask the peer.
    pub promotion_skips_peer: bool,
    /// A completion of an earlier link is taken for the current link's.
    pub accept_stale_completion: bool,
    /// The Secondary starts the writes of a later epoch without waiting for the
    /// current one.
    pub apply_out_of_order: bool,
    /// A Primary pulled ahead does not record its unshipped writes in the bitmap.
    pub ahead_forgets_writes: bool,
}

/// Whether and how the peer takes part in the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// No peer connection.
    Disconnected,
    /// A link is up; the states are being exchanged (nothing is replicated yet).
    Negotiating,
    /// Connected and replicating every write.
    Replicating,
}
