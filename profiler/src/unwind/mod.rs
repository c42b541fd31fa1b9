//! User-stack unwinding without frame pointers: the registers and stack bytes a sample copied
//! -> the chain of code addresses. [`StackUnwinder`] is the seam stall assembly sees;
//! [`DwarfUnwinder`] walks with framehop from each module's `.eh_frame`, `.eh_frame_hdr` and
//! `.debug_frame`. Modules come from `/proc/PID/maps`, are loaded once per mapping, and are
//! refreshed when an address falls outside every known module.
use std::{collections::BTreeMap, time::Instant};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

use crate::{
    memory_map::{Mapping, MemoryMap},
    module_file::ModuleFile,
};

/// Deepest stack walked; Redis's deepest paths are a few dozen frames.
pub const MAX_FRAMES: usize = 256;
/// Least time between two re-reads of `/proc/PID/maps` for addresses outside every module.
const REFRESH_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// A user stack as code addresses, leaf first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserStack {
    /// Addresses to look up: the instruction pointer, then each return address minus one (so
    /// it falls inside the call instruction).
    pub lookup_addresses: Vec<u64>,
    /// Whether the walk stopped for want of stack bytes the copy did not hold.
    pub cut_short: bool,
}

/// The registers and stack bytes a sample recorded.
#[derive(Debug, Clone, Copy)]
pub struct RecordedStack<'a> {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Bytes copied from `sp` upwards.
    pub bytes: &'a [u8],
}

impl RecordedStack<'_> {
    /// The 8 bytes at `address`, if they were copied.
    fn read(&self, address: u64) -> Result<u64, ()> {
        let offset = usize::try_from(address.checked_sub(self.sp).ok_or(())?).map_err(|_| ())?;
        let word = self
            .bytes
            .get(offset..offset.checked_add(8).ok_or(())?)
            .ok_or(())?;
        Ok(u64::from_le_bytes(word.try_into().map_err(|_| ())?))
    }
}

/// Turns the recorded user stacks of one process into code addresses.
pub trait StackUnwinder {
    /// Walks the recorded stack. Never fails: an address it cannot follow ends the stack.
    fn unwind(&mut self, stack: &RecordedStack<'_>) -> UserStack;
    /// The process's executable mappings as last read.
    fn memory_map(&self) -> &MemoryMap;
}

/// Unwinds the user stacks of one process with their modules' DWARF unwind tables.
pub struct DwarfUnwinder {
    pid: u32,
    memory_map: MemoryMap,
    /// Modules given to framehop, by mapping start.
    loaded: BTreeMap<u64, Mapping>,
    unwinder: UnwinderX86_64<Vec<u8>>,
    cache: CacheX86_64,
    last_refresh: Option<Instant>,
}

impl StackUnwinder for DwarfUnwinder {
    fn unwind(&mut self, stack: &RecordedStack<'_>) -> UserStack {
        DwarfUnwinder::unwind(self, stack)
    }

    fn memory_map(&self) -> &MemoryMap {
        &self.memory_map
    }
}

impl DwarfUnwinder {
    pub fn new(pid: u32) -> Self {
        let mut unwinder = Self {
            pid,
            memory_map: MemoryMap::default(),
            loaded: BTreeMap::new(),
            unwinder: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            last_refresh: None,
        };
        unwinder.refresh();
        unwinder
    }

    /// Re-reads `/proc/PID/maps`: loads new modules, forgets unmapped ones.
    fn refresh(&mut self) {
        self.last_refresh = Some(Instant::now());
        let Ok(memory_map) = MemoryMap::read(self.pid) else {
            return; // the process is gone: keep what we had
        };
        let current: BTreeMap<u64, &Mapping> =
            memory_map.mappings().iter().map(|m| (m.start, m)).collect();
        let vanished: Vec<u64> = self
            .loaded
            .iter()
            .filter(|(start, old)| current.get(start) != Some(old))
            .map(|(start, _)| *start)
            .collect();
        for start in vanished {
            self.unwinder.remove_module(start);
            self.loaded.remove(&start);
        }
        for (start, mapping) in current {
            if self.loaded.contains_key(&start) {
                continue;
            }
            match load_module(self.pid, mapping) {
                Some(module) => self.unwinder.add_module(module),
                None => log::debug!("no unwind information for {} at {start:#x}", mapping.path),
            }
            // Remembered either way, so a module without unwind tables is not retried.
            self.loaded.insert(start, mapping.clone());
        }
        self.memory_map = memory_map;
    }

    /// Re-reads the mappings unless that was done less than [`REFRESH_PERIOD`] ago; returns
    /// whether it did.
    fn refresh_if_due(&mut self) -> bool {
        let due = self
            .last_refresh
            .is_none_or(|last| last.elapsed() >= REFRESH_PERIOD);
        if due {
            self.refresh();
        }
        due
    }

    /// Walks the recorded stack (see [`StackUnwinder::unwind`]).
    pub fn unwind(&mut self, stack: &RecordedStack<'_>) -> UserStack {
        if self.memory_map.find(stack.ip).is_none() {
            self.refresh_if_due();
        }
        let mut user = self.walk(stack);
        // A caller in code mapped since the last read of the mappings (a module loaded at run
        // time) ends the walk at its frame: read them again and walk again.
        if user
            .lookup_addresses
            .last()
            .is_some_and(|&address| self.memory_map.find(address).is_none())
            && self.refresh_if_due()
        {
            user = self.walk(stack);
        }
        user
    }

    fn walk(&mut self, stack: &RecordedStack<'_>) -> UserStack {
        let mut lookup_addresses = Vec::new();
        let mut read_stack = |address| stack.read(address);
        let mut frames = self.unwinder.iter_frames(
            stack.ip,
            UnwindRegsX86_64::new(stack.ip, stack.sp, stack.bp),
            &mut self.cache,
            &mut read_stack,
        );
        // The walk ends at the outermost frame, or early (stack copy too short, unknown code):
        // what was found until then is kept.
        let mut cut_short = false;
        while lookup_addresses.len() < MAX_FRAMES {
            match frames.next() {
                Ok(Some(frame)) => lookup_addresses.push(lookup_address(frame)),
                Ok(None) => break,
                Err(error) => {
                    cut_short = matches!(error, framehop::Error::CouldNotReadStack(address)
                        if address >= stack.sp.saturating_add(stack.bytes.len() as u64));
                    break;
                }
            }
        }
        UserStack {
            lookup_addresses,
            cut_short,
        }
    }
}

fn lookup_address(frame: FrameAddress) -> u64 {
    match frame {
        FrameAddress::InstructionPointer(address) => address,
        FrameAddress::ReturnAddress(address) => u64::from(address) - 1,
    }
}

/// A framehop module for `mapping`: its unwind sections, and the bias between the file's
/// addresses (SVMA) and the process's (AVMA), taken from the PT_LOAD segment the mapping
/// comes from (a segment's `p_offset` need not be page aligned, the mapping's offset is).
fn load_module(pid: u32, mapping: &Mapping) -> Option<Module<Vec<u8>>> {
    let data = ModuleFile::open(pid, mapping)
        .map_err(|error| log::debug!("{}", crate::error_chain::error_chain(&error)))
        .ok()?;
    let file = object::File::parse(&*data).ok()?;
    let mapping_size = mapping.end - mapping.start;
    let segment = file.segments().find(|segment| {
        let (offset, size) = segment.file_range();
        ranges_nest(offset, size, mapping.file_offset, mapping_size)
    })?;
    let (segment_offset, _) = segment.file_range();
    let segment_avma = mapping
        .start
        .wrapping_add(segment_offset.wrapping_sub(mapping.file_offset));
    let bias = segment_avma.wrapping_sub(segment.address());

    let section = |name: &str| {
        let section = file.section_by_name(name)?;
        Some((
            section.address()..section.address() + section.size(),
            section.data().ok()?.to_vec(),
        ))
    };
    let (text_svma, text) = section(".text").unzip();
    let (eh_frame_svma, eh_frame) = section(".eh_frame").unzip();
    let (eh_frame_hdr_svma, eh_frame_hdr) = section(".eh_frame_hdr").unzip();
    let got_svma = section(".got").map(|(range, _)| range);
    let debug_frame = section(".debug_frame").map(|(_, data)| data);
    if eh_frame.is_none() && debug_frame.is_none() {
        return None;
    }
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma,
        text,
        eh_frame_svma,
        eh_frame,
        eh_frame_hdr_svma,
        eh_frame_hdr,
        debug_frame,
        got_svma,
        ..Default::default()
    };
    Some(Module::new(
        mapping.path.clone(),
        mapping.start..mapping.end,
        bias,
        info,
    ))
}

/// True when one file range contains the other (a mapping can cover part of a segment, or a
/// whole segment and some alignment around it).
fn ranges_nest(a_start: u64, a_size: u64, b_start: u64, b_size: u64) -> bool {
    let (a_end, b_end) = (
        a_start.saturating_add(a_size),
        b_start.saturating_add(b_size),
    );
    (a_start <= b_start && b_end <= a_end) || (b_start <= a_start && a_end <= b_end)
}

#[cfg(test)]
mod tests;
