//! Staying out of the memory-reclaim deadlock a process in the block I/O path can
//! cause (research `nbd-pacemaker.md` §2.5): when the kernel NBD client on the same
//! host writes back dirty pages, the pages can only be freed once this process
//! answers; if this process in turn blocks on reclaim, nothing moves. Used by
//! `blockd` (the server) and by `blockctl attach`'s resident (it must reconnect the
//! device while writeback waits on it).

use std::io;

/// `prctl(PR_SET_IO_FLUSHER)` (Linux 5.6): this process's allocations never wait on
/// I/O-issuing reclaim (`PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE`). Not in every libc
/// crate version, hence the literal.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// What to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoPathSafety {
    /// `mlockall(MCL_CURRENT | MCL_FUTURE)`: never page out this process.
    pub mlock: bool,
    /// Written to `/proc/self/oom_score_adj` (-1000: never chosen by the OOM killer).
    pub oom_score_adj: Option<i32>,
}

/// Applies `PR_SET_IO_FLUSHER` and the requested settings; returns one line per
/// setting that failed (each needs a capability: `CAP_SYS_RESOURCE`, or
/// `CAP_IPC_LOCK` / `RLIMIT_MEMLOCK` for mlock), for the caller to log. None of them
/// is fatal: without them the process still works, with the deadlock risk above.
pub fn protect_io_path(s: IoPathSafety) -> Vec<String> {
    let mut warnings = Vec::new();
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
        warnings.push(format!("PR_SET_IO_FLUSHER: {}", io::Error::last_os_error()));
    }
    if let Some(adj) = s.oom_score_adj
        && let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj.to_string())
    {
        warnings.push(format!("oom_score_adj {adj}: {e}"));
    }
    // SAFETY: mlockall takes flags only.
    if s.mlock && unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        warnings.push(format!("mlockall: {}", io::Error::last_os_error()));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_applied_or_reported() {
        // Raising the score needs no privilege, so this is checkable anywhere;
        // PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE and is only reported when missing.
        let warnings = protect_io_path(IoPathSafety { mlock: false, oom_score_adj: Some(500) });
        let now = std::fs::read_to_string("/proc/self/oom_score_adj").expect("proc");
        assert_eq!(now.trim(), "500", "warnings: {warnings:?}");
        assert!(warnings.iter().all(|w| w.starts_with("PR_SET_IO_FLUSHER")), "{warnings:?}");
        if warnings.is_empty() {
            // SAFETY: prctl with integer arguments only.
            assert_eq!(unsafe { libc::prctl(PR_SET_IO_FLUSHER + 1, 0, 0, 0, 0) }, 1, "PR_GET_IO_FLUSHER");
        }
    }
}
