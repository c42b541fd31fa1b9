//! The maps the kernel programs fill and userspace reads: the iteration histogram and maximum,
//! the counters, the loop's state and the stacks it left the CPU with, and the listening ports
//! userspace tells the kernel.
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use profiler_common::{
    Counter, ITERATION_BUCKETS, LoopState, MAP_COUNTERS, MAP_ITERATION_HISTOGRAM,
    MAP_ITERATION_MAX, MAP_LISTEN_PORTS, MAP_LOOP_STATE, MAP_OFF_CPU_STACKS, StackEvent,
};

use super::{ProbeError, map_error};

/// The maps the kernel programs fill and userspace reads (the ring buffer aside).
pub struct KernelMaps {
    pub(super) histogram: Array<MapData, u64>,
    pub(super) iteration_max: Array<MapData, u64>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) loop_state: Array<MapData, LoopState>,
    pub(super) off_cpu_stacks: Array<MapData, StackEvent>,
    pub(super) listen_ports: HashMap<MapData, u16, u8>,
}

impl KernelMaps {
    /// The iteration histogram's cumulative bucket counts (see `profiler_common::iteration_bucket`).
    pub fn histogram(&self) -> Result<Vec<u64>, ProbeError> {
        (0..ITERATION_BUCKETS)
            .map(|bucket| self.histogram.get(&bucket, 0))
            .collect::<Result<_, _>>()
            .map_err(map_error(MAP_ITERATION_HISTOGRAM))
    }

    /// The longest iteration since the previous call (ns), and starts a new period. An
    /// iteration that ends between the read and the reset is missed from the maximum only.
    pub fn take_iteration_max_ns(&mut self) -> Result<u64, ProbeError> {
        let max_ns = self
            .iteration_max
            .get(&0, 0)
            .map_err(map_error(MAP_ITERATION_MAX))?;
        self.iteration_max
            .set(0, 0, 0)
            .map_err(map_error(MAP_ITERATION_MAX))?;
        Ok(max_ns)
    }

    /// The event loop's state as the kernel last saw it.
    pub fn loop_state(&self) -> Result<LoopState, ProbeError> {
        self.loop_state
            .get(&0, 0)
            .map_err(map_error(MAP_LOOP_STATE))
    }

    /// The stacks the event-loop thread left the CPU with, when `state` says it is off the CPU
    /// inside an iteration now.
    pub fn pending_off_cpu_stacks(
        &self,
        state: &LoopState,
    ) -> Result<Option<Box<StackEvent>>, ProbeError> {
        if state.switch_out_ns == 0 {
            return Ok(None);
        }
        let stacks = self
            .off_cpu_stacks
            .get(&0, 0)
            .map_err(map_error(MAP_OFF_CPU_STACKS))?;
        Ok(Some(Box::new(stacks)))
    }

    /// Tells the connection tracer which ports are the target's.
    pub fn set_listen_ports(&mut self, ports: &[u16]) -> Result<(), ProbeError> {
        let map_error = map_error(MAP_LISTEN_PORTS);
        let known: Vec<u16> = self
            .listen_ports
            .keys()
            .collect::<Result<_, _>>()
            .map_err(&map_error)?;
        for port in known.iter().filter(|port| !ports.contains(port)) {
            self.listen_ports.remove(port).map_err(&map_error)?;
        }
        for port in ports.iter().filter(|port| !known.contains(port)) {
            self.listen_ports.insert(port, 1, 0).map_err(&map_error)?;
        }
        Ok(())
    }

    /// A kernel-side counter, summed over the CPUs.
    pub fn counter(&self, counter: Counter) -> Result<u64, ProbeError> {
        let per_cpu = self
            .counters
            .get(&counter.index(), 0)
            .map_err(map_error(MAP_COUNTERS))?;
        Ok(per_cpu.iter().sum())
    }
}
