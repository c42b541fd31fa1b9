//! User-stack unwinding without frame pointers: the registers and stack bytes a sample copied
//! -> the chain of code addresses. [`StackUnwinder`] is the seam stall assembly sees;
//! [`DwarfUnwinder`] walks with framehop from each module's `.eh_frame`, `.eh_frame_hdr` and
//! `.debug_frame`. Modules come from `/proc/PID/maps`, are loaded once per mapping, and are
//! refreshed when an address falls outside every known module.
use std::{collections::BTreeMap, fs, time::Instant};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

use crate::memory_map::{Mapping, MemoryMap};

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
        while lookup_addresses.len() < MAX_FRAMES
            && let Ok(Some(frame)) = frames.next()
        {
            lookup_addresses.push(lookup_address(frame));
        }
        UserStack { lookup_addresses }
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
    let data = mapping
        .openable_paths(pid)
        .iter()
        .find_map(|path| fs::read(path).ok())?;
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
mod tests {
    use super::*;

    /// This thread's registers and up to 16 KiB of its stack, as the kernel side copies them.
    #[inline(never)]
    fn record_own_stack(buffer: &mut Vec<u8>) -> (u64, u64, u64) {
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers.
        unsafe {
            std::arch::asm!("lea {ip}, [rip]", "mov {sp}, rsp", "mov {bp}, rbp", ip = out(reg) ip, sp = out(reg) sp, bp = out(reg) bp);
        }
        let maps = fs::read_to_string("/proc/self/maps").unwrap();
        let stack_end = maps
            .lines()
            .filter_map(|line| {
                let (start, end) = line.split_whitespace().next()?.split_once('-')?;
                Some((
                    u64::from_str_radix(start, 16).ok()?,
                    u64::from_str_radix(end, 16).ok()?,
                ))
            })
            .find(|&(start, end)| start <= sp && sp < end)
            .map(|(_, end)| end)
            .unwrap();
        let len = (stack_end - sp).min(16 * 1024) as usize;
        // SAFETY: [sp, sp + len) lies inside this thread's mapped stack.
        buffer.extend_from_slice(unsafe { std::slice::from_raw_parts(sp as *const u8, len) });
        (ip, sp, bp)
    }

    #[test]
    fn our_own_stack_unwinds_through_several_frames_into_the_test_harness() {
        let mut bytes = Vec::new();
        let (ip, sp, bp) = record_own_stack(&mut bytes);
        let mut unwinder = DwarfUnwinder::new(std::process::id());
        let stack = unwinder.unwind(&RecordedStack {
            ip,
            sp,
            bp,
            bytes: &bytes,
        });
        assert!(stack.lookup_addresses.len() >= 5, "{stack:?}");
        let own_module = unwinder.memory_map().find(ip).unwrap().path.clone();
        // The first return address is in this test function, in this test binary.
        assert_eq!(
            unwinder
                .memory_map()
                .find(stack.lookup_addresses[1])
                .unwrap()
                .path,
            own_module
        );
        // The walk leaves the test binary (std's thread start in libc: clone3 / start_thread).
        assert!(stack.lookup_addresses.iter().any(|&a| {
            unwinder
                .memory_map()
                .find(a)
                .is_some_and(|m| m.path != own_module)
        }));
    }

    #[test]
    fn a_truncated_copy_cuts_the_stack_without_failing() {
        let mut bytes = Vec::new();
        let (ip, sp, bp) = record_own_stack(&mut bytes);
        let mut unwinder = DwarfUnwinder::new(std::process::id());
        let full = unwinder.unwind(&RecordedStack {
            ip,
            sp,
            bp,
            bytes: &bytes,
        });
        let cut = unwinder.unwind(&RecordedStack {
            ip,
            sp,
            bp,
            bytes: &bytes[..64],
        });
        assert!(cut.lookup_addresses.len() < full.lookup_addresses.len());
        assert_eq!(cut.lookup_addresses[0], ip);
    }

    #[test]
    fn registers_that_point_nowhere_give_one_unknown_frame() {
        let mut unwinder = DwarfUnwinder::new(std::process::id());
        for (ip, sp) in [(0, 0), (0xdead_beef, 0x10), (u64::MAX, u64::MAX - 4)] {
            let stack = unwinder.unwind(&RecordedStack {
                ip,
                sp,
                bp: 0,
                bytes: &[0xff; 32],
            });
            assert_eq!(stack.lookup_addresses, [ip]);
        }
    }

    #[test]
    fn a_process_that_is_gone_unwinds_nothing_and_does_not_fail() {
        let mut unwinder = DwarfUnwinder::new(u32::MAX - 1);
        let stack = unwinder.unwind(&RecordedStack {
            ip: 0x1000,
            sp: 0x2000,
            bp: 0,
            bytes: &[0; 64],
        });
        assert_eq!(stack.lookup_addresses, [0x1000]);
    }

    #[test]
    fn a_reading_outside_the_copy_fails() {
        let bytes = [1u8, 0, 0, 0, 0, 0, 0, 0, 2];
        let stack = RecordedStack {
            ip: 0,
            sp: 100,
            bp: 0,
            bytes: &bytes,
        };
        assert_eq!(stack.read(100), Ok(1));
        assert_eq!(stack.read(101), Ok(0x0200_0000_0000_0000));
        assert_eq!(stack.read(102), Err(()));
        assert_eq!(stack.read(99), Err(()));
        assert_eq!(stack.read(u64::MAX), Err(()));
    }

    #[test]
    fn nesting_ranges_match_and_overlapping_ones_do_not() {
        assert!(ranges_nest(0x1000, 0x5000, 0x2000, 0x1000));
        assert!(ranges_nest(0x2000, 0x1000, 0x1000, 0x5000));
        assert!(!ranges_nest(0x1000, 0x2000, 0x2000, 0x2000));
    }

    /// Fuzzing: arbitrary registers and stack bytes against this process's real modules (one
    /// unwinder for all cases: loading the modules is the slow part). `PROPTEST_CASES` sets
    /// the number of cases.
    #[test]
    fn arbitrary_registers_and_bytes_unwind_without_failing() {
        use proptest::{
            collection::vec, num::u8, num::u64, strategy::Strategy, test_runner::TestRunner,
        };
        let unwinder = std::cell::RefCell::new(DwarfUnwinder::new(std::process::id()));
        let code = arbitrary_registers_and_bytes_unwind_without_failing as *const () as u64;
        let registers = (u64::ANY, u64::ANY, u64::ANY, vec(u8::ANY, 0..512));
        // Half the cases start in real code of this binary with a stack of random words.
        let in_code = (0u64..4096, vec(u64::ANY, 0..64)).prop_map(move |(offset, words)| {
            (
                code + offset,
                0,
                0,
                words
                    .iter()
                    .flat_map(|word| word.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
        });
        TestRunner::default()
            .run(
                &proptest::prop_oneof![registers, in_code],
                |(ip, sp, bp, bytes)| {
                    let sp = if sp == 0 { bytes.as_ptr() as u64 } else { sp };
                    let stack = unwinder.borrow_mut().unwind(&RecordedStack {
                        ip,
                        sp,
                        bp,
                        bytes: &bytes,
                    });
                    proptest::prop_assert_eq!(stack.lookup_addresses[0], ip);
                    proptest::prop_assert!(stack.lookup_addresses.len() <= MAX_FRAMES);
                    Ok(())
                },
            )
            .unwrap();
    }
}
