//! Every record a run writes and `report` reads back (`docs/reference/json.md`, and its JSON
//! Schema): the `attached` record, stalls with their stacks, alerts, accept-queue overflows
//! outside stalls, interval lines, memory growth ([`memory`]), the connection census
//! ([`connections`]), and the [`summary`]. Fields added later are `#[serde(default)]`, so older
//! recordings read.
mod connections;
mod memory;
mod summary;

pub use connections::{ClientCensus, ConnectionCensus, ConnectionTotals, IdleTimes};
pub use memory::{GrowthEntry, GrowthStack, MemoryGrowth, MemoryReport};

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use summary::{
    AcceptSummary, AcceptWaits, AlertCounts, CauseSummary, LostEvents, MadviseSummary,
    PortOverflows, ProfilerCost, RunLosses, StallCauses, StopReason, Summary, UserLoss,
};

use crate::{
    clock::rfc3339,
    stack::{Frame, StackKind},
};

/// Origin or mechanism when nothing matches / no time was sampled.
pub use crate::attribute::UNKNOWN;

/// The Redis a record is about: one run may watch several, so every record names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Instance {
    pub pid: u32,
    /// Its lowest listening TCP port (none without a TCP listener).
    pub port: Option<u16>,
    /// Its process name (`comm`): `redis-server`, `valkey-server`.
    pub name: String,
}

impl std::fmt::Display for Instance {
    /// `redis-server:6379 pid 1234`, or `redis-server pid 1234` without a port.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}", self.name)?;
        if let Some(port) = self.port {
            write!(formatter, ":{port}")?;
        }
        write!(formatter, " pid {}", self.pid)
    }
}

/// Sent once every probe is live. Read back leniently (`report` needs only the name and pid).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Attached {
    pub instance: Instance,
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub pid: u32,
    pub tid: u32,
    pub threshold_us: u64,
    /// `comm` of the target.
    pub name: String,
    /// TCP ports the target listens on.
    pub ports: Vec<u16>,
    /// Whether polls from inside long commands (`processEventsWhileBlocked`) are recognised.
    pub nested_poll_tracking: bool,
    /// How the scheduler and fault programs are attached: `per_thread` (the rest of the host
    /// pays nothing per context switch) or `host_wide`.
    pub probes: String,
}

impl Default for Attached {
    fn default() -> Self {
        Self {
            instance: Instance::default(),
            time: SystemTime::UNIX_EPOCH,
            pid: 0,
            tid: 0,
            threshold_us: 0,
            name: "redis-server".to_owned(),
            ports: Vec::new(),
            nested_poll_tracking: false,
            probes: String::new(),
        }
    }
}

/// One event-loop iteration at or above the threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stall {
    /// Named by the run when the stall goes out (empty until then).
    #[serde(default)]
    pub instance: Instance,
    /// When the iteration began (the poll before it returned).
    #[serde(rename = "time", with = "rfc3339")]
    pub start: SystemTime,
    pub pid: u32,
    pub tid: u32,
    pub duration_us: u64,
    pub threshold_us: u64,
    /// What Redis was doing: the origin carrying the most time.
    #[serde(default = "unknown")]
    pub origin: String,
    /// Where the time went: the mechanism carrying the most time.
    #[serde(default = "unknown")]
    pub mechanism: String,
    /// Every (origin, mechanism) pair with its time, heaviest first.
    #[serde(default)]
    pub breakdown: Vec<BreakdownEntry>,
    /// On-CPU samples times the sampling period (sampling starts at the gate).
    #[serde(default)]
    pub on_cpu_us: u64,
    /// Time blocked off the CPU, in blocks of at least `--min-block`.
    #[serde(default)]
    pub off_cpu_us: u64,
    /// Time runnable, waiting for a CPU.
    #[serde(default)]
    pub runqueue_us: u64,
    /// Stack samples taken in the stall (on-CPU ticks and off-CPU records).
    #[serde(default)]
    pub samples: u64,
    /// The heaviest distinct stacks, heaviest first.
    #[serde(default)]
    pub stacks: Vec<WeightedStack>,
    /// The event-loop thread's madvise calls inside the stall.
    #[serde(default)]
    pub madvise: MadviseTotals,
    /// The listening sockets' accept queues during the stall (when they are watched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept: Option<StallAccept>,
    /// True when stack samples may be missing from this stall (the ring buffer was full, or too
    /// many were pending): its times and stacks are then lower bounds.
    #[serde(default)]
    pub incomplete: bool,
    /// True when an io thread made the poll the iteration began with (Valkey 8 and later):
    /// the loop turned without blocking, its wrappers' time waiting for its io threads.
    #[serde(default)]
    pub poll_handed_off: bool,
    /// Who sent the command the stall ran (see [`StallClient`]).
    #[serde(default)]
    pub client: StallClient,
    /// The clients the stall held up, when its server's connections were seen while it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<StallWaiters>,
}

impl Stall {
    /// Renames the stall's origin `typed` (the command its client typed, where its stacks
    /// could not tell it from others sharing their code), in its breakdown and stacks too.
    pub fn rename_origin(&mut self, typed: &str) {
        let before = std::mem::replace(&mut self.origin, typed.to_owned());
        for entry in &mut self.breakdown {
            if entry.origin == before {
                entry.origin = typed.to_owned();
            }
        }
        for stack in &mut self.stacks {
            if stack.origin == before {
                stack.origin = typed.to_owned();
            }
        }
    }
}

/// Who sent the command a stall ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallClient {
    /// How it is known.
    pub source: ClientSource,
    /// The sender, or every client it may be when several are possible (then the record says
    /// so: it never makes a guess look certain).
    pub candidates: Vec<ClientPeer>,
    /// Further possible senders, left out of `candidates` (it lists 8 at most).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub others: u64,
    /// The command's name as the client typed it (`exact` only; never keys or values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

impl StallClient {
    /// The sender, when there is exactly one candidate.
    pub fn sender(&self) -> Option<&ClientPeer> {
        match (self.candidates.as_slice(), self.others) {
            ([only], 0) => Some(only),
            _ => None,
        }
    }

    /// How many clients may have sent the command.
    pub fn possible_senders(&self) -> u64 {
        self.candidates.len() as u64 + self.others
    }
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

/// How the sender of a stall's command is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientSource {
    /// The connection the event-loop thread read the command from (`--clients exact`).
    Exact,
    /// The connections whose data had just arrived, all read, when the iteration began.
    Census,
    /// The stall ran no command (cron, expiry, ...): it has no sender.
    #[serde(rename = "none")]
    NoCommand,
    /// A command's stall, with nothing seen to tell whose (and a record written before
    /// senders were recorded).
    #[default]
    Unknown,
}

/// One client connection: `ip:port` (IPv6 in brackets) or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientPeer {
    pub addr: String,
}

/// The clients a stall held up: the connections with requests waiting in their receive queues
/// when the stall was last seen running.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallWaiters {
    pub connections: u64,
    /// Bytes waiting in their receive queues.
    pub bytes: u64,
    /// The longest any of them had waited when the stall ended, at least: since its last data
    /// arrived.
    pub longest_wait_us: u64,
    /// The client addresses with most connections waiting.
    pub top: Vec<WaitingClients>,
}

/// The waiting connections of one client address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingClients {
    pub addr: String,
    pub connections: u64,
    pub bytes: u64,
}

fn unknown() -> String {
    UNKNOWN.to_owned()
}

/// One distinct stack of a stall and the time spent in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightedStack {
    pub weight_us: u64,
    pub kind: StackKind,
    /// What Redis was doing (see [`crate::attribute`]).
    #[serde(default = "unknown")]
    pub origin: String,
    /// Where the time went.
    #[serde(default = "unknown")]
    pub mechanism: String,
    /// Stack samples behind it (on-CPU ticks, off-CPU records).
    pub samples: u64,
    /// Leaf first: kernel frames, then user frames down to `main`.
    #[serde(with = "super::frame_text::frames")]
    pub frames: Vec<Frame>,
}

/// The time of one (origin, mechanism) pair in a stall.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakdownEntry {
    pub origin: String,
    pub mechanism: String,
    pub us: u64,
    /// Fraction of the stall's sampled time.
    pub share: f64,
}

/// madvise calls summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MadviseTotals {
    pub calls: u64,
    pub bytes: u64,
    pub us: u64,
}

/// The accept queues during a stall.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallAccept {
    /// Connections dropped by the listeners during the stall.
    pub overflows: u64,
    /// Longest accept queue seen.
    pub max_queue: u32,
    /// Its limit.
    pub limit: u32,
    /// Connections that completed their handshake (entered an accept queue) during the stall.
    #[serde(default)]
    pub new_connections: u64,
    /// Their clients, most connections first.
    #[serde(default)]
    pub top_clients: Vec<ClientConnections>,
}

/// Connections of one client address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConnections {
    pub addr: String,
    pub connections: u64,
}

/// Drops outside any stall, reported on their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptOverflow {
    #[serde(default)]
    pub instance: Instance,
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub port: u16,
    pub overflows: u64,
    pub max_queue: u32,
    pub limit: u32,
}

/// Whether the stall is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The iteration is still running; the stall's fields cover what was sampled so far.
    InProgress,
    /// The stall ended.
    Final,
}

/// An alert: the stall's fields, its state and, in progress, how long it has run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Alert {
    pub state: AlertState,
    /// In progress: how long the iteration has been running.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub elapsed_us: Option<u64>,
    /// The alert threshold.
    pub alert_us: u64,
    #[serde(flatten)]
    pub stall: Stall,
}

/// One `--interval` period of a target's event loop (JSON `interval`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntervalReport {
    #[serde(default)]
    pub instance: Instance,
    /// The interval's end.
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub seconds: f64,
    /// Iterations that ended in the interval, and their percentiles (bucket midpoints) and
    /// maximum (exact), in us.
    pub iterations: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub stalls: u64,
    pub lost_events: u64,
}

impl IntervalReport {
    /// The report of an interval of `seconds` that ends now.
    pub fn new(
        seconds: f64,
        stats: crate::histogram::IterationStats,
        stalls: u64,
        lost_events: u64,
    ) -> Self {
        Self {
            instance: Instance::default(),
            time: SystemTime::now(),
            seconds,
            iterations: stats.iterations,
            p50_us: stats.p50_ns / 1_000,
            p99_us: stats.p99_ns / 1_000,
            p999_us: stats.p999_ns / 1_000,
            max_us: stats.max_ns / 1_000,
            stalls,
            lost_events,
        }
    }
}

#[cfg(test)]
impl Stall {
    /// A stall for tests: `duration_us` long, with this diagnosis and nothing sampled.
    pub(crate) fn example(origin: &str, mechanism: &str, duration_us: u64) -> Self {
        Self {
            instance: Instance::default(),
            start: SystemTime::UNIX_EPOCH,
            pid: 42,
            tid: 42,
            duration_us,
            threshold_us: 10_000,
            origin: origin.into(),
            mechanism: mechanism.into(),
            breakdown: Vec::new(),
            on_cpu_us: 0,
            off_cpu_us: 0,
            runqueue_us: 0,
            samples: 0,
            stacks: Vec::new(),
            madvise: MadviseTotals::default(),
            accept: None,
            incomplete: false,
            poll_handed_off: false,
            client: StallClient::default(),
            waiting: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stall line written by the version before typed frames.
    const RECORDED: &str = r#"{"type":"stall","time":"2026-11-23T10:00:00.000000Z","pid":7,"tid":7,"duration_us":250300,"threshold_us":10000,"origin":"command:debug","mechanism":"syscall.sleep","breakdown":[{"origin":"command:debug","mechanism":"syscall.sleep","us":250000,"share":1.0}],"on_cpu_us":0,"off_cpu_us":250000,"runqueue_us":0,"samples":1,"stacks":[{"weight_us":250000,"kind":"off_cpu","origin":"command:debug","mechanism":"syscall.sleep","samples":1,"frames":["do_nanosleep_[k]","__GI___nanosleep","debugCommand","redis-server+0x64ef7","main"]}],"madvise":{"calls":0,"bytes":0,"us":0},"incomplete":false}"#;

    #[test]
    fn a_recorded_stall_reads_with_typed_frames_and_writes_back_the_same() {
        let stall: Stall = serde_json::from_str(RECORDED).unwrap();
        let frames = &stall.stacks[0].frames;
        assert_eq!(frames[0], Frame::Kernel("do_nanosleep".into()));
        assert_eq!(
            frames[3],
            Frame::Unnamed {
                module: "redis-server".into(),
                offset: 0x64ef7
            }
        );
        let mut written = serde_json::to_value(&stall).unwrap();
        written["type"] = "stall".into();
        let mut recorded: serde_json::Value = serde_json::from_str(RECORDED).unwrap();
        // Fields added since, read as their defaults.
        recorded["poll_handed_off"] = false.into();
        recorded["client"] = serde_json::json!({"source": "unknown", "candidates": []});
        recorded["instance"] = serde_json::json!({"pid": 0, "port": null, "name": ""});
        assert_eq!(written, recorded);
    }
}
