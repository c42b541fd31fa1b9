//! Code addresses -> typed [`Frame`]s. User frames: blazesym on the target's own mapped files
//! (debug symbols when present, else ELF symbols); kernel frames: kallsyms. An address no
//! symbol covers keeps its module and offset (user) or its address (kernel): frames never
//! vanish. Frames are cached per address.
use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    rc::Rc,
};

use blazesym::{
    Pid,
    symbolize::{
        Input, Symbolized,
        source::{Kernel, Process, Source},
    },
};

use crate::{
    memory_map::{Mapping, MemoryMap},
    module_file::ModuleFile,
    stack::Frame,
    tail_calls::TailCallTargets,
};

/// Kernel functions that run our probe (tracepoint and BPF dispatch), not the traced thread.
const PROBE_FRAME_PREFIXES: [&str; 4] =
    ["bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_"];
/// Any kernel address: naming it loads the kernel's symbols.
const SOME_KERNEL_ADDRESS: u64 = 0xffff_ffff_8100_0000;
/// The Redis function that runs a command (`c->cmd->proc(c)`): a frame it calls directly is
/// a command's work, or that of a function the command tail-called.
const COMMAND_DISPATCHER: &str = "call";
/// Cached names per address space before the cache is emptied (bounds memory on long runs).
const CACHE_LIMIT: usize = 200_000;

/// Where names come from; blazesym in production, a table in tests.
pub trait SymbolSource {
    /// Function names of user lookup addresses, `None` where no symbol covers one.
    fn user(&mut self, addresses: &[u64]) -> Vec<Option<String>>;
    /// Function names of kernel addresses.
    fn kernel(&mut self, addresses: &[u64]) -> Vec<Option<String>>;
}

/// One blazesym symbolizer for a run: its caches (the kernel's symbols above all, read once
/// from `/proc/kallsyms`) serve every target. What it caches of a process is evicted when
/// that process's [`BlazeSymbols`] goes, so a run through many processes stays bounded.
#[derive(Clone)]
pub struct SharedBlazesym(Rc<RefCell<blazesym::symbolize::Symbolizer>>);

impl Default for SharedBlazesym {
    fn default() -> Self {
        Self(Rc::new(RefCell::new(
            blazesym::symbolize::Symbolizer::builder()
                .enable_code_info(false)
                .enable_inlined_fns(false)
                // Debug files are found by names the target's own files hold: never followed.
                .set_debug_dirs(None::<&[&str]>)
                .build(),
        )))
    }
}

/// blazesym, for one process and the running kernel. Names come from the symbol tables of the
/// files the process maps, read through `/proc/PID/map_files`: never from a perf map or a
/// debug link, files whose paths the process (anyone's, with `--all`) chooses.
pub struct BlazeSymbols {
    symbolizer: SharedBlazesym,
    pid: u32,
    /// The process's file mappings when it was bound (to evict them even after it exited).
    mappings: Vec<Mapping>,
    process: Source<'static>,
    kernel: Source<'static>,
}

impl BlazeSymbols {
    /// The symbols of process `pid`, looked up by the run's `symbolizer`.
    pub fn new(pid: u32, symbolizer: SharedBlazesym) -> Self {
        let kernel = Kernel {
            vmlinux: blazesym::MaybeDefault::None,
            debug_syms: false,
            ..Default::default()
        };
        let mut process = Process::new(Pid::from(pid));
        process.debug_syms = false;
        process.perf_map = false;
        Self {
            symbolizer,
            pid,
            mappings: MemoryMap::read(pid)
                .map(|map| map.mappings().to_vec())
                .unwrap_or_default(),
            process: Source::Process(process),
            kernel: Source::Kernel(kernel),
        }
    }

    fn names(&self, source: &Source<'_>, addresses: &[u64]) -> Vec<Option<String>> {
        match self
            .symbolizer
            .0
            .borrow()
            .symbolize(source, Input::AbsAddr(addresses))
        {
            Ok(symbols) => symbols
                .into_iter()
                .map(|symbol| match symbol {
                    Symbolized::Sym(symbol) => Some(symbol.name.into_owned()),
                    Symbolized::Unknown(_) => None,
                })
                .collect(),
            Err(error) => {
                log::debug!("symbolization failed: {error}");
                vec![None; addresses.len()]
            }
        }
    }
}

impl Drop for BlazeSymbols {
    /// Evicts what the run's symbolizer keeps of this process: its mappings and the files it
    /// opened through the process's `map_files` (a file other processes map stays open).
    fn drop(&mut self) {
        use blazesym::symbolize::evict::{self, Evict};
        let pid = self.pid;
        let mut symbolizer = self.symbolizer.0.borrow_mut();
        let now = MemoryMap::read(pid).map(|map| map.mappings().to_vec());
        let ranges: HashSet<(u64, u64)> = self
            .mappings
            .iter()
            .chain(now.iter().flatten())
            .map(|mapping| (mapping.start, mapping.end))
            .collect();
        for (start, end) in ranges {
            let path = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
            let _ = symbolizer.evict(&Evict::Elf(evict::Elf::new(path)));
        }
        let _ = symbolizer.evict(&Evict::Process(evict::Process::new(Pid::from(pid))));
    }
}

impl SymbolSource for BlazeSymbols {
    fn user(&mut self, addresses: &[u64]) -> Vec<Option<String>> {
        self.names(&self.process, addresses)
    }

    fn kernel(&mut self, addresses: &[u64]) -> Vec<Option<String>> {
        self.names(&self.kernel, addresses)
    }
}

/// Names frames, with a cache per address space in front of a [`SymbolSource`].
pub struct Symbolizer {
    source: Box<dyn SymbolSource>,
    user: HashMap<u64, Frame>,
    kernel: HashMap<u64, Frame>,
    /// With the target's pid: the functions of its executable that commands tail-call.
    tail_calls: Option<(u32, Option<TailCallTargets>)>,
}

impl Symbolizer {
    pub fn new(source: Box<dyn SymbolSource>) -> Self {
        Self {
            source,
            user: HashMap::new(),
            kernel: HashMap::new(),
            tail_calls: None,
        }
    }

    /// Also tells unnamed code of process `pid`'s executable that commands reach by a tail
    /// call (see [`crate::tail_calls`]).
    pub fn with_tail_calls(mut self, pid: u32) -> Self {
        self.tail_calls = Some((pid, None));
        self
    }

    /// `frame`, named by the executable's jumps when it is unnamed code: a tail-called
    /// function's that commands jump to (where `call` called it: there a command's own frame
    /// is missing), or the unnamed part of a function that jumps to it.
    fn named_by_jumps(
        &mut self,
        frame: Frame,
        address: u64,
        memory_map: &MemoryMap,
        called_by_call: bool,
    ) -> Frame {
        let Frame::Unnamed { module, offset } = &frame else {
            return frame;
        };
        let Some(mapping) = memory_map
            .find(address)
            .filter(|mapping| mapping.name.is_some())
        else {
            return frame; // only the process's own executable has commands
        };
        let (module, offset) = (module.clone(), *offset);
        let mapping = mapping.clone();
        let Some(targets) = self.tail_call_targets(&mapping) else {
            return frame;
        };
        if let Some(commands) = targets.commands_at(offset).filter(|_| called_by_call) {
            Frame::TailCalled {
                module,
                offset,
                commands: commands.clone(),
            }
        } else if let Some(function) = targets.part_of(offset) {
            // Named as GCC names the copy; rules match it as the function.
            Frame::User(format!("{function}.part").into())
        } else {
            frame
        }
    }

    /// The tail-call targets of the executable `mapping` comes from, read the first time.
    fn tail_call_targets(&mut self, mapping: &Mapping) -> Option<&TailCallTargets> {
        let (pid, targets) = self.tail_calls.as_mut()?;
        Some(
            targets.get_or_insert_with(|| match ModuleFile::open(*pid, mapping) {
                Ok(data) => TailCallTargets::of_file(&data),
                Err(error) => {
                    log::debug!("{}", crate::error_chain::error_chain(&error));
                    TailCallTargets::default()
                }
            }),
        )
    }

    /// Loads the symbols of every file in `memory_map` and the kernel's, and reads the
    /// executable's tail calls, now rather than at the first stall: that takes tens of milliseconds, which the first stall's record and alert
    /// would wait for, and a target that exits right after its first stall would leave it
    /// unnamed.
    pub fn warm_up(&mut self, memory_map: &MemoryMap) {
        let mut files = HashSet::new();
        let addresses: Vec<u64> = memory_map
            .mappings()
            .iter()
            .filter(|mapping| mapping.path.starts_with('/') && files.insert(&mapping.path))
            .map(|mapping| mapping.start)
            .collect();
        self.user_frames(&addresses, memory_map);
        self.kernel_frames(&[SOME_KERNEL_ADDRESS]);
        if let Some(executable) = memory_map
            .mappings()
            .iter()
            .find(|mapping| mapping.name.is_some())
        {
            self.tail_call_targets(executable);
        }
    }

    /// The frames of user lookup addresses (leaf first); `memory_map` places those without a
    /// symbol.
    pub fn user_frames(&mut self, addresses: &[u64], memory_map: &MemoryMap) -> Vec<Frame> {
        let source = &mut self.source;
        let frames = name_all(
            &mut self.user,
            addresses,
            |missing| source.user(missing),
            |address, name| match name {
                Some(name) => Frame::User(name.into()),
                None => memory_map.unnamed_frame(address),
            },
        );
        // Which frames `call` called: only there can a command's own frame be missing.
        let called_by_call: Vec<bool> = (0..frames.len())
            .map(|index| {
                frames
                    .get(index + 1)
                    .and_then(Frame::user_function)
                    .is_some_and(|caller| caller == COMMAND_DISPATCHER)
            })
            .collect();
        frames
            .into_iter()
            .zip(addresses)
            .zip(called_by_call)
            .map(|((frame, &address), by_call)| {
                self.named_by_jumps(frame, address, memory_map, by_call)
            })
            .collect()
    }

    /// The frames of kernel addresses (leaf first); the frames of our own probe that took the
    /// stack (leading `bpf_prog_*`, `bpf_trace_run*`) are left out.
    pub fn kernel_frames(&mut self, addresses: &[u64]) -> Vec<Frame> {
        let source = &mut self.source;
        let mut frames = name_all(
            &mut self.kernel,
            addresses,
            |missing| source.kernel(missing),
            |address, name| match name {
                Some(name) => Frame::Kernel(name.into()),
                None => Frame::KernelAddress(address),
            },
        );
        let probe_frames = frames
            .iter()
            .take_while(|frame| match frame {
                Frame::Kernel(name) => PROBE_FRAME_PREFIXES
                    .iter()
                    .any(|prefix| name.starts_with(prefix)),
                _ => false,
            })
            .count();
        frames.drain(..probe_frames);
        frames
    }
}

/// Looks every address up in `cache`, asks `lookup` for the missing ones in one batch, and
/// makes their frames with `frame`. A cache that would pass [`CACHE_LIMIT`] is emptied first;
/// the frames asked for are answered from this batch's lookups either way.
fn name_all(
    cache: &mut HashMap<u64, Frame>,
    addresses: &[u64],
    lookup: impl FnOnce(&[u64]) -> Vec<Option<String>>,
    frame: impl Fn(u64, Option<String>) -> Frame,
) -> Vec<Frame> {
    name_all_within(cache, CACHE_LIMIT, addresses, lookup, frame)
}

/// [`name_all`] with the cache bounded by `limit`.
fn name_all_within(
    cache: &mut HashMap<u64, Frame>,
    limit: usize,
    addresses: &[u64],
    lookup: impl FnOnce(&[u64]) -> Vec<Option<String>>,
    frame: impl Fn(u64, Option<String>) -> Frame,
) -> Vec<Frame> {
    let mut missing: Vec<u64> = addresses
        .iter()
        .copied()
        .filter(|address| !cache.contains_key(address))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    let names = if missing.is_empty() {
        Vec::new()
    } else {
        lookup(&missing)
    };
    let looked_up: HashMap<u64, Frame> = missing
        .iter()
        .enumerate()
        .map(|(index, &address)| (address, frame(address, names.get(index).cloned().flatten())))
        .collect();
    let frames: Vec<Frame> = addresses
        .iter()
        .map(|address| {
            looked_up
                .get(address)
                .or_else(|| cache.get(address))
                .cloned()
                .unwrap_or(Frame::Unknown)
        })
        .collect();
    if cache.len() + looked_up.len() > limit {
        cache.clear();
    }
    cache.extend(looked_up.into_iter().take(limit));
    frames
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Names from a table; counts lookups.
    pub(crate) struct TableSymbols {
        pub(crate) names: HashMap<u64, &'static str>,
        pub(crate) lookups: std::rc::Rc<std::cell::Cell<usize>>,
    }

    impl SymbolSource for TableSymbols {
        fn user(&mut self, addresses: &[u64]) -> Vec<Option<String>> {
            self.lookups.set(self.lookups.get() + 1);
            addresses
                .iter()
                .map(|address| self.names.get(address).map(|name| name.to_string()))
                .collect()
        }

        fn kernel(&mut self, addresses: &[u64]) -> Vec<Option<String>> {
            self.user(addresses)
        }
    }

    #[test]
    fn unknown_frames_keep_their_module_and_offset_and_names_are_cached() {
        let lookups = std::rc::Rc::new(std::cell::Cell::new(0));
        let names = HashMap::from([
            (0x1010, "main"),
            (0xffff_1000, "do_nanosleep"),
            (0xffff_3000, "bpf_trace_run4"),
        ]);
        let mut symbolizer = Symbolizer::new(Box::new(TableSymbols {
            names,
            lookups: std::rc::Rc::clone(&lookups),
        }));
        let map = MemoryMap::parse("1000-3000 r-xp 00002000 fe:01 7 /usr/bin/redis-server\n");
        let frames = symbolizer.user_frames(&[0x1010, 0x2000, 0x9999], &map);
        assert_eq!(
            frames,
            [
                Frame::User("main".into()),
                Frame::Unnamed {
                    module: "redis-server".into(),
                    offset: 0x3000
                },
                Frame::Unknown
            ]
        );
        symbolizer.user_frames(&[0x2000, 0x1010], &map);
        assert_eq!(lookups.get(), 1, "the second call is served from the cache");
        let kernel = symbolizer.kernel_frames(&[0xffff_3000, 0xffff_1000, 0xffff_2000]);
        assert_eq!(
            kernel.len(),
            2,
            "the probe's own frame is left out: {kernel:?}"
        );
        assert_eq!(kernel[0], Frame::Kernel("do_nanosleep".into()));
        assert_eq!(kernel[1], Frame::KernelAddress(0xffff_2000));
    }

    #[test]
    fn a_full_cache_is_emptied_without_losing_the_frames_asked_for() {
        let mut cache = HashMap::new();
        let name = |address: u64, name: Option<String>| {
            Frame::User(name.unwrap_or_else(|| format!("{address:x}")).into())
        };
        let lookup = |missing: &[u64]| missing.iter().map(|_| None).collect::<Vec<_>>();
        let first = name_all_within(&mut cache, 4, &[1, 2, 3], lookup, name);
        assert_eq!(first.len(), 3);
        // Two cached addresses and three new ones pass the limit of four: the cache is
        // emptied, and the cached ones are still answered.
        let second = name_all_within(&mut cache, 4, &[7, 1, 8, 2, 9], lookup, name);
        assert_eq!(
            second,
            ["7", "1", "8", "2", "9"].map(|text| Frame::User(text.into()))
        );
        assert!(cache.len() <= 4, "{}", cache.len());
        for round in 0..100u64 {
            let addresses: Vec<u64> = (round * 10..round * 10 + 6).chain([1, 2]).collect();
            let frames = name_all_within(&mut cache, 4, &addresses, lookup, name);
            assert_eq!(frames.len(), addresses.len());
            assert!(cache.len() <= 4);
        }
    }

    #[test]
    fn our_own_functions_are_named_by_blazesym() {
        let address = our_own_functions_are_named_by_blazesym as *const () as u64;
        let mut symbols = BlazeSymbols::new(std::process::id(), SharedBlazesym::default());
        let names = symbols.user(&[address]);
        let name = names[0].as_deref().unwrap_or("");
        assert!(
            name.contains("our_own_functions_are_named_by_blazesym"),
            "{name:?}"
        );
    }
}
