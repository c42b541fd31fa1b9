//! A process's executable mappings, from `/proc/PID/maps`: which file (module) holds an
//! address, and where in that file. Used to load unwind tables and to name frames that have no
//! symbol (`module+0xoffset`).
use std::{fs, io};

use crate::stack::Frame;

/// One executable, file-backed mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub file_offset: u64,
    /// The path as the process sees it (`/usr/bin/redis-server`).
    pub path: String,
    /// A name for people other than the file name (the process's own executable).
    pub name: Option<String>,
    /// The file's device (`major:minor` in the maps, as `st_dev`) and inode.
    pub device: u64,
    pub inode: u64,
}

impl Mapping {
    /// The module's name for people: the file name, or the process name for its executable.
    pub fn module_name(&self) -> &str {
        self.name
            .as_deref()
            .unwrap_or_else(|| self.path.rsplit('/').next().unwrap_or(&self.path))
    }

    /// Whether the file with this device and inode is the one mapped.
    pub fn is_file(&self, device: u64, inode: u64) -> bool {
        (self.device, self.inode) == (device, inode)
    }
}

/// The executable mappings of a process, sorted by address.
#[derive(Debug, Clone, Default)]
pub struct MemoryMap {
    mappings: Vec<Mapping>,
}

impl MemoryMap {
    /// Reads `/proc/PID/maps`. The process's own executable is named after the process
    /// (`comm`): Debian's `redis-server` is a link to `redis-check-rdb`, and people look for
    /// `redis-server`.
    pub fn read(pid: u32) -> io::Result<Self> {
        let mut map = Self::parse(&fs::read_to_string(format!("/proc/{pid}/maps"))?);
        let exe = fs::read_link(format!("/proc/{pid}/exe"));
        let comm = fs::read_to_string(format!("/proc/{pid}/comm"));
        if let (Ok(exe), Ok(comm)) = (exe, comm) {
            map.name_executable(&exe.to_string_lossy(), comm.trim());
        }
        Ok(map)
    }

    /// Gives the mappings of `exe_path` the module name `name`.
    fn name_executable(&mut self, exe_path: &str, name: &str) {
        let exe_path = exe_path.trim_end_matches(" (deleted)");
        for mapping in self
            .mappings
            .iter_mut()
            .filter(|mapping| mapping.path == exe_path)
        {
            mapping.name = Some(name.to_owned());
        }
    }

    /// Parses the text of a `maps` file, keeping executable mappings of files.
    pub fn parse(maps: &str) -> Self {
        let mut mappings: Vec<Mapping> = maps.lines().filter_map(parse_line).collect();
        mappings.sort_by_key(|mapping| mapping.start);
        Self { mappings }
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// The mapping holding `address`.
    pub fn find(&self, address: u64) -> Option<&Mapping> {
        let index = self
            .mappings
            .partition_point(|mapping| mapping.start <= address)
            .checked_sub(1)?;
        let mapping = &self.mappings[index];
        (address < mapping.end).then_some(mapping)
    }

    /// The frame of an address no symbol covers: its module and file offset, or unknown
    /// outside every mapping.
    pub fn unnamed_frame(&self, address: u64) -> Frame {
        match self.find(address) {
            Some(mapping) => Frame::Unnamed {
                module: mapping.module_name().into(),
                offset: address - mapping.start + mapping.file_offset,
            },
            None => Frame::Unknown,
        }
    }
}

/// `start-end perms offset dev inode path`; executable (`x`) file mappings only.
fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let permissions = fields.next()?;
    let file_offset = fields.next()?;
    let (device, inode) = (fields.next()?, fields.next()?);
    let (major, minor) = device.split_once(':')?;
    let path = fields.collect::<Vec<_>>().join(" ");
    if !permissions.contains('x') || !path.starts_with('/') {
        return None;
    }
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        file_offset: u64::from_str_radix(file_offset, 16).ok()?,
        path: path.trim_end_matches(" (deleted)").to_owned(),
        name: None,
        device: libc::makedev(
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode: inode.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c4a00000-55d0c4a4b000 r--p 00000000 fe:01 1050 /usr/bin/redis-check-rdb
55d0c4a4b000-55d0c4bd5000 r-xp 0004b000 fe:01 1050 /usr/bin/redis-check-rdb
7f1e2a000000-7f1e2a800000 rw-p 00000000 00:00 0
7f1e2b028000-7f1e2b17d000 r-xp 00028000 fe:01 2070 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2b200000-7f1e2b201000 r-xp 00000000 fe:01 2071 /tmp/a file (deleted)
7ffd4d9e0000-7ffd4d9e2000 r-xp 00000000 00:00 0 [vdso]
";

    #[test]
    fn only_executable_file_mappings_are_kept() {
        let map = MemoryMap::parse(MAPS);
        let paths: Vec<&str> = map.mappings().iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/usr/bin/redis-check-rdb",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/tmp/a file"
            ]
        );
    }

    fn unnamed(module: &str, offset: u64) -> Frame {
        Frame::Unnamed {
            module: module.into(),
            offset,
        }
    }

    #[test]
    fn addresses_are_described_by_module_and_file_offset() {
        let map = MemoryMap::parse(MAPS);
        assert_eq!(
            map.unnamed_frame(0x55d0c4a4b010),
            unnamed("redis-check-rdb", 0x4b010)
        );
        assert_eq!(
            map.unnamed_frame(0x7f1e2b028000),
            unnamed("libc.so.6", 0x28000)
        );
        assert_eq!(map.unnamed_frame(0x7f1e2b17d000), Frame::Unknown);
        assert_eq!(map.unnamed_frame(0), Frame::Unknown);
        assert_eq!(map.find(0x7f1e2b200000).unwrap().module_name(), "a file");
    }

    #[test]
    fn a_mapping_knows_its_file_by_device_and_inode() {
        let map = MemoryMap::parse(MAPS);
        let executable = &map.mappings()[0];
        assert_eq!(executable.inode, 1050);
        assert!(executable.is_file(libc::makedev(0xfe, 0x01), 1050));
        assert!(!executable.is_file(libc::makedev(0xfe, 0x01), 1051));
    }

    #[test]
    fn the_process_executable_is_named_after_the_process() {
        let mut map = MemoryMap::parse(MAPS);
        map.name_executable("/usr/bin/redis-check-rdb", "redis-server");
        assert_eq!(
            map.unnamed_frame(0x55d0c4a4b010),
            unnamed("redis-server", 0x4b010)
        );
        assert_eq!(
            map.unnamed_frame(0x7f1e2b028000),
            unnamed("libc.so.6", 0x28000)
        );
    }
}
