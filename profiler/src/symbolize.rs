//! Code addresses -> frame names. User frames: blazesym on the target's own mapped files
//! (debug symbols when present, else ELF symbols); kernel frames: kallsyms. An address no
//! symbol covers is named `module+0xoffset` (user) or `0xaddress_[k]` (kernel): frames never
//! vanish. Kernel frames end in `_[k]`. Names are cached per address.
use std::{
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

use crate::memory_map::MemoryMap;

/// Suffix of kernel frame names (the folded-stack convention).
pub const KERNEL_SUFFIX: &str = "_[k]";
/// Kernel functions that run our probe (tracepoint and BPF dispatch), not the traced thread.
const PROBE_FRAME_PREFIXES: [&str; 4] =
    ["bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_"];
/// Any kernel address: naming it loads the kernel's symbols.
const SOME_KERNEL_ADDRESS: u64 = 0xffff_ffff_8100_0000;
/// Cached names per address space before the cache is emptied (bounds memory on long runs).
const CACHE_LIMIT: usize = 200_000;

/// Where names come from; blazesym in production, a table in tests.
pub trait SymbolSource {
    /// Function names of user lookup addresses, `None` where no symbol covers one.
    fn user(&mut self, addresses: &[u64]) -> Vec<Option<String>>;
    /// Function names of kernel addresses.
    fn kernel(&mut self, addresses: &[u64]) -> Vec<Option<String>>;
}

/// blazesym, for one process and the running kernel.
pub struct BlazeSymbols {
    symbolizer: blazesym::symbolize::Symbolizer,
    process: Source<'static>,
    kernel: Source<'static>,
}

impl BlazeSymbols {
    pub fn new(pid: u32) -> Self {
        let symbolizer = blazesym::symbolize::Symbolizer::builder()
            .enable_code_info(false)
            .enable_inlined_fns(false)
            .build();
        let kernel = Kernel {
            vmlinux: blazesym::MaybeDefault::None,
            debug_syms: false,
            ..Default::default()
        };
        Self {
            symbolizer,
            process: Source::Process(Process::new(Pid::from(pid))),
            kernel: Source::Kernel(kernel),
        }
    }

    fn names(&self, source: &Source<'_>, addresses: &[u64]) -> Vec<Option<String>> {
        match self.symbolizer.symbolize(source, Input::AbsAddr(addresses)) {
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
    user: HashMap<u64, Rc<str>>,
    kernel: HashMap<u64, Rc<str>>,
}

impl Symbolizer {
    pub fn new(source: Box<dyn SymbolSource>) -> Self {
        Self {
            source,
            user: HashMap::new(),
            kernel: HashMap::new(),
        }
    }

    /// Loads the symbols of every file in `memory_map` and the kernel's now, rather than at the
    /// first stall: that takes tens of milliseconds, which the first stall's record and alert
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
    }

    /// Names user lookup addresses (leaf first); `memory_map` names those without a symbol.
    pub fn user_frames(&mut self, addresses: &[u64], memory_map: &MemoryMap) -> Vec<Rc<str>> {
        let source = &mut self.source;
        name_all(
            &mut self.user,
            addresses,
            |missing| source.user(missing),
            |address, name| match name {
                Some(name) => name,
                None => memory_map.describe(address),
            },
        )
    }

    /// Names kernel addresses (leaf first), each ending in [`KERNEL_SUFFIX`]; the frames of
    /// our own probe that took the stack (leading `bpf_prog_*`, `bpf_trace_run*`) are left out.
    pub fn kernel_frames(&mut self, addresses: &[u64]) -> Vec<Rc<str>> {
        let source = &mut self.source;
        let mut frames = name_all(
            &mut self.kernel,
            addresses,
            |missing| source.kernel(missing),
            |address, name| match name {
                Some(name) => format!("{name}{KERNEL_SUFFIX}"),
                None => format!("{address:#x}{KERNEL_SUFFIX}"),
            },
        );
        let probe_frames = frames
            .iter()
            .take_while(|frame| {
                PROBE_FRAME_PREFIXES
                    .iter()
                    .any(|prefix| frame.starts_with(prefix))
            })
            .count();
        frames.drain(..probe_frames);
        frames
    }
}

/// Looks every address up in `cache`, asks `lookup` for the missing ones in one batch, and
/// names them with `format`.
fn name_all(
    cache: &mut HashMap<u64, Rc<str>>,
    addresses: &[u64],
    lookup: impl FnOnce(&[u64]) -> Vec<Option<String>>,
    format: impl Fn(u64, Option<String>) -> String,
) -> Vec<Rc<str>> {
    let mut missing: Vec<u64> = addresses
        .iter()
        .copied()
        .filter(|address| !cache.contains_key(address))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if !missing.is_empty() {
        if cache.len() + missing.len() > CACHE_LIMIT {
            cache.clear();
        }
        let names = lookup(&missing);
        for (index, &address) in missing.iter().enumerate() {
            let name = names.get(index).cloned().flatten();
            cache.insert(address, format(address, name).into());
        }
    }
    addresses
        .iter()
        .map(|address| Rc::clone(&cache[address]))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Names from a table; counts lookups.
    pub(crate) struct TableSymbols {
        pub(crate) names: HashMap<u64, &'static str>,
        pub(crate) lookups: Rc<std::cell::Cell<usize>>,
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
        let lookups = Rc::new(std::cell::Cell::new(0));
        let names = HashMap::from([
            (0x1010, "main"),
            (0xffff_1000, "do_nanosleep"),
            (0xffff_3000, "bpf_trace_run4"),
        ]);
        let mut symbolizer = Symbolizer::new(Box::new(TableSymbols {
            names,
            lookups: Rc::clone(&lookups),
        }));
        let map = MemoryMap::parse("1000-3000 r-xp 00002000 fe:01 7 /usr/bin/redis-server\n");
        let frames = symbolizer.user_frames(&[0x1010, 0x2000, 0x9999], &map);
        let frames: Vec<&str> = frames.iter().map(|frame| &**frame).collect();
        assert_eq!(frames, ["main", "redis-server+0x3000", "[unknown]"]);
        symbolizer.user_frames(&[0x2000, 0x1010], &map);
        assert_eq!(lookups.get(), 1, "the second call is served from the cache");
        let kernel = symbolizer.kernel_frames(&[0xffff_3000, 0xffff_1000, 0xffff_2000]);
        assert_eq!(
            kernel.len(),
            2,
            "the probe's own frame is left out: {kernel:?}"
        );
        assert_eq!(&*kernel[0], "do_nanosleep_[k]");
        assert_eq!(&*kernel[1], "0xffff2000_[k]");
    }

    #[test]
    fn our_own_functions_are_named_by_blazesym() {
        let address = our_own_functions_are_named_by_blazesym as *const () as u64;
        let mut symbols = BlazeSymbols::new(std::process::id());
        let names = symbols.user(&[address]);
        let name = names[0].as_deref().unwrap_or("");
        assert!(
            name.contains("our_own_functions_are_named_by_blazesym"),
            "{name:?}"
        );
    }
}
