//! Human lines on stderr: one per stall, one per interval (with the memory growth and the
//! connection census), the summary at exit ([`summary_lines`]).
mod summary_lines;

use std::io::{self, IsTerminal, Write};

use super::{
    Sink, frame_text, human_bytes, human_change, human_duration_ns, human_duration_us,
    record::{
        AcceptOverflow, Alert, AlertState, Attached, ClientCensus, ConnectionCensus, Instance,
        IntervalReport, MemoryGrowth, MemoryReport, Stall, Summary,
    },
};
use crate::clock::rfc3339_micros;

/// Frames of the heaviest stack shown under a stall, leaf first.
const TOP_FRAMES: usize = 12;
/// Origins of memory growth and client addresses named on one line.
const TOP_ON_A_LINE: usize = 3;

/// Writes human-readable lines to stderr.
#[derive(Default)]
pub struct ConsoleSink {
    /// Whether each record's lines start with its instance (a run watching several).
    name_instances: bool,
}

impl ConsoleSink {
    /// A console whose records start with their instance: `[redis-server:6379 pid 1234] `.
    pub fn naming_instances() -> Self {
        Self {
            name_instances: true,
        }
    }

    fn prefix(&self, instance: &Instance) -> String {
        if self.name_instances {
            format!("[{instance}] ")
        } else {
            String::new()
        }
    }
}

/// `, from 127.0.0.2:40312 (keys)` or `, from one of 3 clients`, then `; 312 clients waiting
/// (4 MiB, the longest 1.2s)`: a stall's clients for people (nothing of what is not known).
fn clients_text(stall: &Stall) -> String {
    let client = &stall.client;
    let mut text = match (client.sender(), client.possible_senders(), &client.command) {
        (Some(sender), _, _) => format!(", from {}", sender.addr),
        (None, 0, None) => String::new(),
        (None, 0, Some(_)) => ", from an unnamed client".to_owned(),
        (None, candidates, _) => format!(", from one of {candidates} clients"),
    };
    if let Some(command) = &client.command {
        text += &format!(" ({command})");
    }
    if let Some(waiting) = stall
        .waiting
        .as_ref()
        .filter(|waiting| waiting.connections > 0)
    {
        text += &format!("; {}", super::waiting_text(waiting));
    }
    text
}

impl Sink for ConsoleSink {
    fn attached(&mut self, attached: &Attached) -> io::Result<()> {
        let ports: Vec<String> = attached.ports.iter().map(u16::to_string).collect();
        let ports = if ports.is_empty() {
            "no TCP port".to_owned()
        } else {
            format!("port {}", ports.join(", "))
        };
        writeln!(
            io::stderr(),
            "redis-stallprof: attached to {} pid {} ({ports}); stall threshold {}",
            attached.name,
            attached.pid,
            human_duration_us(attached.threshold_us),
        )
    }

    fn stall(&mut self, stall: &Stall) -> io::Result<()> {
        let us = |value: u64| human_duration_ns(value * 1_000);
        let mut line = format!(
            "{}{} STALL {} in {}, time in {} (threshold {}, pid {}): on-CPU {}, off-CPU {}, runqueue {}",
            self.prefix(&stall.instance),
            rfc3339_micros(stall.start),
            us(stall.duration_us),
            stall.origin,
            stall.mechanism,
            us(stall.threshold_us),
            stall.pid,
            us(stall.on_cpu_us),
            us(stall.off_cpu_us),
            us(stall.runqueue_us),
        );
        if stall.madvise.calls > 0 {
            line += &format!(
                ", madvise {} calls {} MiB {}",
                stall.madvise.calls,
                stall.madvise.bytes >> 20,
                us(stall.madvise.us)
            );
        }
        if let Some(accept) = stall.accept.as_ref().filter(|accept| accept.overflows > 0) {
            line += &format!(
                ", accept queue overflowed: {} connections dropped (queue {}/{}), {} new connections",
                accept.overflows, accept.max_queue, accept.limit, accept.new_connections
            );
            if let Some(top) = accept.top_clients.first() {
                line += &format!(", most from {} ({})", top.addr, top.connections);
            }
        }
        line += &clients_text(stall);
        if stall.incomplete {
            line += " [incomplete: samples were lost]";
        }
        if let Some(heaviest) = stall.stacks.first() {
            let frames: Vec<String> = heaviest
                .frames
                .iter()
                .take(TOP_FRAMES)
                .map(frame_text::render)
                .collect();
            line += &format!(
                "\n    heaviest stack, {} {} ({} / {}): {}",
                heaviest.kind.as_str(),
                us(heaviest.weight_us),
                heaviest.origin,
                heaviest.mechanism,
                frames.join(" < ")
            );
        }
        writeln!(io::stderr(), "{line}")
    }

    fn alert(&mut self, alert: &Alert) -> io::Result<()> {
        let us = |value: u64| human_duration_ns(value * 1_000);
        let stall = &alert.stall;
        let what = match (alert.state, alert.elapsed_us) {
            (AlertState::InProgress, Some(elapsed_us)) => {
                format!("event loop stalled for {} and counting", us(elapsed_us))
            }
            _ => format!("stall of {}", us(stall.duration_us)),
        };
        let line = format!(
            "{}ALERT {}: {what} (alert at {}), in {}, time in {}, pid {}",
            self.prefix(&stall.instance),
            rfc3339_micros(stall.start),
            us(alert.alert_us),
            stall.origin,
            stall.mechanism,
            stall.pid,
        );
        let mut stderr = io::stderr();
        if stderr.is_terminal() {
            writeln!(stderr, "\x1b[1;31m{line}\x1b[0m")
        } else {
            writeln!(stderr, "{line}")
        }
    }

    fn accept_overflow(&mut self, overflow: &AcceptOverflow) -> io::Result<()> {
        writeln!(
            io::stderr(),
            "{}{} ACCEPT QUEUE OVERFLOW on port {} outside any stall: {} connections dropped (queue {}/{})",
            self.prefix(&overflow.instance),
            rfc3339_micros(overflow.time),
            overflow.port,
            overflow.overflows,
            overflow.max_queue,
            overflow.limit,
        )
    }

    fn interval(&mut self, report: &IntervalReport) -> io::Result<()> {
        writeln!(
            io::stderr(),
            "{}{} iterations/s {:.0}  p50 {}  p99 {}  p99.9 {}  max {}  stalls {}  lost {}",
            self.prefix(&report.instance),
            rfc3339_micros(report.time),
            report.iterations as f64 / report.seconds.max(1e-9),
            human_duration_us(report.p50_us),
            human_duration_us(report.p99_us),
            human_duration_us(report.p999_us),
            human_duration_us(report.max_us),
            report.stalls,
            report.lost_events,
        )
    }

    fn memory(&mut self, report: &MemoryReport) -> io::Result<()> {
        writeln!(
            io::stderr(),
            "{}{} MEMORY {} in {:.0}s",
            self.prefix(&report.instance),
            rfc3339_micros(report.time),
            growth_text(&report.growth),
            report.seconds,
        )
    }

    fn connections(&mut self, census: &ConnectionCensus) -> io::Result<()> {
        let clients: Vec<String> = census
            .clients
            .iter()
            .take(TOP_ON_A_LINE)
            .map(client_text)
            .collect();
        writeln!(
            io::stderr(),
            "{}{} CONNECTIONS {} established from {} addresses, {} opened, {} closed in {:.0}s; {}",
            self.prefix(&census.instance),
            rfc3339_micros(census.time),
            census.established,
            census.addresses,
            census.opened,
            census.closed,
            census.seconds,
            clients.join(", "),
        )
    }

    fn summary(&mut self, summary: &Summary) -> io::Result<()> {
        let lines = summary_lines::lines(summary);
        let prefix = self.prefix(&summary.instance);
        let mut stderr = io::stderr().lock();
        for line in lines {
            writeln!(stderr, "{prefix}{line}")?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "stderr".to_owned()
    }
}

/// `resident +312 MiB (now 1.2 GiB): command:sadd 290 MiB, client.io 20 MiB; given back 5 MiB
/// (madvised 8 MiB); copied on write 0 B`.
fn growth_text(growth: &MemoryGrowth) -> String {
    let named: Vec<String> = growth
        .growth
        .iter()
        .take(TOP_ON_A_LINE)
        .map(|entry| {
            format!(
                "{} ({}) {}",
                entry.origin,
                entry.mechanism,
                human_bytes(entry.bytes)
            )
        })
        .collect();
    format!(
        "resident {} (now {}), {} faulted in: {}; given back {} (madvised {}); copied on write {}",
        human_change(growth.resident_change_bytes),
        human_bytes(growth.resident_bytes),
        human_bytes(growth.new_page_bytes),
        if named.is_empty() {
            "not sampled".to_owned()
        } else {
            named.join(", ")
        },
        human_bytes(growth.given_back_bytes),
        human_bytes(growth.madvised_bytes),
        human_bytes(growth.copied_bytes),
    )
}

/// `127.0.0.2: 200 established (idle p50 3.9s, max 4.1s; 2 KiB received), +0 -0`.
fn client_text(client: &ClientCensus) -> String {
    format!(
        "{}: {} established (idle p50 {}, max {}; {} received), +{} -{}",
        client.addr,
        client.established,
        human_duration_ns(client.idle_ms.p50 * 1_000_000),
        human_duration_ns(client.idle_ms.max * 1_000_000),
        human_bytes(client.received_bytes),
        client.opened,
        client.closed,
    )
}
