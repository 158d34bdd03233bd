//! Message types: each one's wire code and payload layout, which is all the frame
//! reader needs before it reads a payload (the fields are in `msg`).

use super::msg::{AUTH_BYTES, GENS_BYTES, HELLO_MIN_BYTES, MAX_DATA_BYTES, MAX_NAME_BYTES, MAX_REASON_BYTES};

/// A message type: its wire code and payload layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Kind {
    Hello,
    Ping,
    Pong,
    Bye,
    AuthChallenge,
    AuthResponse,
    Write,
    Trim,
    WriteZeroes,
    RecvAck,
    WriteAck,
    Barrier,
    BarrierAck,
    State,
    ResyncData,
    ResyncAck,
    ResyncDone,
    ResyncZeroes,
    BitmapBlock,
    BitmapDone,
    DigestReq,
    Digests,
    ReadReq,
    ReadData,
    StartRepair,
    Invalidate,
    SyncPause,
    ResyncInfo,
    ResyncFlush,
    ResyncFlushed,
    ConnectState,
    StatePrepare,
    StateReply,
    StateCommit,
    StateAbort,
    Ahead,
}

/// How a type's payload is laid out, which is all the frame reader needs to know
/// before reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Exactly this many bytes.
    Fixed(usize),
    /// Between `min` and `max` bytes (strings); the decoder checks the exact length.
    Var { min: usize, max: usize },
    /// A fixed part of this many bytes, then up to [`MAX_DATA_BYTES`] of data.
    Data { fixed: usize },
}

impl Kind {
    /// Every type, for tests and tables.
    pub const ALL: [Kind; 36] = [
        Kind::Hello,
        Kind::Ping,
        Kind::Pong,
        Kind::Bye,
        Kind::AuthChallenge,
        Kind::AuthResponse,
        Kind::Write,
        Kind::Trim,
        Kind::WriteZeroes,
        Kind::RecvAck,
        Kind::WriteAck,
        Kind::Barrier,
        Kind::BarrierAck,
        Kind::State,
        Kind::ResyncData,
        Kind::ResyncAck,
        Kind::ResyncDone,
        Kind::ResyncZeroes,
        Kind::BitmapBlock,
        Kind::BitmapDone,
        Kind::DigestReq,
        Kind::Digests,
        Kind::ReadReq,
        Kind::ReadData,
        Kind::StartRepair,
        Kind::Invalidate,
        Kind::SyncPause,
        Kind::ResyncInfo,
        Kind::ResyncFlush,
        Kind::ResyncFlushed,
        Kind::ConnectState,
        Kind::StatePrepare,
        Kind::StateReply,
        Kind::StateCommit,
        Kind::StateAbort,
        Kind::Ahead,
    ];

    /// The type code in the frame header.
    pub fn code(self) -> u16 {
        match self {
            Kind::Hello => 0x01,
            Kind::Ping => 0x02,
            Kind::Pong => 0x03,
            Kind::Bye => 0x04,
            Kind::AuthChallenge => 0x05,
            Kind::AuthResponse => 0x06,
            Kind::Write => 0x10,
            Kind::Trim => 0x11,
            Kind::WriteZeroes => 0x12,
            Kind::RecvAck => 0x13,
            Kind::WriteAck => 0x14,
            Kind::Barrier => 0x15,
            Kind::BarrierAck => 0x16,
            Kind::State => 0x17,
            Kind::ResyncData => 0x20,
            Kind::ResyncAck => 0x21,
            Kind::ResyncDone => 0x22,
            Kind::ResyncZeroes => 0x23,
            Kind::BitmapBlock => 0x24,
            Kind::BitmapDone => 0x25,
            Kind::DigestReq => 0x26,
            Kind::Digests => 0x27,
            Kind::StartRepair => 0x28,
            Kind::Invalidate => 0x29,
            Kind::SyncPause => 0x2a,
            Kind::ResyncInfo => 0x2b,
            Kind::ResyncFlush => 0x2c,
            Kind::ResyncFlushed => 0x2d,
            Kind::ReadReq => 0x2e,
            Kind::ReadData => 0x2f,
            Kind::ConnectState => 0x30,
            Kind::StatePrepare => 0x31,
            Kind::StateReply => 0x32,
            Kind::StateCommit => 0x33,
            Kind::StateAbort => 0x34,
            Kind::Ahead => 0x35,
        }
    }

    /// Decodes [`Kind::code`]; `None` for an unknown code.
    pub fn from_code(code: u16) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The type's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "Hello",
            Kind::Ping => "Ping",
            Kind::Pong => "Pong",
            Kind::Bye => "Bye",
            Kind::AuthChallenge => "AuthChallenge",
            Kind::AuthResponse => "AuthResponse",
            Kind::Write => "Write",
            Kind::Trim => "Trim",
            Kind::WriteZeroes => "WriteZeroes",
            Kind::RecvAck => "RecvAck",
            Kind::WriteAck => "WriteAck",
            Kind::Barrier => "Barrier",
            Kind::BarrierAck => "BarrierAck",
            Kind::State => "State",
            Kind::ResyncData => "ResyncData",
            Kind::ResyncAck => "ResyncAck",
            Kind::ResyncDone => "ResyncDone",
            Kind::ResyncZeroes => "ResyncZeroes",
            Kind::BitmapBlock => "BitmapBlock",
            Kind::BitmapDone => "BitmapDone",
            Kind::DigestReq => "DigestReq",
            Kind::Digests => "Digests",
            Kind::ReadReq => "ReadReq",
            Kind::ReadData => "ReadData",
            Kind::StartRepair => "StartRepair",
            Kind::Invalidate => "Invalidate",
            Kind::SyncPause => "SyncPause",
            Kind::ResyncInfo => "ResyncInfo",
            Kind::ResyncFlush => "ResyncFlush",
            Kind::ResyncFlushed => "ResyncFlushed",
            Kind::ConnectState => "ConnectState",
            Kind::StatePrepare => "StatePrepare",
            Kind::StateReply => "StateReply",
            Kind::StateCommit => "StateCommit",
            Kind::StateAbort => "StateAbort",
            Kind::Ahead => "Ahead",
        }
    }

    pub(crate) fn layout(self) -> Layout {
        match self {
            Kind::Hello => Layout::Var { min: HELLO_MIN_BYTES, max: HELLO_MIN_BYTES + 2 * MAX_NAME_BYTES },
            Kind::Bye => Layout::Var { min: 2, max: 2 + MAX_REASON_BYTES },
            Kind::Ping | Kind::Pong | Kind::RecvAck => Layout::Fixed(8),
            Kind::AuthChallenge | Kind::AuthResponse => Layout::Fixed(AUTH_BYTES),
            Kind::Write => Layout::Data { fixed: 25 },
            Kind::Trim | Kind::WriteZeroes => Layout::Fixed(33),
            Kind::WriteAck | Kind::BarrierAck => Layout::Fixed(12),
            Kind::Barrier => Layout::Fixed(9),
            Kind::State => Layout::Fixed(2),
            Kind::ResyncData => Layout::Data { fixed: 8 },
            Kind::ResyncAck => Layout::Fixed(20),
            Kind::ResyncDone => Layout::Fixed(GENS_BYTES),
            Kind::ResyncZeroes => Layout::Fixed(16),
            Kind::BitmapBlock => Layout::Data { fixed: 8 },
            Kind::BitmapDone | Kind::StartRepair | Kind::Invalidate | Kind::Ahead => Layout::Fixed(8),
            Kind::SyncPause => Layout::Fixed(1),
            Kind::ResyncInfo => Layout::Fixed(16),
            Kind::ResyncFlush | Kind::ResyncFlushed | Kind::StateCommit | Kind::StateAbort => {
                Layout::Fixed(8)
            }
            Kind::ConnectState => Layout::Fixed(GENS_BYTES + 6),
            Kind::StatePrepare => Layout::Fixed(10),
            Kind::StateReply => Layout::Var { min: 11, max: 11 + MAX_REASON_BYTES },
            Kind::DigestReq => Layout::Fixed(24),
            Kind::Digests => Layout::Data { fixed: 16 },
            Kind::ReadReq => Layout::Fixed(32),
            Kind::ReadData => Layout::Data { fixed: 12 },
        }
    }

    /// Whether this type's data may travel compressed (`Write`, `ResyncData`: the
    /// bulk of what a link carries; other data is small or already dense).
    pub fn compressible(self) -> bool {
        matches!(self, Kind::Write | Kind::ResyncData)
    }

    /// Whether a `replication-rate` paces this type: the frames of application
    /// writes (resync has its own rate; acks, barriers and keepalive never wait).
    pub fn paced(self) -> bool {
        matches!(self, Kind::Write | Kind::Trim | Kind::WriteZeroes)
    }

    /// Smallest and largest payload this type allows, in bytes.
    pub(crate) fn payload_bounds(self) -> (usize, usize) {
        match self.layout() {
            Layout::Fixed(n) => (n, n),
            Layout::Var { min, max } => (min, max),
            Layout::Data { fixed } => (fixed, fixed + MAX_DATA_BYTES),
        }
    }
}
