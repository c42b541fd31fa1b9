//! Opening a file a target maps (its executable, its libraries), for unwind tables and tail
//! calls, without trusting the target. The profiler runs as root and the target may be any
//! process named like a Redis server, so the file is hostile input:
//! - it is opened through `/proc/PID/map_files/START-END`, which is the mapped file itself,
//!   or else by its path resolved inside the target's root (`openat2` with
//!   `RESOLVE_IN_ROOT`: no absolute link can lead out to the host's files);
//! - it must be a regular file (a FIFO planted at the path cannot hang the profiler: the open
//!   does not block) and, by its path, the very file the mapping names (device and inode);
//! - it is mapped, not read, and only up to [`MAX_MODULE_BYTES`] (a huge sparse file costs
//!   nothing).
use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
};

use crate::memory_map::Mapping;

/// The largest module mapped: a Redis binary is a few MiB, one with debug information some
/// tens; nothing legitimate comes near.
pub const MAX_MODULE_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ModuleFileError {
    #[error("cannot open `{path}`")]
    Open {
        path: String,
        #[source]
        cause: io::Error,
    },
    #[error("`{path}` is not a regular file")]
    NotRegular { path: String },
    #[error("`{path}` is not the file the process maps (another device or inode)")]
    Replaced { path: String },
    #[error("`{path}` is {bytes} bytes, more than the {MAX_MODULE_BYTES} read of a module")]
    TooLarge { path: String, bytes: u64 },
    #[error("cannot map `{path}`")]
    Map {
        path: String,
        #[source]
        cause: io::Error,
    },
}

/// A module's bytes, mapped read-only.
pub struct ModuleFile {
    map: memmap2::Mmap,
}

impl std::ops::Deref for ModuleFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl ModuleFile {
    /// The file behind `mapping` of process `pid` (see the module's notes).
    pub fn open(pid: u32, mapping: &Mapping) -> Result<Self, ModuleFileError> {
        let map_file = format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            mapping.start, mapping.end
        );
        // The mapped file itself; by path, whatever is there now, to be checked.
        let (file, path, by_path) = match open_nonblocking(&map_file) {
            Ok(file) => (file, map_file, false),
            Err(_) => {
                let path = format!("/proc/{pid}/root{}", mapping.path);
                let file =
                    open_in_root(pid, &mapping.path).map_err(|cause| ModuleFileError::Open {
                        path: path.clone(),
                        cause,
                    })?;
                (file, path, true)
            }
        };
        Self::map(file, path, |metadata| {
            !by_path || mapping.is_file(metadata.dev(), metadata.ino())
        })
    }

    /// The executable of process `pid`: `/proc/PID/exe` is the file itself.
    pub fn open_executable(pid: u32) -> Result<Self, ModuleFileError> {
        let path = format!("/proc/{pid}/exe");
        let file = open_nonblocking(&path).map_err(|cause| ModuleFileError::Open {
            path: path.clone(),
            cause,
        })?;
        Self::map(file, path, |_| true)
    }

    /// Maps `file` (opened from `path`) if it is a regular file `is_mapped` accepts, of at
    /// most [`MAX_MODULE_BYTES`].
    fn map(
        file: File,
        path: String,
        is_mapped: impl FnOnce(&std::fs::Metadata) -> bool,
    ) -> Result<Self, ModuleFileError> {
        let metadata = file.metadata().map_err(|cause| ModuleFileError::Open {
            path: path.clone(),
            cause,
        })?;
        if !metadata.file_type().is_file() {
            return Err(ModuleFileError::NotRegular { path });
        }
        if !is_mapped(&metadata) {
            return Err(ModuleFileError::Replaced { path });
        }
        if metadata.len() > MAX_MODULE_BYTES {
            return Err(ModuleFileError::TooLarge {
                path,
                bytes: metadata.len(),
            });
        }
        // SAFETY: a private read-only mapping of a regular file. If its owner truncated it
        // while it is read, the access would fault (SIGBUS), as in every tool that maps ELF
        // files (blazesym, perf); see the guide's Security section (docs/guide.md).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|cause| ModuleFileError::Map { path, cause })?;
        Ok(Self { map })
    }
}

/// Opens `path` read-only without blocking (a FIFO or a device would otherwise wait).
fn open_nonblocking(path: &str) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// Opens `path` (absolute, as the process sees it) inside process `pid`'s root directory:
/// `..` and absolute symbolic links stay inside it, magic links are refused.
fn open_in_root(pid: u32, path: &str) -> io::Result<File> {
    let root = File::open(format!("/proc/{pid}/root"))?;
    let relative = CString::new(path.trim_start_matches('/'))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: `open_how` is plain integers; zero is a valid value of each.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    use std::os::fd::AsRawFd as _;
    // SAFETY: openat2 with a directory we own, a NUL-terminated path and a filled `open_how`
    // of the size given; a returned descriptor is owned at once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            relative.as_ptr(),
            &how,
            size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, owned by nothing else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_map::MemoryMap;

    /// The mapping of this test binary's own executable.
    fn own_executable() -> Mapping {
        let map = MemoryMap::read(std::process::id()).unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        map.mappings()
            .iter()
            .find(|mapping| mapping.path == exe.to_string_lossy())
            .unwrap()
            .clone()
    }

    #[test]
    fn a_mapped_file_is_opened_through_map_files_and_checked() {
        let mapping = own_executable();
        let module = ModuleFile::open(std::process::id(), &mapping).unwrap();
        assert_eq!(&module[..4], b"\x7fELF");
    }

    #[test]
    fn by_path_only_the_mapped_file_itself_is_opened_and_never_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let mut mapping = own_executable();
        // No such mapping: the path is used, inside our root; a FIFO there does not block.
        mapping.start = 0x1000;
        mapping.end = 0x2000;
        let fifo = dir.path().join("fifo");
        let fifo_path = CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a path we own.
        assert_eq!(unsafe { libc::mkfifo(fifo_path.as_ptr(), 0o600) }, 0);
        mapping.path = fifo.to_string_lossy().into_owned();
        let error = ModuleFile::open(std::process::id(), &mapping)
            .err()
            .unwrap();
        assert!(
            matches!(error, ModuleFileError::NotRegular { .. }),
            "{error}"
        );
        // Another file at the mapped path is not the mapped file.
        let other = dir.path().join("other");
        std::fs::write(&other, b"\x7fELF not the executable").unwrap();
        mapping.path = other.to_string_lossy().into_owned();
        let error = ModuleFile::open(std::process::id(), &mapping)
            .err()
            .unwrap();
        assert!(matches!(error, ModuleFileError::Replaced { .. }), "{error}");
    }
}
