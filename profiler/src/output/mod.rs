//! Outputs: the records a run produces ([`record`], the JSON schema) and the sinks that write
//! them (console lines on stderr, JSON lines to a file or stdout, folded stacks, a flamegraph
//! and a pprof profile at exit, the memory growth's stacks, and the HTML report). Every sink
//! sees every record, in order; only outputs give frames their text ([`frame_text`]).
use std::{
    cell::RefCell,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
    rc::Rc,
};

mod console;
pub mod frame_text;
mod html;
mod json;
mod memory_stacks;
mod pprof;
pub mod record;
mod stacks;

pub use console::ConsoleSink;
pub use html::{HtmlReport, HtmlSink};
pub use json::JsonSink;
pub use memory_stacks::MemoryStacksSink;
pub use pprof::{PprofProfile, PprofSink};
pub use stacks::{FoldedStacks, StackFilesSink, flamegraph_title};

use record::{
    AcceptOverflow, Alert, Attached, ConnectionCensus, Instance, IntervalReport, MemoryReport,
    Stall, Summary,
};

/// A destination for a run's records; a sink writes the kinds it has a use for.
pub trait Sink {
    fn attached(&mut self, _attached: &Attached) -> io::Result<()> {
        Ok(())
    }
    fn stall(&mut self, _stall: &Stall) -> io::Result<()> {
        Ok(())
    }
    fn alert(&mut self, _alert: &Alert) -> io::Result<()> {
        Ok(())
    }
    /// Connections dropped with a full accept queue outside any stall.
    fn accept_overflow(&mut self, _overflow: &AcceptOverflow) -> io::Result<()> {
        Ok(())
    }
    fn interval(&mut self, _report: &IntervalReport) -> io::Result<()> {
        Ok(())
    }
    /// Memory growth in one interval.
    fn memory(&mut self, _report: &MemoryReport) -> io::Result<()> {
        Ok(())
    }
    /// The census of client connections.
    fn connections(&mut self, _census: &ConnectionCensus) -> io::Result<()> {
        Ok(())
    }
    fn summary(&mut self, summary: &Summary) -> io::Result<()>;
    /// What to call this sink in an error message.
    fn describe(&self) -> String;
    /// Reopens files by their paths (SIGHUP, after log rotation).
    fn reopen(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write to {output}")]
pub struct OutputError {
    pub output: String,
    #[source]
    pub cause: io::Error,
}

/// Sinks every watched instance writes to (the run's console, JSON lines, shared stack files).
pub type SharedSinks = Rc<RefCell<Vec<Box<dyn Sink>>>>;

/// A record that names the instance it is about.
pub trait Named {
    fn name(&mut self, instance: &Instance);
}

macro_rules! named_by_field {
    ($($record:ty),*) => {
        $(impl Named for $record {
            fn name(&mut self, instance: &Instance) {
                self.instance = instance.clone();
            }
        })*
    };
}

named_by_field!(
    Attached,
    Stall,
    AcceptOverflow,
    IntervalReport,
    MemoryReport,
    ConnectionCensus,
    Summary
);

impl Named for Alert {
    fn name(&mut self, instance: &Instance) {
        self.stall.name(instance);
    }
}

/// Every sink of one instance: the run's shared ones, then its own (stack files named after
/// it). The instance is named here, once: every record that goes out carries its name.
pub struct Outputs {
    shared: SharedSinks,
    own: Vec<Box<dyn Sink>>,
    instance: Instance,
}

impl Outputs {
    pub fn new(shared: SharedSinks, own: Vec<Box<dyn Sink>>, instance: Instance) -> Self {
        Self {
            shared,
            own,
            instance,
        }
    }

    /// The instance the records are about.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// The records are about `instance` from now on (a new program, the next process, a port
    /// known at last).
    pub fn rename(&mut self, instance: Instance) {
        self.instance = instance;
    }

    /// Names `record` as the outputs do (for a record that goes elsewhere first).
    pub fn name(&self, record: &mut impl Named) {
        record.name(&self.instance);
    }

    fn each(
        &mut self,
        mut write: impl FnMut(&mut dyn Sink) -> io::Result<()>,
    ) -> Result<(), OutputError> {
        let mut shared = self.shared.borrow_mut();
        for sink in shared.iter_mut().chain(&mut self.own) {
            write(sink.as_mut()).map_err(|cause| OutputError {
                output: sink.describe(),
                cause,
            })?;
        }
        Ok(())
    }

    pub fn attached(&mut self, attached: &mut Attached) -> Result<(), OutputError> {
        attached.name(&self.instance);
        self.each(|sink| sink.attached(attached))
    }

    pub fn stall(&mut self, stall: &mut Stall) -> Result<(), OutputError> {
        stall.name(&self.instance);
        self.each(|sink| sink.stall(stall))
    }

    pub fn alert(&mut self, alert: &mut Alert) -> Result<(), OutputError> {
        alert.name(&self.instance);
        self.each(|sink| sink.alert(alert))
    }

    pub fn accept_overflow(&mut self, overflow: &mut AcceptOverflow) -> Result<(), OutputError> {
        overflow.name(&self.instance);
        self.each(|sink| sink.accept_overflow(overflow))
    }

    pub fn interval(&mut self, report: &mut IntervalReport) -> Result<(), OutputError> {
        report.name(&self.instance);
        self.each(|sink| sink.interval(report))
    }

    pub fn memory(&mut self, report: &mut MemoryReport) -> Result<(), OutputError> {
        report.name(&self.instance);
        self.each(|sink| sink.memory(report))
    }

    pub fn connections(&mut self, census: &mut ConnectionCensus) -> Result<(), OutputError> {
        census.name(&self.instance);
        self.each(|sink| sink.connections(census))
    }

    /// Reopens every sink's files (SIGHUP).
    pub fn reopen(&mut self) -> Result<(), OutputError> {
        self.each(|sink| sink.reopen())
    }

    /// Writes the summary to every sink that still works; reports the first failure.
    pub fn summary(&mut self, summary: &mut Summary) -> Result<(), OutputError> {
        summary.name(&self.instance);
        let mut first_error = None;
        let mut shared = self.shared.borrow_mut();
        for sink in shared.iter_mut().chain(&mut self.own) {
            if let Err(cause) = sink.summary(summary) {
                first_error.get_or_insert(OutputError {
                    output: sink.describe(),
                    cause,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Creates (or empties) the output file at `path`, never through a symbolic link planted in its
/// place: the profiler runs as root, and outputs often go to directories others can write to.
pub fn create_output_file(path: &Path) -> io::Result<File> {
    open_output_file(
        path,
        OpenOptions::new().write(true).create(true).truncate(true),
    )
}

/// Opens the output file at `path` to append to it (created if missing), never through a
/// symbolic link (see [`create_output_file`]).
pub fn append_output_file(path: &Path) -> io::Result<File> {
    open_output_file(path, OpenOptions::new().create(true).append(true))
}

fn open_output_file(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    options
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|error| {
            if error.raw_os_error() == Some(libc::ELOOP) {
                io::Error::other(format!(
                    "`{}` is a symbolic link; outputs are not written through one (give the \
                     path it points to, or - for stdout)",
                    path.display()
                ))
            } else {
                error
            }
        })
}

/// `312 clients waiting (4 MiB, the longest 1.2s)`: the clients a stall held up, for people.
fn waiting_text(waiting: &record::StallWaiters) -> String {
    let clients = if waiting.connections == 1 {
        "client"
    } else {
        "clients"
    };
    format!(
        "{} {clients} waiting ({}, the longest {})",
        waiting.connections,
        human_bytes(waiting.bytes),
        human_duration_us(waiting.longest_wait_us)
    )
}

/// `812us`, `12.3ms`, `1.43s`: a duration for people.
pub fn human_duration_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{}us", ns / 1_000),
        1_000_000..1_000_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}

/// A duration recorded in whole microseconds, for people: `<1us` for what rounded down to 0.
pub fn human_duration_us(us: u64) -> String {
    if us == 0 {
        "<1us".to_owned()
    } else {
        human_duration_ns(us * 1_000)
    }
}

/// `312 MiB`, `20 KiB`, `1.2 GiB`: a size for people (binary units).
pub fn human_bytes(bytes: u64) -> String {
    match bytes {
        0..1_024 => format!("{bytes} B"),
        1_024..1_048_576 => format!("{} KiB", bytes / 1_024),
        1_048_576..1_073_741_824 => format!("{} MiB", bytes >> 20),
        _ => format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64),
    }
}

/// A signed size change for people: `+312 MiB`, `-5 KiB`.
pub fn human_change(bytes: i64) -> String {
    let sign = if bytes < 0 { '-' } else { '+' };
    format!("{sign}{}", human_bytes(bytes.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_is_never_written_through_a_symbolic_link() {
        let directory = tempfile::tempdir().unwrap();
        let victim = directory.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let planted = directory.path().join("stalls.jsonl");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let error = create_output_file(&planted).unwrap_err().to_string();
        assert!(error.contains("is a symbolic link"), "{error}");
        assert!(append_output_file(&planted).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        let plain = directory.path().join("plain");
        create_output_file(&plain).unwrap();
        assert!(append_output_file(&plain).is_ok());
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(20 << 10), "20 KiB");
        assert_eq!(human_bytes(312 << 20), "312 MiB");
        assert_eq!(human_bytes(1_288_490_189), "1.2 GiB");
        assert_eq!(human_change(-(5 << 20)), "-5 MiB");
        assert_eq!(human_change(312 << 20), "+312 MiB");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration_ns(812_400), "812us");
        assert_eq!(human_duration_ns(12_345_678), "12.3ms");
        assert_eq!(human_duration_ns(1_430_000_000), "1.43s");
        assert_eq!(human_duration_ns(999), "999ns");
        assert_eq!(human_duration_us(0), "<1us");
        assert_eq!(human_duration_us(1_430), "1.4ms");
    }
}
