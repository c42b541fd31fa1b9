//! Dropping the capabilities a run no longer needs once its probes are attached.
//!
//! Attaching needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN). Afterwards the run only reads
//! what it already holds (the ring buffer, maps, perf events) and the target's `/proc` files,
//! so it keeps just:
//! - CAP_SYS_ADMIN: `/proc/PID/map_files` (the target's executable and libraries, wherever its
//!   mount namespace puts them), and `setns` into a followed target's network namespace;
//! - CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE: the target's `/proc/PID/{maps,fd}`
//!   when it runs as another user, and reopening the outputs on SIGHUP;
//! - CAP_SYSLOG: kernel addresses in `/proc/kallsyms`, to name kernel frames;
//! - with `--follow`, CAP_BPF and CAP_PERFMON too, to attach to the next process.
//!
//! Everything else leaves the effective, permitted, inheritable and bounding sets (the bounding
//! set when CAP_SETPCAP allows it, as for root), so an `--alert-exec` command (started later,
//! by a thread that inherits them) cannot regain it.
//! Capabilities are per thread: this runs before the run starts any thread of its own.
use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities kept after attaching.
fn kept(follow: bool) -> CapsHashSet {
    let mut kept: CapsHashSet = [
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_SYS_PTRACE,
        Capability::CAP_DAC_READ_SEARCH,
        Capability::CAP_DAC_OVERRIDE,
        Capability::CAP_SYSLOG,
    ]
    .into_iter()
    .collect();
    if follow {
        kept.extend([Capability::CAP_BPF, Capability::CAP_PERFMON]);
    }
    kept
}

/// Drops every capability not [`kept`]; returns those dropped from the permitted set.
pub fn drop_after_attach(follow: bool) -> Result<Vec<Capability>, caps::errors::CapsError> {
    let kept = kept(follow);
    let permitted = caps::read(None, CapSet::Permitted)?;
    // The bounding set first: removing from it needs CAP_SETPCAP, which goes next. Without it
    // (capabilities granted to the file, not root) the bounding set stays as it is.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        for capability in caps::read(None, CapSet::Bounding)?.difference(&kept) {
            caps::drop(None, CapSet::Bounding, *capability)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let remaining: CapsHashSet = permitted.intersection(&kept).copied().collect();
    caps::set(None, CapSet::Effective, &remaining)?;
    caps::set(None, CapSet::Permitted, &remaining)?;
    let mut dropped: Vec<Capability> = permitted.difference(&kept).copied().collect();
    dropped.sort_by_key(|capability| capability.index());
    Ok(dropped)
}

/// Empties the calling thread's effective, permitted and inheritable sets (for a thread that
/// needs no privilege, such as the metrics server's; the other threads keep theirs).
pub fn drop_all_in_this_thread() -> Result<(), caps::errors::CapsError> {
    caps::clear(None, CapSet::Inheritable)?;
    caps::clear(None, CapSet::Effective)?;
    caps::clear(None, CapSet::Permitted)
}
