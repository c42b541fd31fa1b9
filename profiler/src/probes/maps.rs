//! The maps the kernel programs fill and userspace reads: each target's slot (its settings,
//! iteration histogram and maximum, counters, loop state, the stacks its loop left the CPU
//! with, its page-fault sampling state) and the listening ports userspace tells the kernel.
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use profiler_common::{
    COUNTERS, Counter, FaultSampling, ITERATION_BUCKETS, ListenKey, LoopState, MAP_COUNTERS,
    MAP_FAULT_PROGRAMS_ON, MAP_FAULT_SAMPLING, MAP_ITERATION_HISTOGRAM, MAP_ITERATION_MAX,
    MAP_LISTEN_PORTS, MAP_LOOP_STATE, MAP_OFF_CPU_STACKS, MAP_RUNNING_LOOP, MAP_TARGET_SETTINGS,
    MAP_TARGETS, RunningLoop, StackEvent, TargetSettings,
};

use super::{ProbeError, map_error};

/// A target's index in the per-target maps.
pub type Slot = u32;

/// The maps the kernel programs fill and userspace reads (the ring buffer aside).
pub struct KernelMaps {
    pub(super) targets: HashMap<MapData, u32, u32>,
    pub(super) target_settings: Array<MapData, TargetSettings>,
    pub(super) loop_tasks: HashMap<MapData, u64, u32>,
    pub(super) running_loop: PerCpuArray<MapData, RunningLoop>,
    pub(super) histogram: Array<MapData, u64>,
    pub(super) iteration_max: Array<MapData, u64>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) loop_state: Array<MapData, LoopState>,
    pub(super) off_cpu_stacks: Array<MapData, StackEvent>,
    pub(super) fault_sampling: Array<MapData, FaultSampling>,
    pub(super) listen_ports: HashMap<MapData, ListenKey, u32>,
    pub(super) max_targets: u32,
    /// Whether listening ports are keyed by network namespace (see [`Self::set_listen_ports`]).
    pub(super) namespaces_known: bool,
    /// 1 while the page-fault programs are attached.
    pub(super) fault_programs_on: Array<MapData, u64>,
}

impl KernelMaps {
    /// Targets the maps have room for.
    pub fn max_targets(&self) -> u32 {
        self.max_targets
    }

    /// Gives `slot` to the target `settings` describes: its entries start from zero, then the
    /// programs see the target.
    pub fn add_target(&mut self, slot: Slot, settings: TargetSettings) -> Result<(), ProbeError> {
        self.clear_slot(slot)?;
        self.target_settings
            .set(slot, settings, 0)
            .map_err(map_error(MAP_TARGET_SETTINGS))?;
        self.targets
            .insert(settings.pid, slot, 0)
            .map_err(map_error(MAP_TARGETS))
    }

    /// Takes `slot` back from target `pid`: the programs stop seeing it, and forget its loop
    /// thread's task (whose address a new task may get).
    pub fn remove_target(&mut self, slot: Slot, pid: u32) -> Result<(), ProbeError> {
        let _ = self.targets.remove(&pid);
        self.target_settings
            .set(slot, TargetSettings::default(), 0)
            .map_err(map_error(MAP_TARGET_SETTINGS))?;
        let tasks: Vec<u64> = self
            .loop_tasks
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, task_slot)| *task_slot == slot)
            .map(|(task, _)| task)
            .collect();
        for task in tasks {
            let _ = self.loop_tasks.remove(&task);
        }
        let running = self
            .running_loop
            .get(&0, 0)
            .map_err(map_error(MAP_RUNNING_LOOP))?;
        if running.iter().any(|entry| entry.slot == u64::from(slot)) {
            let cleared: Vec<RunningLoop> = running
                .iter()
                .map(|entry| {
                    if entry.slot == u64::from(slot) {
                        RunningLoop::default()
                    } else {
                        *entry
                    }
                })
                .collect();
            let values =
                PerCpuValues::try_from(cleared).map_err(per_cpu_error(MAP_RUNNING_LOOP))?;
            self.running_loop
                .set(0, values, 0)
                .map_err(map_error(MAP_RUNNING_LOOP))?;
        }
        self.set_listen_ports(slot, 0, &[])
    }

    /// Zeroes `slot`'s loop state, histogram, maximum, counters and fault sampling.
    fn clear_slot(&mut self, slot: Slot) -> Result<(), ProbeError> {
        self.loop_state
            .set(slot, LoopState::default(), 0)
            .map_err(map_error(MAP_LOOP_STATE))?;
        self.fault_sampling
            .set(slot, FaultSampling::default(), 0)
            .map_err(map_error(MAP_FAULT_SAMPLING))?;
        self.iteration_max
            .set(slot, 0, 0)
            .map_err(map_error(MAP_ITERATION_MAX))?;
        for bucket in 0..ITERATION_BUCKETS {
            self.histogram
                .set(slot * ITERATION_BUCKETS + bucket, 0, 0)
                .map_err(map_error(MAP_ITERATION_HISTOGRAM))?;
        }
        let cpus = self
            .counters
            .get(&0, 0)
            .map_err(map_error(MAP_COUNTERS))?
            .len();
        for counter in 0..COUNTERS {
            let zeros =
                PerCpuValues::try_from(vec![0u64; cpus]).map_err(per_cpu_error(MAP_COUNTERS))?;
            self.counters
                .set(slot * COUNTERS + counter, zeros, 0)
                .map_err(map_error(MAP_COUNTERS))?;
        }
        Ok(())
    }

    /// `slot`'s iteration histogram: cumulative bucket counts (see
    /// `profiler_common::iteration_bucket`).
    pub fn histogram(&self, slot: Slot) -> Result<Vec<u64>, ProbeError> {
        (0..ITERATION_BUCKETS)
            .map(|bucket| self.histogram.get(&(slot * ITERATION_BUCKETS + bucket), 0))
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_ITERATION_HISTOGRAM))
    }

    /// `slot`'s longest iteration since the previous call (ns), and starts a new period. An
    /// iteration that ends between the read and the reset is missed from the maximum only.
    pub fn take_iteration_max_ns(&mut self, slot: Slot) -> Result<u64, ProbeError> {
        let max_ns = self
            .iteration_max
            .get(&slot, 0)
            .map_err(map_error(MAP_ITERATION_MAX))?;
        self.iteration_max
            .set(slot, 0, 0)
            .map_err(map_error(MAP_ITERATION_MAX))?;
        Ok(max_ns)
    }

    /// `slot`'s event loop's state as the kernel last saw it.
    pub fn loop_state(&self, slot: Slot) -> Result<LoopState, ProbeError> {
        self.loop_state
            .get(&slot, 0)
            .map_err(map_error(MAP_LOOP_STATE))
    }

    /// The stacks `slot`'s event-loop thread left the CPU with, when `state` says it is off
    /// the CPU inside an iteration now.
    pub fn pending_off_cpu_stacks(
        &self,
        slot: Slot,
        state: &LoopState,
    ) -> Result<Option<Box<StackEvent>>, ProbeError> {
        if state.switch_out_ns == 0 {
            return Ok(None);
        }
        let stacks = self
            .off_cpu_stacks
            .get(&slot, 0)
            .map_err(map_error(MAP_OFF_CPU_STACKS))?;
        Ok(Some(Box::new(stacks)))
    }

    /// Tells the connection tracer which ports are `slot`'s target's, in its network
    /// namespace `netns` (by number alone when the kernel's layout is unknown).
    pub fn set_listen_ports(
        &mut self,
        slot: Slot,
        netns: u32,
        ports: &[u16],
    ) -> Result<(), ProbeError> {
        let map_error = map_error(MAP_LISTEN_PORTS);
        let netns = if self.namespaces_known { netns } else { 0 };
        let wanted: Vec<ListenKey> = ports
            .iter()
            .map(|&port| ListenKey {
                netns,
                port,
                _padding: 0,
            })
            .collect();
        let known: Vec<ListenKey> = self
            .listen_ports
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(&map_error)?
            .into_iter()
            .filter(|(_, port_slot)| *port_slot == slot)
            .map(|(key, _)| key)
            .collect();
        for key in known.iter().filter(|key| !wanted.contains(key)) {
            self.listen_ports.remove(key).map_err(&map_error)?;
        }
        for key in wanted.iter().filter(|key| !known.contains(key)) {
            self.listen_ports.insert(key, slot, 0).map_err(&map_error)?;
        }
        Ok(())
    }

    /// Tells the per-thread fault events whether the page-fault programs are attached.
    pub fn set_fault_programs_on(&mut self, on: bool) -> Result<(), ProbeError> {
        self.fault_programs_on
            .set(0, u64::from(on), 0)
            .map_err(map_error(MAP_FAULT_PROGRAMS_ON))
    }

    /// A kernel-side counter of `slot`, summed over the CPUs.
    pub fn counter(&self, slot: Slot, counter: Counter) -> Result<u64, ProbeError> {
        let per_cpu = self
            .counters
            .get(&(slot * COUNTERS + counter.index()), 0)
            .map_err(map_error(MAP_COUNTERS))?;
        Ok(per_cpu.iter().sum())
    }
}

/// The error of per-CPU values for map `name` that do not fit the CPUs.
fn per_cpu_error(name: &'static str) -> impl Fn(std::io::Error) -> ProbeError {
    move |cause| ProbeError::PerCpuValues { name, cause }
}
