//! Errors: the NBD error values a reply can carry, and the crate's own error type.

/// An error value in an NBD reply (`doc/proto.md` "Error values").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl NbdError {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Maps an OS errno from the storage layer, following nbdkit's `nbd_errno`:
    /// `ENOTSUP` is only passed through for a FAST_ZERO request (anywhere else the
    /// protocol reserves it), and an unknown failure is an I/O error.
    pub fn from_errno(errno: i32, fast_zero: bool) -> NbdError {
        match errno {
            libc_consts::EPERM | libc_consts::EROFS => NbdError::Perm,
            libc_consts::ENOSPC | libc_consts::EDQUOT | libc_consts::EFBIG => NbdError::NoSpc,
            libc_consts::ENOMEM => NbdError::NoMem,
            libc_consts::EINVAL => NbdError::Inval,
            libc_consts::ESHUTDOWN => NbdError::Shutdown,
            libc_consts::ENOTSUP if fast_zero => NbdError::NotSup,
            libc_consts::ENOTSUP => NbdError::Inval,
            libc_consts::EOVERFLOW => NbdError::Inval,
            _ => NbdError::Io,
        }
    }

    /// Decodes a reply's error field; unknown values are EINVAL, as the spec tells
    /// clients to treat them.
    pub fn from_code(code: u32) -> NbdError {
        match code {
            1 => NbdError::Perm,
            5 => NbdError::Io,
            12 => NbdError::NoMem,
            28 => NbdError::NoSpc,
            75 => NbdError::Overflow,
            95 => NbdError::NotSup,
            108 => NbdError::Shutdown,
            _ => NbdError::Inval,
        }
    }
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            NbdError::Perm => "EPERM",
            NbdError::Io => "EIO",
            NbdError::NoMem => "ENOMEM",
            NbdError::Inval => "EINVAL",
            NbdError::NoSpc => "ENOSPC",
            NbdError::Overflow => "EOVERFLOW",
            NbdError::NotSup => "ENOTSUP",
            NbdError::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

/// Linux errno values (the crate avoids a libc dependency for a handful of numbers;
/// blockd only runs on Linux).
mod libc_consts {
    pub const EPERM: i32 = 1;
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EOVERFLOW: i32 = 75;
    pub const ENOTSUP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const EDQUOT: i32 = 122;
}

/// Why a connection ended abnormally, or the server could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake timed out after {0} ms")]
    HandshakeTimeout(u64),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("server refused: {0}")]
    Refused(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_follows_nbdkit() {
        assert_eq!(NbdError::from_errno(30, false), NbdError::Perm);
        assert_eq!(NbdError::from_errno(122, false), NbdError::NoSpc);
        assert_eq!(NbdError::from_errno(95, true), NbdError::NotSup);
        assert_eq!(NbdError::from_errno(95, false), NbdError::Inval);
        assert_eq!(NbdError::from_errno(5, false), NbdError::Io);
        assert_eq!(NbdError::from_errno(1234, false), NbdError::Io);
        assert_eq!(NbdError::from_code(99), NbdError::Inval);
    }
}
