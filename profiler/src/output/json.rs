//! JSON lines: one object per record with a `"type"` field (`docs/reference/json.md`). Each
//! line is flushed as it is written, so a reader sees `attached` as soon as the probes are live.
use std::io::{self, BufWriter, Write};

use serde::Serialize;

use super::{
    Sink,
    record::{
        AcceptOverflow, Alert, Attached, ConnectionCensus, IntervalReport, MemoryReport, Stall,
        Summary,
    },
};
use crate::cli::OutputPath;

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Record<'a> {
    Attached(&'a Attached),
    Stall(&'a Stall),
    Alert(&'a Alert),
    AcceptOverflow(&'a AcceptOverflow),
    Interval(&'a IntervalReport),
    Memory(&'a MemoryReport),
    Connections(&'a ConnectionCensus),
    Summary(&'a Summary),
}

/// Writes JSON lines to a file or stdout.
pub struct JsonSink {
    path: OutputPath,
    writer: BufWriter<Box<dyn Write>>,
}

impl JsonSink {
    /// Creates (truncates) the file now, so an unwritable path fails before attaching.
    pub fn create(path: &OutputPath) -> io::Result<Self> {
        let writer: Box<dyn Write> = match path {
            OutputPath::Stdout => Box::new(io::stdout()),
            OutputPath::File(file) => Box::new(super::create_output_file(file)?),
        };
        Ok(Self {
            path: path.clone(),
            writer: BufWriter::new(writer),
        })
    }

    fn write(&mut self, record: &Record<'_>) -> io::Result<()> {
        serde_json::to_writer(&mut self.writer, record)?;
        self.writer.write_all(b"\n")?;
        self.writer.flush()
    }
}

impl Sink for JsonSink {
    fn attached(&mut self, attached: &Attached) -> io::Result<()> {
        self.write(&Record::Attached(attached))
    }

    fn stall(&mut self, stall: &Stall) -> io::Result<()> {
        self.write(&Record::Stall(stall))
    }

    fn interval(&mut self, report: &IntervalReport) -> io::Result<()> {
        self.write(&Record::Interval(report))
    }

    fn memory(&mut self, report: &MemoryReport) -> io::Result<()> {
        self.write(&Record::Memory(report))
    }

    fn connections(&mut self, census: &ConnectionCensus) -> io::Result<()> {
        self.write(&Record::Connections(census))
    }

    fn alert(&mut self, alert: &Alert) -> io::Result<()> {
        self.write(&Record::Alert(alert))
    }

    fn accept_overflow(&mut self, overflow: &AcceptOverflow) -> io::Result<()> {
        self.write(&Record::AcceptOverflow(overflow))
    }

    fn summary(&mut self, summary: &Summary) -> io::Result<()> {
        self.write(&Record::Summary(summary))
    }

    fn describe(&self) -> String {
        format!("the JSON output {}", self.path)
    }

    /// A file moved away (log rotation) is written to again at its path, appending.
    fn reopen(&mut self) -> io::Result<()> {
        if let OutputPath::File(path) = &self.path {
            self.writer.flush()?;
            let file = super::append_output_file(path)?;
            self.writer = BufWriter::new(Box::new(file));
        }
        Ok(())
    }
}
