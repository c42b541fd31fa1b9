//! Loading the embedded eBPF object with the run's settings, attaching its programs to the
//! target, and handing out the maps userspace reads ([`maps`]).
mod maps;
mod scheduling;

use std::{num::NonZeroU32, path::Path};

use aya::{
    Btf, Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, MapError, RingBuf},
    programs::{
        BtfTracePoint, PerfEvent, ProgramError, TracePoint, UProbe,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        tp_btf::BtfTracePointLinkId,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
pub use maps::{KernelMaps, Slot};
use profiler_common::{
    GLOBAL_NET_INUM_OFFSET, GLOBAL_SCHED_LAYOUT, GLOBAL_SOCK_NET_OFFSET, GLOBAL_SOLE_PID,
    GLOBAL_SOLE_TID, GLOBAL_USER_STACK_LIMIT, MAP_COUNTERS, MAP_EVENTS, MAP_FAULT_PROGRAMS_ON,
    MAP_FAULT_SAMPLING, MAP_ITERATION_HISTOGRAM, MAP_ITERATION_MAX, MAP_LISTEN_PORTS,
    MAP_LOOP_STATE, MAP_LOOP_TASKS, MAP_OFF_CPU_STACKS, MAP_RUNNING_LOOP, MAP_TARGET_SETTINGS,
    MAP_TARGETS, PER_TARGET_MAPS,
};
pub use scheduling::{FaultPrograms, HostTax, ThreadLinks, sched_layout};

use crate::{error_chain::error_chain, kernel_layout::KernelLayout};

/// The kernel programs' log (aya-log): their rare-path messages, read into our log.
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;
/// aya-log's global holding the level of the kernel programs' log.
const GLOBAL_KERNEL_LOG_LEVEL: &str = "AYA_LOG_LEVEL";
/// aya-log's level numbers: 0 turns the kernel programs' log off, 4 lets `debug!` through.
const KERNEL_LOG_OFF: u8 = 0;
const KERNEL_LOG_DEBUG: u8 = 4;

/// The eBPF object built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler-ebpf"));

/// The Redis function that polls from inside a long command (a busy script, loading); the
/// polls it makes belong to the iteration that called it.
pub const NESTED_POLL_FUNCTION: &str = "processEventsWhileBlocked";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot load the eBPF programs")]
    Load {
        #[source]
        cause: EbpfError,
    },
    #[error("the eBPF object has no program `{name}`")]
    MissingProgram { name: &'static str },
    #[error("cannot load program `{name}` into the kernel")]
    LoadProgram {
        name: &'static str,
        #[source]
        cause: ProgramError,
    },
    #[error("cannot attach `{program}` to tracepoint `{tracepoint}`")]
    AttachTracepoint {
        program: &'static str,
        tracepoint: String,
        #[source]
        cause: ProgramError,
    },
    #[error("cannot attach a uprobe to `{function}` in `{exe}`")]
    AttachUprobe {
        function: &'static str,
        exe: String,
        #[source]
        cause: ProgramError,
    },
    #[error("cannot read the kernel's BTF")]
    Btf {
        #[source]
        cause: aya::BtfError,
    },
    #[error("cannot attach `{program}` to `{what}`")]
    Attach {
        program: &'static str,
        what: String,
        #[source]
        cause: ProgramError,
    },
    #[error("the eBPF object has no map `{name}`")]
    MissingMap { name: &'static str },
    #[error("cannot use map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        cause: MapError,
    },
    #[error("cannot write every CPU's entry of map `{name}`")]
    PerCpuValues {
        name: &'static str,
        #[source]
        cause: std::io::Error,
    },
}

/// What the kernel programs need to know about the run, whatever the targets (each target's
/// own settings go into its slot: [`KernelMaps::add_target`]).
#[derive(Debug, Clone, Copy)]
pub struct ProbeSettings {
    /// User-stack bytes copied per sample.
    pub user_stack_bytes: u32,
    /// Size of the events ring buffer (a power of two, at least a page).
    pub ring_buffer_bytes: u32,
    /// Targets the per-target maps have room for.
    pub max_targets: u32,
    /// The (pid, event-loop tid) of the one process a run watches for its whole life: the
    /// programs then find it by comparison rather than through the maps (cheaper on every
    /// context switch and poll). `None` when the run may watch several.
    pub sole_target: Option<(u32, u32)>,
    /// Host-wide scheduler and fault programs, even where per-thread events would do.
    pub host_wide: bool,
}

/// Programs loaded with [`Probes::load`], by name and kind.
const TRACEPOINT_PROGRAMS: [&str; 7] = [
    "poll_entry",
    "read_entry",
    "madvise_entry",
    "madvise_return",
    "connection_state",
    "accept_entry",
    "accept_return",
];
/// `(program, tracepoint category, tracepoint)` of the connection tracers.
const CONNECTION_PROGRAMS: [(&str, &str, &str); 5] = [
    ("connection_state", "sock", "inet_sock_set_state"),
    ("accept_entry", "syscalls", "sys_enter_accept4"),
    ("accept_entry", "syscalls", "sys_enter_accept"),
    ("accept_return", "syscalls", "sys_exit_accept4"),
    ("accept_return", "syscalls", "sys_exit_accept"),
];
/// `(program, tracepoint category, tracepoint)` of the madvise timers.
const MADVISE_PROGRAMS: [(&str, &str, &str); 2] = [
    ("madvise_entry", "syscalls", "sys_enter_madvise"),
    ("madvise_return", "syscalls", "sys_exit_madvise"),
];
/// `(program, kernel tracepoint)` of the page-fault counters.
const MEMORY_PROGRAMS: [(&str, &str); 2] = [
    ("user_page_fault", "page_fault_user"),
    ("kernel_page_fault", "page_fault_kernel"),
];
const UPROBE_PROGRAMS: [&str; 2] = ["nested_poll_begin", "nested_poll_end"];
/// `(program, kernel tracepoint)` of the scheduler programs.
const SCHEDULER_PROGRAMS: [(&str, &str); 3] = [
    ("sched_switch", "sched_switch"),
    ("sched_wakeup", "sched_wakeup"),
    ("target_exec", "sched_process_exec"),
];
const SAMPLE_PROGRAM: &str = "on_cpu_sample";

/// Where a socket's network namespace lies in this kernel's structures (`struct sock` ->
/// `struct net *`, `struct net` -> the namespace's inode number), for the connection tracer
/// to tell one port number in several namespaces apart; (0, 0) when the kernel's BTF does not
/// say, said once.
fn socket_namespace_offsets() -> (u32, u32) {
    let offsets = KernelLayout::of_running_kernel().and_then(|layout| {
        Ok((
            layout.offset_of("sock", "__sk_common.skc_net")?,
            layout.offset_of("net", "ns.inum")?,
        ))
    });
    offsets.unwrap_or_else(|error| {
        log::warn!(
            "{}; connections to one port number in several network namespaces cannot be told \
             apart",
            error_chain(&error)
        );
        (0, 0)
    })
}

/// What the programs of one target attach to.
pub struct TargetProbes<'a> {
    pub pid: u32,
    /// Its event-loop thread.
    pub tid: u32,
    /// Its executable (for the nested-poll markers).
    pub exe: &'a Path,
    /// The on-CPU sampling frequency.
    pub frequency_hz: u64,
    /// Whether its page faults are followed.
    pub faults: bool,
}

/// One target's own program links; the rest of the programs serve every target.
pub struct TargetLinks {
    sampler: PerfEventLinkId,
    /// Its per-thread context-switch and page-fault events (none in host-wide mode).
    threads: scheduling::ThreadLinks,
    /// The nested-poll markers, or why they could not be attached.
    pub nested_poll: Result<Vec<(&'static str, UProbeLinkId)>, ProbeError>,
}

/// The loaded programs; dropping this detaches them all.
pub struct Probes {
    ebpf: Ebpf,
    max_targets: u32,
    /// How the scheduler and fault programs are attached, and so what the host pays.
    pub host_tax: HostTax,
    /// Whether the connection tracer knows a socket's network namespace.
    namespaces_known: bool,
}

impl Probes {
    /// Loads the object with `settings` frozen into its read-only globals and loads every
    /// program into the kernel (nothing is attached yet).
    pub fn load(settings: ProbeSettings) -> Result<Self, ProbeError> {
        raise_memlock_limit();
        let btf = Btf::from_sys_fs().map_err(|cause| ProbeError::Btf { cause })?;
        // The kernel programs log only on rare paths, and only when our log shows debug.
        let kernel_log_level = if log::log_enabled!(log::Level::Debug) {
            KERNEL_LOG_DEBUG
        } else {
            KERNEL_LOG_OFF
        };
        let (sole_pid, sole_tid) = settings.sole_target.unwrap_or((0, 0));
        let (sock_net_offset, net_inum_offset) = socket_namespace_offsets();
        let (sched, per_thread_refused) = if settings.host_wide {
            (Default::default(), Some("--probes host-wide".to_owned()))
        } else {
            sched_layout()
        };
        if let (Some(why), false) = (&per_thread_refused, settings.host_wide) {
            log::warn!(
                "{why}; every context switch and page fault on the host runs the scheduler and \
                 fault programs instead of per-thread events"
            );
        }
        let mut loader = EbpfLoader::new();
        loader
            .btf(Some(&btf))
            .override_global(GLOBAL_SOLE_PID, &sole_pid, true)
            .override_global(GLOBAL_SOLE_TID, &sole_tid, true)
            .override_global(GLOBAL_SOCK_NET_OFFSET, &sock_net_offset, true)
            .override_global(GLOBAL_NET_INUM_OFFSET, &net_inum_offset, true)
            .override_global(GLOBAL_SCHED_LAYOUT, &sched, true)
            .override_global(GLOBAL_USER_STACK_LIMIT, &settings.user_stack_bytes, true)
            .override_global(GLOBAL_KERNEL_LOG_LEVEL, &kernel_log_level, true)
            .map_max_entries(MAP_EVENTS, settings.ring_buffer_bytes);
        for (map, entries_per_target) in PER_TARGET_MAPS {
            loader.map_max_entries(map, settings.max_targets * entries_per_target);
        }
        let ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|cause| ProbeError::Load { cause })?;
        let mut probes = Self {
            ebpf,
            max_targets: settings.max_targets,
            namespaces_known: sock_net_offset != 0,
            host_tax: if per_thread_refused.is_none() {
                HostTax::PerThread
            } else {
                HostTax::HostWide
            },
        };
        for name in TRACEPOINT_PROGRAMS {
            probes.load_program::<TracePoint>(name, |program| program.load())?;
        }
        for name in UPROBE_PROGRAMS {
            probes.load_program::<UProbe>(name, |program| program.load())?;
        }
        for (name, tracepoint) in SCHEDULER_PROGRAMS.into_iter().chain(MEMORY_PROGRAMS) {
            probes.load_program::<BtfTracePoint>(name, |program| program.load(tracepoint, &btf))?;
        }
        for name in [
            SAMPLE_PROGRAM,
            scheduling::SWITCH_PROGRAM,
            scheduling::FAULT_TRIGGER_PROGRAM,
        ] {
            probes.load_program::<PerfEvent>(name, |program| program.load())?;
        }
        Ok(probes)
    }

    /// Loads program `name` (of type `P`) into the kernel with `load`.
    fn load_program<'a, P: 'a>(
        &'a mut self,
        name: &'static str,
        load: impl FnOnce(&mut P) -> Result<(), ProgramError>,
    ) -> Result<(), ProbeError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program>,
    {
        load(self.program::<P>(name)?).map_err(|cause| ProbeError::LoadProgram { name, cause })
    }

    fn program<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, ProbeError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program>,
    {
        self.ebpf
            .program_mut(name)
            .and_then(|program| program.try_into().ok())
            .ok_or(ProbeError::MissingProgram { name })
    }

    /// Attaches `program` to the classic tracepoint `category:tracepoint`.
    fn attach_tracepoint(
        &mut self,
        program: &'static str,
        category: &str,
        tracepoint: &str,
    ) -> Result<(), ProbeError> {
        self.program::<TracePoint>(program)?
            .attach(category, tracepoint)
            .map_err(|cause| ProbeError::AttachTracepoint {
                program,
                tracepoint: format!("{category}:{tracepoint}"),
                cause,
            })?;
        Ok(())
    }

    /// Attaches the madvise timers to `syscalls:sys_{enter,exit}_madvise`.
    pub fn attach_madvise(&mut self) -> Result<(), ProbeError> {
        for (program, category, tracepoint) in MADVISE_PROGRAMS {
            self.attach_tracepoint(program, category, tracepoint)?;
        }
        Ok(())
    }

    /// Attaches the page-fault counters to `tp_btf/page_fault_{user,kernel}` for the whole
    /// run in host-wide mode (per thread, they come on demand: [`FaultPrograms`]).
    pub fn attach_memory(&mut self) -> Result<(), ProbeError> {
        if self.host_tax == HostTax::HostWide {
            self.attach_btf_tracepoints(&MEMORY_PROGRAMS)?;
        }
        Ok(())
    }

    /// Attaches the read tracker of `--clients exact` to `syscalls:sys_enter_read` (it runs
    /// for every `read` of the host).
    pub fn attach_read_tracker(&mut self) -> Result<(), ProbeError> {
        self.attach_tracepoint("read_entry", "syscalls", "sys_enter_read")
    }

    /// Attaches the connection tracers: handshakes completing on the listening ports,
    /// connections closing, and the target's accepts.
    pub fn attach_connections(&mut self) -> Result<(), ProbeError> {
        for (program, category, tracepoint) in CONNECTION_PROGRAMS {
            self.attach_tracepoint(program, category, tracepoint)?;
        }
        Ok(())
    }

    /// Attaches the scheduler programs: `sched_process_exec` (the target running a new
    /// program) and, in host-wide mode, `sched_switch` and `sched_wakeup` (blocking polls,
    /// off-CPU and run-queue time; per thread, each target's events do it).
    pub fn attach_scheduler(&mut self) -> Result<(), ProbeError> {
        let programs = match self.host_tax {
            HostTax::HostWide => &SCHEDULER_PROGRAMS[..],
            HostTax::PerThread => &SCHEDULER_PROGRAMS[2..],
        };
        self.attach_btf_tracepoints(programs)
    }

    /// Attaches each `(program, kernel tracepoint)` as a BTF-typed tracepoint for the run.
    fn attach_btf_tracepoints(
        &mut self,
        programs: &[(&'static str, &'static str)],
    ) -> Result<(), ProbeError> {
        self.attach_btf_links(programs).map(drop)
    }

    /// Attaches each `(program, kernel tracepoint)` as a BTF-typed tracepoint; returns the
    /// links, to detach them ([`Self::detach_btf_links`]).
    fn attach_btf_links(
        &mut self,
        programs: &[(&'static str, &'static str)],
    ) -> Result<Vec<BtfTracePointLinkId>, ProbeError> {
        let mut links = Vec::new();
        for &(program, tracepoint) in programs {
            let attached = self.program::<BtfTracePoint>(program)?.attach();
            match attached {
                Ok(link) => links.push(link),
                Err(cause) => {
                    self.detach_btf_links(programs, links);
                    return Err(ProbeError::Attach {
                        program,
                        what: format!("tp_btf/{tracepoint}"),
                        cause,
                    });
                }
            }
        }
        Ok(links)
    }

    /// Detaches the `links` of `programs` (in their order).
    fn detach_btf_links(
        &mut self,
        programs: &[(&'static str, &'static str)],
        links: Vec<BtfTracePointLinkId>,
    ) {
        for (&(program, _), link) in programs.iter().zip(links) {
            if let Ok(attached) = self.program::<BtfTracePoint>(program)
                && let Err(error) = attached.detach(link)
            {
                log::debug!("detaching {program}: {error}");
            }
        }
    }

    /// Attaches the programs of one target: the on-CPU sampler of its event-loop thread `tid`
    /// and, unless the function is missing, the nested-poll markers in `exe` (see
    /// [`Self::attach_nested_poll_markers`]; the error comes back in the links).
    pub fn attach_target(&mut self, target: TargetProbes<'_>) -> Result<TargetLinks, ProbeError> {
        let TargetProbes {
            pid,
            tid,
            exe,
            frequency_hz,
            faults,
        } = target;
        let sampler = self.attach_sampler(tid, frequency_hz)?;
        let threads = match self.attach_threads(pid, tid, faults) {
            Ok(threads) => threads,
            Err(error) => {
                if let Ok(program) = self.program::<PerfEvent>(SAMPLE_PROGRAM) {
                    let _ = program.detach(sampler);
                }
                return Err(error);
            }
        };
        let nested_poll = self.attach_nested_poll_markers(NESTED_POLL_FUNCTION, exe, pid);
        Ok(TargetLinks {
            sampler,
            threads,
            nested_poll,
        })
    }

    /// Detaches the programs of one target (whose process may be gone: best effort).
    pub fn detach_target(&mut self, links: TargetLinks) {
        self.detach_threads(links.threads);
        if let Ok(program) = self.program::<PerfEvent>(SAMPLE_PROGRAM)
            && let Err(error) = program.detach(links.sampler)
        {
            log::debug!("detaching the sampler: {error}");
        }
        for (name, link) in links.nested_poll.into_iter().flatten() {
            if let Ok(program) = self.program::<UProbe>(name)
                && let Err(error) = program.detach(link)
            {
                log::debug!("detaching {name}: {error}");
            }
        }
    }

    /// Attaches the on-CPU sampler: a CPU-clock perf event at `frequency_hz` that follows
    /// thread `tid` on any CPU.
    pub fn attach_sampler(
        &mut self,
        tid: u32,
        frequency_hz: u64,
    ) -> Result<PerfEventLinkId, ProbeError> {
        let program = SAMPLE_PROGRAM;
        self.program::<PerfEvent>(program)?
            .attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::OneProcess {
                    pid: tid,
                    cpu: None,
                },
                SamplePolicy::Frequency(frequency_hz),
                false,
            )
            .map_err(|cause| ProbeError::Attach {
                program,
                what: format!("the CPU clock of thread {tid}"),
                cause,
            })
    }

    /// Attaches the iteration timer to every poll entry tracepoint given (`sys_enter_*`).
    pub fn attach_poll_tracepoints(&mut self, tracepoints: &[String]) -> Result<(), ProbeError> {
        for tracepoint in tracepoints {
            self.attach_tracepoint("poll_entry", "syscalls", tracepoint)?;
        }
        Ok(())
    }

    /// Attaches the nested-poll markers to `function` (for Redis: [`NESTED_POLL_FUNCTION`]) in
    /// the executable or library `exe`, for process `pid` only.
    pub fn attach_nested_poll_markers(
        &mut self,
        function: &'static str,
        exe: &Path,
        pid: u32,
    ) -> Result<Vec<(&'static str, UProbeLinkId)>, ProbeError> {
        let scope = NonZeroU32::new(pid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
        let mut links = Vec::new();
        for name in UPROBE_PROGRAMS {
            let attached = self
                .program::<UProbe>(name)?
                .attach(function, exe, scope)
                .map_err(|cause| ProbeError::AttachUprobe {
                    function,
                    exe: exe.display().to_string(),
                    cause,
                });
            match attached {
                Ok(link) => links.push((name, link)),
                Err(error) => {
                    // Not half attached: the begin marker without its end would nest forever.
                    for (name, link) in links {
                        if let Ok(program) = self.program::<UProbe>(name) {
                            let _ = program.detach(link);
                        }
                    }
                    return Err(error);
                }
            }
        }
        Ok(links)
    }

    /// Takes the kernel programs' log out of the object (call once); `None`, said at debug
    /// level, when it cannot be read.
    pub fn take_kernel_log(&mut self) -> Option<KernelLog> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .map_err(|error| log::debug!("the kernel programs' log cannot be read: {error}"))
            .ok()
    }

    /// Takes the ring buffer of events out of the object (call once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        self.take(MAP_EVENTS)
    }

    /// Takes the maps userspace reads out of the object (call once).
    pub fn take_maps(&mut self) -> Result<KernelMaps, ProbeError> {
        Ok(KernelMaps {
            targets: self.take(MAP_TARGETS)?,
            target_settings: self.take(MAP_TARGET_SETTINGS)?,
            loop_tasks: self.take(MAP_LOOP_TASKS)?,
            running_loop: self.take(MAP_RUNNING_LOOP)?,
            histogram: self.take(MAP_ITERATION_HISTOGRAM)?,
            iteration_max: self.take(MAP_ITERATION_MAX)?,
            counters: self.take(MAP_COUNTERS)?,
            loop_state: self.take(MAP_LOOP_STATE)?,
            off_cpu_stacks: self.take(MAP_OFF_CPU_STACKS)?,
            fault_sampling: self.take(MAP_FAULT_SAMPLING)?,
            listen_ports: self.take(MAP_LISTEN_PORTS)?,
            max_targets: self.max_targets,
            namespaces_known: self.namespaces_known,
            fault_programs_on: self.take(MAP_FAULT_PROGRAMS_ON)?,
        })
    }

    /// Takes map `name` out of the object as an `M`.
    fn take<M: TryFrom<aya::maps::Map, Error = MapError>>(
        &mut self,
        name: &'static str,
    ) -> Result<M, ProbeError> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(ProbeError::MissingMap { name })?;
        M::try_from(map).map_err(map_error(name))
    }
}

/// The error of map `name`.
pub(crate) fn map_error(name: &'static str) -> impl Fn(MapError) -> ProbeError {
    move |cause| ProbeError::Map { name, cause }
}

/// Kernel 6.x accounts BPF memory to the memory cgroup, so a failure here (no
/// CAP_SYS_RESOURCE) is harmless on those kernels; older kernels then fail to load with EPERM.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "cannot raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
