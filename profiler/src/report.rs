//! `redis-stallprof report FILE.jsonl`: a recorded run -> every record on the console as
//! `attach` showed it (stalls, alerts, accept-queue overflows, memory growth, the connection
//! census, summaries), and its folded stacks, flamegraph, pprof profile and HTML report, built
//! the way the live run built them.
//!
//! A recording is input like any other: whatever its bytes, reading it ends in one clear error
//! naming the line, never a panic, and no line is read past [`MAX_RECORD_BYTES`].
use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read as _},
};

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::Value;

use crate::{
    cli::{ReportArgs, StackRoot},
    output::{
        ConsoleSink, FoldedStacks, HtmlSink, PprofProfile, Sink, create_output_file,
        flamegraph_title,
        record::{
            AcceptOverflow, Alert, Attached, ConnectionCensus, IntervalReport, MemoryReport, Stall,
            Summary,
        },
    },
};

/// The longest record read: a stall with every stack at its deepest is well under a MiB.
pub const MAX_RECORD_BYTES: usize = 16 << 20;

/// The records `report` renders, by their `"type"`.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Record {
    Attached(Attached),
    Stall(Box<Stall>),
    Alert(Box<Alert>),
    AcceptOverflow(AcceptOverflow),
    Interval(IntervalReport),
    Memory(Box<MemoryReport>),
    Connections(ConnectionCensus),
    Summary(Box<Summary>),
}

/// The `"type"` values [`Record`] reads; others are skipped (a newer version's).
const KNOWN_TYPES: [&str; 8] = [
    "attached",
    "stall",
    "alert",
    "accept_overflow",
    "interval",
    "memory",
    "connections",
    "summary",
];

/// What a recording renders to besides the console.
struct Rendered {
    folded: FoldedStacks,
    pprof: PprofProfile,
    title: Option<String>,
}

pub fn run_report(args: &ReportArgs) -> anyhow::Result<()> {
    let path = args.file.display().to_string();
    let file = File::open(&args.file).with_context(|| format!("cannot read `{path}`"))?;
    let mut console = ConsoleSink::default();
    let mut html = args
        .html
        .as_deref()
        .map(|path| {
            HtmlSink::create(path).with_context(|| format!("cannot write `{}`", path.display()))
        })
        .transpose()?;
    let mut sinks: Vec<&mut dyn Sink> = vec![&mut console];
    if let Some(html) = &mut html {
        sinks.push(html);
    }
    let rendered = render(BufReader::new(file), &path, args.stack_root, &mut sinks)?;
    match &args.folded {
        Some(path) => {
            let file = create_output_file(path)
                .with_context(|| format!("cannot write `{}`", path.display()))?;
            rendered
                .folded
                .write_folded(file)
                .with_context(|| format!("cannot write `{}`", path.display()))?;
        }
        None => rendered
            .folded
            .write_folded(io::stdout())
            .context("cannot write to stdout")?,
    }
    if let Some(path) = &args.pprof {
        let file = create_output_file(path)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
        rendered
            .pprof
            .write(io::BufWriter::new(file))
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    if let Some(path) = &args.flamegraph {
        let file = create_output_file(path)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
        let title = rendered
            .title
            .unwrap_or_else(|| "redis-stallprof".to_owned());
        rendered
            .folded
            .write_flamegraph(&title, io::BufWriter::new(file))
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    Ok(())
}

/// Reads the recording `reader` (called `path` in errors), each record to `sinks` (the console,
/// the HTML report) and the stalls' stacks into what is returned.
fn render(
    mut reader: impl BufRead,
    path: &str,
    stack_root: StackRoot,
    sinks: &mut [&mut dyn Sink],
) -> anyhow::Result<Rendered> {
    let mut rendered = Rendered {
        folded: FoldedStacks::new(stack_root),
        pprof: PprofProfile::default(),
        title: None,
    };
    let mut line = Vec::new();
    for number in 1.. {
        let at = || format!("`{path}` line {number}");
        line.clear();
        let read = reader
            .by_ref()
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read `{path}`"))?;
        if read == 0 {
            break;
        }
        if line.len() > MAX_RECORD_BYTES {
            anyhow::bail!(
                "{}: longer than {} MiB, not a record",
                at(),
                MAX_RECORD_BYTES >> 20
            );
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: Value = serde_json::from_slice(&line)
            .map_err(|error| one_line(&error))
            .with_context(|| format!("{}: not a JSON record", at()))?;
        let kind = value["type"].as_str().unwrap_or_default().to_owned();
        if !KNOWN_TYPES.contains(&kind.as_str()) {
            continue; // kinds added later, or by a newer version
        }
        let record: Record = serde_json::from_value(value)
            .map_err(|error| one_line(&error))
            .with_context(|| format!("{}: not a valid `{kind}` record", at()))?;
        for sink in sinks.iter_mut() {
            show(&record, &mut **sink, &mut rendered)
                .with_context(|| format!("cannot write to {}", sink.describe()))?;
        }
        if let Record::Stall(stall) = &record {
            rendered.folded.add_stall(stall);
            rendered.pprof.add_stall(stall);
        }
    }
    Ok(rendered)
}

/// Shows `record` to `sink`, and takes the flamegraph's title from an `attached` record.
fn show(record: &Record, sink: &mut dyn Sink, rendered: &mut Rendered) -> io::Result<()> {
    match record {
        Record::Attached(attached) => {
            rendered.title = Some(flamegraph_title(&attached.name, attached.pid));
            sink.attached(attached)
        }
        Record::Stall(stall) => sink.stall(stall),
        Record::Alert(alert) => sink.alert(alert),
        Record::AcceptOverflow(overflow) => sink.accept_overflow(overflow),
        Record::Interval(report) => sink.interval(report),
        Record::Memory(report) => sink.memory(report),
        Record::Connections(census) => sink.connections(census),
        Record::Summary(summary) => sink.summary(summary),
    }
}

/// An error's text on one line.
fn one_line(error: &impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{}", error.to_string().replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A real recording: an `attach` of Debian's redis-server through KEYS and DEBUG SLEEP
    /// stalls, with its memory, connections and summary records.
    const RECORDING: &str = include_str!("../fixtures/recording.jsonl");

    /// A sink that keeps what it is shown (the console's records, by kind).
    #[derive(Default)]
    struct Shown(Vec<&'static str>);

    impl Sink for Shown {
        fn attached(&mut self, _: &Attached) -> io::Result<()> {
            self.0.push("attached");
            Ok(())
        }
        fn stall(&mut self, _: &Stall) -> io::Result<()> {
            self.0.push("stall");
            Ok(())
        }
        fn memory(&mut self, _: &MemoryReport) -> io::Result<()> {
            self.0.push("memory");
            Ok(())
        }
        fn connections(&mut self, _: &ConnectionCensus) -> io::Result<()> {
            self.0.push("connections");
            Ok(())
        }
        fn summary(&mut self, _: &Summary) -> io::Result<()> {
            self.0.push("summary");
            Ok(())
        }
        fn describe(&self) -> String {
            "shown".into()
        }
    }

    #[test]
    fn every_kind_of_record_is_shown_and_the_stalls_stacks_are_folded() {
        let mut shown = Shown::default();
        let rendered = render(
            RECORDING.as_bytes(),
            "r",
            StackRoot::Kind,
            &mut [&mut shown],
        )
        .unwrap();
        for kind in ["attached", "stall", "memory", "connections", "summary"] {
            assert!(shown.0.contains(&kind), "{kind} in {:?}", shown.0);
        }
        assert!(!rendered.folded.lines().is_empty());
        assert!(rendered.title.unwrap().contains("redis-server"));
    }

    #[test]
    fn an_overlong_line_is_refused_without_reading_it_whole() {
        let mut long = vec![b'{'; MAX_RECORD_BYTES + 10];
        long.push(b'\n');
        let error = render(
            &long[..],
            "r",
            StackRoot::Kind,
            &mut [&mut Shown::default()],
        )
        .err()
        .unwrap();
        assert_eq!(
            format!("{error:#}"),
            format!(
                "`r` line 1: longer than {} MiB, not a record",
                MAX_RECORD_BYTES >> 20
            )
        );
    }

    /// One change to a recording's bytes.
    #[derive(Debug, Clone)]
    enum Mutation {
        Flip { at: usize, byte: u8 },
        Cut { at: usize, length: usize },
        Insert { at: usize, bytes: Vec<u8> },
        HugeNumber { at: usize, past_u64: bool },
        Duplicate { at: usize, length: usize },
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let at = 0..RECORDING.len();
        prop_oneof![
            (at.clone(), any::<u8>()).prop_map(|(at, byte)| Mutation::Flip { at, byte }),
            (at.clone(), 0..400usize).prop_map(|(at, length)| Mutation::Cut { at, length }),
            (at.clone(), prop::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
            (at.clone(), any::<bool>())
                .prop_map(|(at, past_u64)| Mutation::HugeNumber { at, past_u64 }),
            (at, 0..3000usize).prop_map(|(at, length)| Mutation::Duplicate { at, length }),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
        let clamp = |at: usize, bytes: &Vec<u8>| at.min(bytes.len());
        match mutation {
            Mutation::Flip { at, byte } => {
                if let Some(target) = bytes.get_mut(*at) {
                    *target = *byte;
                }
            }
            Mutation::Cut { at, length } => {
                let start = clamp(*at, bytes);
                let end = clamp(start + length, bytes);
                bytes.drain(start..end);
            }
            Mutation::Insert {
                at,
                bytes: inserted,
            } => {
                let at = clamp(*at, bytes);
                bytes.splice(at..at, inserted.iter().copied());
            }
            Mutation::HugeNumber { at, past_u64 } => {
                // The next digit run becomes the largest u64, or one more.
                let huge: &[u8] = if *past_u64 {
                    b"18446744073709551616"
                } else {
                    b"18446744073709551615"
                };
                let start = (clamp(*at, bytes)..bytes.len()).find(|&i| bytes[i].is_ascii_digit());
                if let Some(start) = start {
                    let end = (start..bytes.len())
                        .find(|&i| !bytes[i].is_ascii_digit())
                        .unwrap_or(bytes.len());
                    bytes.splice(start..end, huge.iter().copied());
                }
            }
            Mutation::Duplicate { at, length } => {
                let start = clamp(*at, bytes);
                let end = clamp(start + length, bytes);
                let copy = bytes[start..end].to_vec();
                bytes.splice(start..start, copy);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn a_mutated_recording_renders_or_fails_with_one_clear_line(
            mutations in prop::collection::vec(mutation(), 1..6)
        ) {
            let mut bytes = RECORDING.as_bytes().to_vec();
            for mutation in &mutations {
                apply(&mut bytes, mutation);
            }
            if let Err(error) = render(&bytes[..], "r", StackRoot::Cause, &mut [&mut Shown::default()]) {
                let text = format!("{error:#}");
                prop_assert!(text.starts_with("`r` line "), "{}", text);
                prop_assert!(!text.contains('\n'), "{}", text);
            }
        }
    }
}
