//! The summary's lines on the console: totals, the profiler's cost, losses, causes, accept
//! queues, alerts, madvise, memory growth and client connections.
use super::{TOP_ON_A_LINE, growth_text};
use crate::output::{
    human_duration_ns, human_duration_us,
    record::{RunLosses, StopReason, Summary},
};

/// Every line of the summary, in order.
pub(super) fn lines(summary: &Summary) -> Vec<String> {
    let mut lines = vec![totals_line(summary), profiler_line(summary)];
    lines.extend(lost_line(summary));
    lines.extend(run_lost_line(summary));
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
    lines
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

/// What the run lost that no instance is charged with; nothing when nothing was.
fn run_lost_line(summary: &Summary) -> Option<String> {
    let lost = summary.run_lost;
    (lost != RunLosses::default()).then(|| {
        format!(
            "  lost by the run (no instance to charge): {} records that did not decode, {} \
             events of targets already ended",
            lost.undecodable, lost.of_ended_targets
        )
    })
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
        "  alerts: {} final, {} in progress; --alert-exec runs {}, suppressed {}, dropped {}, \
         failed {}, not run {}",
        alerts.finals,
        alerts.in_progress,
        alerts.exec_runs,
        alerts.exec_suppressed,
        alerts.exec_dropped,
        alerts.exec_failed,
        alerts.exec_not_run,
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
