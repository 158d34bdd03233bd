//! The legacy ioctl interface to `/dev/nbdN` (type 0xab), for kernels or containers
//! without the `nbd` netlink family. The calling thread stays inside `NBD_DO_IT` for
//! as long as the device runs; there is no reconnect in this mode (the kernel tears
//! the device down when its socket dies), so `attach` says so when it falls back.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_CLEAR_QUE: libc::c_ulong = 0xab05;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

fn nbd_ioctl(dev: &File, request: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the nbd ioctls take an integer argument (no pointers); dev is open.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), request as _, arg) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// A device configured through ioctls, ready for [`Configured::run`].
#[derive(Debug)]
pub struct Configured {
    dev: File,
}

/// Sets size, block size, timeout, flags and sockets.
pub fn configure(
    path: &Path,
    size_bytes: u64,
    block_size_bytes: u64,
    timeout_secs: u64,
    server_flags: u64,
    fds: &[RawFd],
) -> io::Result<Configured> {
    let dev = File::options().read(true).write(true).open(path)?;
    nbd_ioctl(&dev, NBD_SET_BLKSIZE, block_size_bytes as libc::c_ulong)?;
    nbd_ioctl(&dev, NBD_SET_SIZE_BLOCKS, (size_bytes / block_size_bytes) as libc::c_ulong)?;
    nbd_ioctl(&dev, NBD_SET_TIMEOUT, timeout_secs as libc::c_ulong)?;
    nbd_ioctl(&dev, NBD_SET_FLAGS, server_flags as libc::c_ulong)?;
    for fd in fds {
        if let Err(e) = nbd_ioctl(&dev, NBD_SET_SOCK, *fd as libc::c_ulong) {
            let _ = nbd_ioctl(&dev, NBD_CLEAR_SOCK, 0);
            return Err(e);
        }
    }
    Ok(Configured { dev })
}

impl Configured {
    /// Runs the device until it is disconnected (blocks), then clears it.
    pub fn run(self) -> io::Result<()> {
        let result = nbd_ioctl(&self.dev, NBD_DO_IT, 0);
        let _ = nbd_ioctl(&self.dev, NBD_CLEAR_QUE, 0);
        let _ = nbd_ioctl(&self.dev, NBD_CLEAR_SOCK, 0);
        result
    }
}

/// Asks a running device to disconnect (works for netlink-bound devices too).
pub fn disconnect(path: &Path) -> io::Result<()> {
    let dev = File::options().read(true).write(true).open(path)?;
    nbd_ioctl(&dev, NBD_DISCONNECT, 0)
}
