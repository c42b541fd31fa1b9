//! Human lines on stderr: one per stall, one per interval, the summary at exit.
use std::io::{self, IsTerminal, Write};

use super::{
    Sink, frame_text, human_bytes, human_change, human_duration_ns, human_duration_us,
    record::{
        AcceptOverflow, Alert, AlertState, Attached, ClientCensus, ConnectionCensus, Instance,
        IntervalReport, MemoryGrowth, MemoryReport, Stall, StopReason, Summary,
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
            human_duration_ns(attached.threshold_us * 1_000),
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
        let stats = &report.stats;
        writeln!(
            io::stderr(),
            "{}{} iterations/s {:.0}  p50 {}  p99 {}  p99.9 {}  max {}  stalls {}  lost {}",
            self.prefix(&report.instance),
            rfc3339_micros(std::time::SystemTime::now()),
            stats.iterations as f64 / report.seconds.max(1e-9),
            human_duration_ns(stats.p50_ns),
            human_duration_ns(stats.p99_ns),
            human_duration_ns(stats.p999_ns),
            human_duration_ns(stats.max_ns),
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
        let mut lines = vec![totals_line(summary), profiler_line(summary)];
        lines.extend(lost_line(summary));
        lines.extend(cause_lines(summary));
        lines.extend(accept_lines(summary));
        lines.extend(alerts_line(summary));
        lines.extend(madvise_lines(summary));
        lines.extend(
            summary
                .memory
                .as_ref()
                .map(|growth| format!("  memory: {}", growth_text(growth))),
        );
        lines.extend(connection_lines(summary));
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

/// The summary's first line: iterations, stalls, percentiles, losses.
fn totals_line(summary: &Summary) -> String {
    let stopped = match summary.stopped {
        StopReason::Duration => "duration elapsed",
        StopReason::Signal => "interrupted",
        StopReason::TargetExited => "target exited",
        StopReason::Error => "stopped by an error",
    };
    format!(
        "summary ({stopped}): {} iterations in {:.1}s, {} stalls, {} stack samples; p50 {} p99 {} p99.9 {} max {}; lost events {}",
        summary.iterations,
        summary.duration_s,
        summary.stalls,
        summary.stack_samples,
        human_duration_us(summary.p50_us),
        human_duration_us(summary.p99_us),
        human_duration_us(summary.p999_us),
        human_duration_us(summary.max_us),
        summary.lost_events,
    )
}

fn profiler_line(summary: &Summary) -> String {
    let cost = &summary.profiler;
    format!(
        "  profiler: {} stacks unwound in {}, {} samples symbolized in {}, peak memory {:.1} MiB",
        cost.stacks_unwound,
        human_duration_us(cost.unwind_us),
        cost.samples_symbolized,
        human_duration_us(cost.symbolize_us),
        cost.peak_rss_kib as f64 / 1024.0,
    )
}

/// Each kind of data lost, named; nothing when nothing was lost.
fn lost_line(summary: &Summary) -> Option<String> {
    let lost: Vec<String> = summary
        .lost
        .described()
        .into_iter()
        .map(|(count, what)| format!("{count} {what}"))
        .collect();
    (!lost.is_empty()).then(|| format!("  lost: {}", lost.join("; ")))
}

fn cause_lines(summary: &Summary) -> Vec<String> {
    summary
        .causes
        .iter()
        .map(|cause| {
            format!(
                "  stalls in {}, time in {}: {}, total {}, max {}",
                cause.origin,
                cause.mechanism,
                cause.stalls,
                human_duration_us(cause.total_us),
                human_duration_us(cause.max_us),
            )
        })
        .collect()
}

fn accept_lines(summary: &Summary) -> Vec<String> {
    let Some(accept) = &summary.accept else {
        return Vec::new();
    };
    let mut lines: Vec<String> = accept
        .ports
        .iter()
        .map(|port| {
            format!(
                "  accept queue port {}: {} connections dropped, longest queue {}/{}",
                port.port, port.overflows, port.max_queue, port.limit
            )
        })
        .collect();
    lines.push(format!(
        "  namespace: ListenOverflows +{}, ListenDrops +{}",
        accept.namespace_listen_overflows, accept.namespace_listen_drops
    ));
    let waits = &accept.waits;
    lines.push(format!(
        "  connections: {} entered the accept queues, {} accepted; waited p50 {} p99 {} max {}",
        waits.connections,
        waits.accepted,
        human_duration_us(waits.p50_us),
        human_duration_us(waits.p99_us),
        human_duration_us(waits.max_us),
    ));
    lines
}

fn alerts_line(summary: &Summary) -> Option<String> {
    let alerts = summary.alerts.as_ref()?;
    Some(format!(
        "  alerts: {} final, {} in progress; --alert-exec runs {}, suppressed {}, failed {}",
        alerts.finals,
        alerts.in_progress,
        alerts.exec_runs,
        alerts.exec_suppressed,
        alerts.exec_failed,
    ))
}

fn madvise_lines(summary: &Summary) -> Vec<String> {
    summary
        .madvise
        .iter()
        .map(|line| {
            format!(
                "  madvise {} {}: {} calls, {} MiB, p50 {} p99 {} max {}",
                line.thread_role,
                line.advice,
                line.calls,
                line.bytes >> 20,
                human_duration_us(line.p50_us),
                human_duration_us(line.p99_us),
                human_duration_us(line.max_us),
            )
        })
        .collect()
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

fn connection_lines(summary: &Summary) -> Vec<String> {
    let Some(totals) = &summary.connections else {
        return Vec::new();
    };
    let mut lines = vec![format!(
        "  client connections: {} opened, {} closed, at most {} established at once",
        totals.opened, totals.closed, totals.max_established
    )];
    lines.extend(totals.clients.iter().take(TOP_ON_A_LINE).map(|client| {
        format!(
            "    {}: {} opened, {} closed, {} established at the end (idle p50 {})",
            client.addr,
            client.opened,
            client.closed,
            client.established,
            human_duration_ns(client.idle_ms.p50 * 1_000_000),
        )
    }));
    lines
}
