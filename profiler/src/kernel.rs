//! What the kernel and our privileges allow: effective capabilities, BTF, tracefs and the
//! tracepoints the probes attach to. Used before attaching (to fail with one clear line) and by
//! `doctor`.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use profiler_common::POLL_SYSCALLS;

/// `CAP_SYS_ADMIN`: covers BPF and perf events on its own.
const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_PERFMON`: perf events and tracing programs (kernel 5.8+).
const CAP_PERFMON: u32 = 38;
/// `CAP_BPF`: loading programs and creating maps (kernel 5.8+).
const CAP_BPF: u32 = 39;

/// Where the kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Where tracefs is mounted, in the order aya looks.
pub const TRACEFS_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "missing privileges: need CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), missing {missing}; \
         run as root or grant them with `setcap cap_bpf,cap_perfmon,cap_sys_ptrace+ep`"
    )]
    MissingPrivileges { missing: String },
    #[error("cannot read our own capabilities from `/proc/self/status`")]
    CapabilitiesUnreadable {
        #[source]
        cause: io::Error,
    },
    #[error(
        "kernel BTF not found at `{path}`: this kernel was built without CONFIG_DEBUG_INFO_BTF, \
         which redis-stallprof needs"
    )]
    NoBtf { path: PathBuf },
    #[error(
        "tracefs is not mounted (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing); \
         mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    NoTracefs,
    #[error("the kernel lacks the tracepoint `{category}:{name}` (no `{path}`)")]
    MissingTracepoint {
        category: &'static str,
        name: String,
        path: PathBuf,
    },
}

/// Effective capability bits of this process.
pub fn effective_capabilities() -> Result<u64, KernelError> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|source| KernelError::CapabilitiesUnreadable { cause: source })?;
    parse_effective_capabilities(&status).ok_or_else(|| KernelError::CapabilitiesUnreadable {
        cause: io::Error::new(io::ErrorKind::InvalidData, "no CapEff line"),
    })
}

fn parse_effective_capabilities(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Fails unless the capabilities needed to load and attach the probes are effective.
pub fn check_privileges(effective: u64) -> Result<(), KernelError> {
    let has = |capability: u32| effective & (1 << capability) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|&(capability, _)| !has(capability))
        .map(|(_, name)| name)
        .collect();
    Err(KernelError::MissingPrivileges {
        missing: missing.join(" and "),
    })
}

/// Fails unless the kernel's BTF is readable at `path`.
pub fn check_btf(path: &Path) -> Result<(), KernelError> {
    match fs::metadata(path) {
        Ok(metadata) if metadata.len() > 0 => Ok(()),
        _ => Err(KernelError::NoBtf {
            path: path.to_owned(),
        }),
    }
}

/// The first of `mounts` that exists and is not empty (tracefs), as aya finds it.
pub fn find_tracefs(mounts: &[&str]) -> Result<PathBuf, KernelError> {
    mounts
        .iter()
        .map(PathBuf::from)
        .find(|mount| fs::read_dir(mount).is_ok_and(|mut entries| entries.next().is_some()))
        .ok_or(KernelError::NoTracefs)
}

/// Tracepoints (category, name) beyond the poll ones that `attach` needs: madvise timing,
/// handshakes completing on the target's ports, and the target's accepts.
pub const OTHER_TRACEPOINTS: [(&str, &str); 7] = [
    ("syscalls", "sys_enter_madvise"),
    ("syscalls", "sys_exit_madvise"),
    ("sock", "inet_sock_set_state"),
    ("syscalls", "sys_enter_accept4"),
    ("syscalls", "sys_exit_accept4"),
    ("syscalls", "sys_enter_accept"),
    ("syscalls", "sys_exit_accept"),
];

/// Fails unless the kernel has every tracepoint in `tracepoints`.
pub fn check_tracepoints(
    tracefs: &Path,
    tracepoints: &[(&'static str, &str)],
) -> Result<(), KernelError> {
    for &(category, name) in tracepoints {
        let path = tracefs.join("events").join(category).join(name).join("id");
        if !path.exists() {
            return Err(KernelError::MissingTracepoint {
                category,
                name: name.to_owned(),
                path,
            });
        }
    }
    Ok(())
}

/// The `syscalls` tracepoint on the entry of a poll system call (`sys_enter_<syscall>`).
pub fn poll_tracepoint_name(syscall: &str) -> String {
    format!("sys_enter_{syscall}")
}

/// The poll entry tracepoints (see [`POLL_SYSCALLS`]) this kernel has; fails naming the first
/// required one it lacks.
pub fn poll_tracepoints(tracefs: &Path) -> Result<Vec<String>, KernelError> {
    let mut found = Vec::new();
    for (syscall, _, required) in POLL_SYSCALLS {
        let name = poll_tracepoint_name(syscall);
        let path = tracefs.join("events/syscalls").join(&name).join("id");
        if path.exists() {
            found.push(name);
        } else if required {
            return Err(KernelError::MissingTracepoint {
                category: "syscalls",
                name,
                path,
            });
        } else {
            log::debug!("optional tracepoint syscalls:{name} is absent");
        }
    }
    Ok(found)
}

/// Runs every check `attach` needs, in the order a user would fix them; returns the poll
/// tracepoints to attach to.
pub fn preflight() -> Result<Vec<String>, KernelError> {
    check_privileges(effective_capabilities()?)?;
    check_btf(Path::new(VMLINUX_BTF))?;
    let tracefs = find_tracefs(&TRACEFS_MOUNTS)?;
    let poll = poll_tracepoints(&tracefs)?;
    check_tracepoints(&tracefs, &OTHER_TRACEPOINTS)?;
    Ok(poll)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_split_capabilities_pass() {
        assert!(check_privileges(1 << CAP_SYS_ADMIN).is_ok());
        assert!(check_privileges(1 << CAP_BPF | 1 << CAP_PERFMON).is_ok());
    }

    #[test]
    fn missing_capabilities_are_named() {
        let error = check_privileges(1 << CAP_BPF).unwrap_err().to_string();
        assert!(error.contains("missing CAP_PERFMON"), "{error}");
        let error = check_privileges(0).unwrap_err().to_string();
        assert!(error.contains("missing CAP_BPF and CAP_PERFMON"), "{error}");
    }

    #[test]
    fn effective_capabilities_are_parsed_from_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_effective_capabilities(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_effective_capabilities("Name:\tx\n"), None);
    }

    #[test]
    fn missing_btf_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let error = check_btf(&dir.path().join("vmlinux"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("kernel BTF not found"), "{error}");
    }

    #[test]
    fn empty_tracefs_mounts_are_skipped() {
        let empty = tempfile::tempdir().unwrap();
        let mounted = tempfile::tempdir().unwrap();
        fs::write(mounted.path().join("trace"), "").unwrap();
        let mounts = [
            empty.path().to_str().unwrap(),
            mounted.path().to_str().unwrap(),
        ];
        assert_eq!(find_tracefs(&mounts).unwrap(), mounted.path());
        assert!(matches!(
            find_tracefs(&mounts[..1]),
            Err(KernelError::NoTracefs)
        ));
    }

    #[test]
    fn a_missing_required_tracepoint_is_named_and_optional_ones_are_skipped() {
        let tracefs = tempfile::tempdir().unwrap();
        let make = |name: &str| {
            let dir = tracefs.path().join("events/syscalls").join(name);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("id"), "1\n").unwrap();
        };
        for name in ["sys_enter_epoll_wait", "sys_exit_epoll_pwait"] {
            make(name);
        }
        let error = poll_tracepoints(tracefs.path()).unwrap_err().to_string();
        assert!(
            error.contains("`syscalls:sys_enter_epoll_pwait`"),
            "{error}"
        );
        make("sys_enter_epoll_pwait");
        let found = poll_tracepoints(tracefs.path()).unwrap();
        assert_eq!(found, ["sys_enter_epoll_wait", "sys_enter_epoll_pwait"]);
    }
}
