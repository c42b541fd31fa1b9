//! The memory growth's stacks (`--memory-folded`, `--memory-flamegraph`): folded lines rooted
//! at the growth's origin and mechanism (and its instance when a run watches several), frames
//! root first, weights in KiB; and a flamegraph of them, written whole at each summary.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use inferno::flamegraph;

use super::{
    Sink, frame_text,
    record::{MemoryReport, Summary},
    stacks::{folded_frame, rewind},
};

/// Writes the growth's stacks summed over the run. The files are created when the sink is, so
/// an unwritable path fails before attaching.
pub struct MemoryStacksSink {
    folded: Option<(PathBuf, File)>,
    flamegraph: Option<(PathBuf, File)>,
    /// Whether each stack starts with its instance.
    instance_root: bool,
    /// Folded stack (root first) -> bytes.
    bytes: BTreeMap<String, u64>,
}

impl MemoryStacksSink {
    pub fn create(
        folded: Option<&Path>,
        flamegraph: Option<&Path>,
        instance_root: bool,
    ) -> io::Result<Self> {
        let open = |path: Option<&Path>| -> io::Result<Option<(PathBuf, File)>> {
            path.map(|path| Ok((path.to_owned(), File::create(path)?)))
                .transpose()
        };
        Ok(Self {
            folded: open(folded)?,
            flamegraph: open(flamegraph)?,
            instance_root,
            bytes: BTreeMap::new(),
        })
    }

    /// `root;...;leaf KiB` lines, sorted.
    fn lines(&self) -> Vec<String> {
        self.bytes
            .iter()
            .filter(|(_, bytes)| **bytes >= 1024)
            .map(|(stack, bytes)| format!("{stack} {}", bytes / 1024))
            .collect()
    }
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
            *self.bytes.entry(frames.join(";")).or_default() += stack.bytes;
        }
        Ok(())
    }

    fn summary(&mut self, _summary: &Summary) -> io::Result<()> {
        let lines = self.lines();
        if let Some((_, file)) = &mut self.folded {
            rewind(file)?;
            let mut writer = BufWriter::new(&*file);
            for line in &lines {
                writeln!(writer, "{line}")?;
            }
            writer.flush()?;
        }
        if let Some((_, file)) = &mut self.flamegraph {
            rewind(file)?;
            let mut options = flamegraph::Options::default();
            options.title = "redis-stallprof: where resident memory grew".to_owned();
            options.subtitle =
                Some("origin; mechanism; the stack that faulted the pages in".to_owned());
            options.count_name = "KiB".to_owned();
            options.colors =
                flamegraph::color::Palette::Basic(flamegraph::color::BasicPalette::Mem);
            flamegraph::from_lines(
                &mut options,
                lines.iter().map(String::as_str),
                BufWriter::new(&*file),
            )
            .map_err(io::Error::other)?;
        }
        Ok(())
    }

    fn reopen(&mut self) -> io::Result<()> {
        for (path, file) in [&mut self.folded, &mut self.flamegraph]
            .into_iter()
            .flatten()
        {
            *file = File::create(&*path)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let paths: Vec<String> = [&self.folded, &self.flamegraph]
            .into_iter()
            .flatten()
            .map(|(path, _)| format!("`{}`", path.display()))
            .collect();
        format!("the memory stack files {}", paths.join(" and "))
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
