//! `--pprof`: the stalls' stacks as a gzipped pprof profile (`profile.proto`), the format
//! `go tool pprof`, Grafana Pyroscope and Parca read. One sample per stack of a stall, with
//! four values in nanoseconds: the stack's total, and the same time again under on-CPU,
//! off-CPU or run-queue (the other two zero); labels `origin`, `mechanism` and `instance`.
//! Locations are by function name (the frames' text), not by address.
use std::{
    collections::HashMap,
    fs::File,
    io::{self, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use flate2::{Compression, write::GzEncoder};
use prost::Message;

use super::{
    Sink, frame_text,
    record::{Stall, Summary},
};
use crate::stack::StackKind;

/// The sample types, in value order: (type, unit).
const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("total", "nanoseconds"),
    ("on_cpu", "nanoseconds"),
    ("off_cpu", "nanoseconds"),
    ("runqueue", "nanoseconds"),
];

/// The id of the one mapping.
const MAPPING_ID: u64 = 1;

/// `profile.proto`'s messages, the fields this writer fills.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
    }
}

/// Distinct samples (stack and labels) a profile keeps; the time of the ones after that goes
/// to one sample of a single `[other stacks]` location (the functions and strings of a
/// profile are those of its samples, so they are bounded too).
const MAX_SAMPLES: usize = super::stacks::MAX_FOLDED_STACKS;

/// What tells samples apart: their locations (leaf first) and labels (key, value), as string
/// table indexes.
type SampleKey = (Vec<u64>, Vec<(i64, i64)>);

/// A pprof profile being built: strings and functions interned, samples summed per stack and
/// labels.
pub struct PprofProfile {
    profile: proto::Profile,
    strings: HashMap<String, i64>,
    /// Frame text -> its function's (and location's) id.
    functions: HashMap<String, u64>,
    /// (locations, labels) -> the index of its sample.
    samples: HashMap<SampleKey, usize>,
    started: SystemTime,
}

impl Default for PprofProfile {
    fn default() -> Self {
        let mut profile = Self {
            profile: proto::Profile::default(),
            strings: HashMap::new(),
            functions: HashMap::new(),
            samples: HashMap::new(),
            started: SystemTime::now(),
        };
        profile.string(""); // index 0 is the empty string
        profile.profile.sample_type = SAMPLE_TYPES
            .iter()
            .map(|(kind, unit)| proto::ValueType {
                r#type: profile.string(kind),
                unit: profile.string(unit),
            })
            .collect();
        profile.profile.default_sample_type = profile.string(SAMPLE_TYPES[0].0);
        let comment = profile.string("redis-stallprof: the stacks of event-loop stalls");
        profile.profile.comment = vec![comment];
        // One mapping for every location: they are named already (no addresses to resolve).
        let filename = profile.string("redis-server");
        profile.profile.mapping = vec![proto::Mapping {
            id: MAPPING_ID,
            filename,
            has_functions: true,
        }];
        profile
    }
}

impl PprofProfile {
    fn string(&mut self, text: &str) -> i64 {
        if let Some(&index) = self.strings.get(text) {
            return index;
        }
        let index = self.profile.string_table.len() as i64;
        self.profile.string_table.push(text.to_owned());
        self.strings.insert(text.to_owned(), index);
        index
    }

    /// The location of the function named `name` (one location per function).
    fn location(&mut self, name: &str) -> u64 {
        if let Some(&id) = self.functions.get(name) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let name_index = self.string(name);
        self.profile.function.push(proto::Function {
            id,
            name: name_index,
            system_name: name_index,
        });
        self.profile.location.push(proto::Location {
            id,
            mapping_id: MAPPING_ID,
            line: vec![proto::Line { function_id: id }],
        });
        self.functions.insert(name.to_owned(), id);
        id
    }

    /// Adds every stack of `stall` as a sample.
    pub fn add_stall(&mut self, stall: &Stall) {
        let instance = stall.instance.to_string();
        for stack in &stall.stacks {
            let location_id = stack
                .frames
                .iter()
                .map(|frame| self.location(&frame_text::render(frame)))
                .collect();
            let ns = i64::try_from(stack.weight_us.saturating_mul(1_000)).unwrap_or(i64::MAX);
            let column = match stack.kind {
                StackKind::OnCpu => 1,
                StackKind::OffCpu => 2,
                StackKind::Runqueue => 3,
            };
            let mut value = vec![0; SAMPLE_TYPES.len()];
            value[0] = ns;
            value[column] = ns;
            let labels = [
                ("origin", stack.origin.as_str()),
                ("mechanism", stack.mechanism.as_str()),
                ("instance", instance.as_str()),
            ]
            .into_iter()
            .map(|(key, text)| (self.string(key), self.string(text)))
            .collect();
            self.add_sample(location_id, labels, &value);
        }
    }

    /// Adds `value` to the sample of these locations and labels (made if it is new and there
    /// is room, else the `[other stacks]` one).
    fn add_sample(&mut self, location_id: Vec<u64>, labels: Vec<(i64, i64)>, value: &[i64]) {
        let key = if self.samples.len() < MAX_SAMPLES
            || self
                .samples
                .contains_key(&(location_id.clone(), labels.clone()))
        {
            (location_id, labels)
        } else {
            (
                vec![self.location(super::stacks::OTHER_STACKS_FRAME)],
                Vec::new(),
            )
        };
        let index = match self.samples.get(&key) {
            Some(&index) => index,
            None => {
                let (location_id, labels) = key.clone();
                self.profile.sample.push(proto::Sample {
                    location_id,
                    value: vec![0; SAMPLE_TYPES.len()],
                    label: labels
                        .into_iter()
                        .map(|(key, str)| proto::Label { key, str })
                        .collect(),
                });
                self.samples.insert(key, self.profile.sample.len() - 1);
                self.profile.sample.len() - 1
            }
        };
        for (sum, added) in self.profile.sample[index].value.iter_mut().zip(value) {
            *sum = sum.saturating_add(*added);
        }
    }

    /// The profile, gzipped, to `writer`.
    pub fn write(&self, writer: impl Write) -> io::Result<()> {
        let mut profile = self.profile.clone();
        let since_epoch = |time: SystemTime| time.duration_since(UNIX_EPOCH).unwrap_or_default();
        profile.time_nanos = since_epoch(self.started).as_nanos() as i64;
        profile.duration_nanos = self.started.elapsed().unwrap_or_default().as_nanos() as i64;
        let mut gzip = GzEncoder::new(writer, Compression::default());
        gzip.write_all(&profile.encode_to_vec())?;
        gzip.finish()?.flush()
    }
}

/// Writes the pprof file (`--pprof`) whole at each summary. The file is created when the sink
/// is, so an unwritable path fails before attaching.
pub struct PprofSink {
    path: PathBuf,
    file: File,
    profile: PprofProfile,
}

impl PprofSink {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: super::create_output_file(path)?,
            profile: PprofProfile::default(),
        })
    }
}

impl Sink for PprofSink {
    fn stall(&mut self, stall: &Stall) -> io::Result<()> {
        self.profile.add_stall(stall);
        Ok(())
    }

    fn summary(&mut self, _summary: &Summary) -> io::Result<()> {
        super::stacks::rewind(&mut self.file)?;
        self.profile.write(io::BufWriter::new(&self.file))
    }

    /// Written whole at exit: after a rotation, created again at its path.
    fn reopen(&mut self) -> io::Result<()> {
        self.file = super::create_output_file(&self.path)?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("the pprof file `{}`", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        output::record::{Instance, WeightedStack},
        stack::Frame,
    };

    #[test]
    fn stacks_become_samples_with_their_time_under_their_kind_and_their_labels() {
        let stack = |kind, weight_us, leaf: &str| WeightedStack {
            weight_us,
            kind,
            origin: "command:debug".into(),
            mechanism: "syscall.sleep".into(),
            samples: 1,
            frames: vec![
                Frame::User(leaf.into()),
                Frame::User("debugCommand".into()),
                Frame::User("main".into()),
            ],
        };
        let stall = Stall {
            stacks: vec![
                stack(StackKind::OffCpu, 250_000, "__GI___nanosleep"),
                stack(StackKind::OnCpu, 1_000, "dictFind"),
            ],
            instance: Instance {
                pid: 42,
                port: Some(6379),
                name: "redis-server".into(),
            },
            ..Stall::example("command:debug", "syscall.sleep", 251_000)
        };
        let mut profile = PprofProfile::default();
        profile.add_stall(&stall);
        let mut gzipped = Vec::new();
        profile.write(&mut gzipped).unwrap();
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gzipped[..]), &mut bytes).unwrap();
        let decoded = proto::Profile::decode(&bytes[..]).unwrap();
        let text = |index: i64| decoded.string_table[index as usize].as_str();
        let types: Vec<&str> = decoded.sample_type.iter().map(|t| text(t.r#type)).collect();
        assert_eq!(types, ["total", "on_cpu", "off_cpu", "runqueue"]);
        assert_eq!(text(decoded.default_sample_type), "total");
        assert_eq!(decoded.sample.len(), 2);
        assert_eq!(decoded.sample[0].value, [250_000_000, 0, 250_000_000, 0]);
        assert_eq!(decoded.sample[1].value, [1_000_000, 1_000_000, 0, 0]);
        // Leaf first; shared frames share their location.
        let names = |sample: &proto::Sample| -> Vec<&str> {
            sample
                .location_id
                .iter()
                .map(|id| text(decoded.function[*id as usize - 1].name))
                .collect()
        };
        assert_eq!(
            names(&decoded.sample[0]),
            ["__GI___nanosleep", "debugCommand", "main"]
        );
        assert_eq!(decoded.function.len(), 4);
        let labels: Vec<(&str, &str)> = decoded.sample[0]
            .label
            .iter()
            .map(|label| (text(label.key), text(label.str)))
            .collect();
        assert_eq!(
            labels,
            [
                ("origin", "command:debug"),
                ("mechanism", "syscall.sleep"),
                ("instance", "redis-server:6379 pid 42"),
            ]
        );
    }

    #[test]
    fn the_same_stack_sums_into_one_sample_and_distinct_ones_are_bounded() {
        let stall = |leaf: String| Stall {
            stacks: vec![WeightedStack {
                weight_us: 10,
                kind: StackKind::OnCpu,
                origin: "command:keys".into(),
                mechanism: "cpu".into(),
                samples: 1,
                frames: vec![Frame::User(leaf.into()), Frame::User("main".into())],
            }],
            ..Stall::example("command:keys", "cpu", 10)
        };
        let mut profile = PprofProfile::default();
        profile.add_stall(&stall("keysCommand".into()));
        profile.add_stall(&stall("keysCommand".into()));
        assert_eq!(profile.profile.sample.len(), 1);
        assert_eq!(profile.profile.sample[0].value[0], 20_000);
        for index in 0..MAX_SAMPLES + 100 {
            profile.add_stall(&stall(format!("f{index}")));
        }
        assert_eq!(profile.profile.sample.len(), MAX_SAMPLES + 1);
        let total: i64 = profile.profile.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(
            total,
            (MAX_SAMPLES as i64 + 102) * 10_000,
            "no time is lost"
        );
    }
}
