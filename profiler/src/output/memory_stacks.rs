//! The memory growth's stacks (`--memory-folded`, `--memory-flamegraph`): folded lines rooted
//! at the growth's origin and mechanism (and its instance when a run watches several), frames
//! root first, weights in KiB; and a flamegraph of them, written whole at each summary.
use std::{
    io::{self, BufWriter, Write},
    path::Path,
};

use inferno::flamegraph;

use super::{
    Sink, frame_text,
    record::{MemoryReport, Summary},
    stacks::{MAX_FOLDED_STACKS, StackFiles, folded_frame, folded_lines},
};
use crate::bounded::BoundedMap;

/// Writes the growth's stacks summed over the run.
pub struct MemoryStacksSink {
    files: StackFiles,
    /// Whether each stack starts with its instance.
    instance_root: bool,
    /// Folded stack (root first) -> bytes.
    bytes: BoundedMap<String, u64>,
}

impl MemoryStacksSink {
    pub fn create(
        folded: Option<&Path>,
        flamegraph: Option<&Path>,
        instance_root: bool,
    ) -> io::Result<Self> {
        Ok(Self {
            files: StackFiles::create(folded, flamegraph)?,
            instance_root,
            bytes: BoundedMap::new(MAX_FOLDED_STACKS),
        })
    }

    /// `root;...;leaf KiB` lines, sorted (the stacks past the limit last, on one line).
    fn lines(&self) -> Vec<String> {
        folded_lines(&self.bytes, |bytes| bytes / 1024)
    }
}

/// The flamegraph of `lines` (folded, weights in KiB).
fn write_flamegraph(lines: &[String], writer: impl Write) -> io::Result<()> {
    let mut options = flamegraph::Options::default();
    options.title = "redis-stallprof: where resident memory grew".to_owned();
    options.subtitle = Some("origin; mechanism; the stack that faulted the pages in".to_owned());
    options.count_name = "KiB".to_owned();
    options.colors = flamegraph::color::Palette::Basic(flamegraph::color::BasicPalette::Mem);
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), writer)
        .map_err(io::Error::other)
}

impl Sink for MemoryStacksSink {
    fn memory(&mut self, report: &MemoryReport) -> io::Result<()> {
        let instance = self
            .instance_root
            .then(|| folded_frame(&report.instance.to_string()));
        for stack in &report.growth.stacks {
            let frames: Vec<String> = instance
                .iter()
                .cloned()
                .chain([folded_frame(&stack.origin), folded_frame(&stack.mechanism)])
                .chain(
                    stack
                        .frames
                        .iter()
                        .rev()
                        .map(|frame| folded_frame(&frame_text::render(frame))),
                )
                .collect();
            let bytes = self.bytes.entry(frames.join(";"));
            *bytes = bytes.saturating_add(stack.bytes);
        }
        Ok(())
    }

    fn summary(&mut self, _summary: &Summary) -> io::Result<()> {
        let lines = self.lines();
        self.files.write(
            |file| {
                let mut writer = BufWriter::new(file);
                for line in &lines {
                    writeln!(writer, "{line}")?;
                }
                writer.flush()
            },
            |writer| write_flamegraph(&lines, writer),
        )
    }

    fn reopen(&mut self) -> io::Result<()> {
        self.files.reopen()
    }

    fn describe(&self) -> String {
        self.files.describe("memory stack")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::record::{GrowthStack, MemoryGrowth};

    #[test]
    fn growth_stacks_fold_under_their_origin_and_mechanism_in_kib() {
        let directory = tempfile::tempdir().unwrap();
        let folded = directory.path().join("memory.folded");
        let mut sink = MemoryStacksSink::create(Some(&folded), None, false).unwrap();
        let stack = GrowthStack {
            origin: "command:sadd".into(),
            mechanism: "allocation".into(),
            bytes: 8 << 20,
            samples: 3,
            frames: ["dictAdd", "saddCommand", "main"]
                .iter()
                .map(|text| frame_text::parse(text))
                .collect(),
        };
        let report = MemoryReport {
            instance: Default::default(),
            time: std::time::SystemTime::UNIX_EPOCH,
            seconds: 1.0,
            growth: MemoryGrowth {
                stacks: vec![stack],
                ..MemoryGrowth::default()
            },
        };
        sink.memory(&report).unwrap();
        sink.memory(&report).unwrap();
        sink.summary(&Summary::new(
            &Default::default(),
            Default::default(),
            crate::output::record::StopReason::Duration,
        ))
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&folded).unwrap(),
            "command:sadd;allocation;main;saddCommand;dictAdd 16384\n"
        );
    }
}
