//! The stalls' stacks as folded lines (Brendan Gregg's format: frames root first, joined by
//! `;`, then the weight in microseconds) and as a flamegraph SVG (inferno). Each stack is
//! rooted in a frame naming its kind, `[on-cpu]`, `[off-cpu]` or `[runqueue]`, so off-CPU time
//! stands apart from on-CPU time, and those roots have their own colours in the SVG. With
//! `--stack-root origin` or `cause`, the stall's origin (and mechanism) come before the kind,
//! so the picture shows the attribution at a glance.
use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use inferno::flamegraph::{self, color::PaletteMap};

use super::{
    Sink, frame_text,
    record::{Stall, Summary},
};
use crate::{bounded::BoundedMap, cli::StackRoot, stack::StackKind};

/// The flamegraph's title for a target.
pub fn flamegraph_title(name: &str, pid: u32) -> String {
    format!("redis-stallprof: where the stalls of {name} pid {pid} spent their time")
}

/// Distinct folded stacks kept over a run; the weight of the ones after that goes to one
/// `[other stacks]` line.
pub const MAX_FOLDED_STACKS: usize = 4096;
/// The one frame of the line that sums the stacks past [`MAX_FOLDED_STACKS`].
pub const OTHER_STACKS_FRAME: &str = "[other stacks]";

/// Folded stacks summed over stalls.
#[derive(Debug, Clone)]
pub struct FoldedStacks {
    /// What the stacks are rooted at.
    root: StackRoot,
    /// Whether each stack starts with its stall's instance (several in one file).
    instance_root: bool,
    /// Folded stack (root first) -> microseconds.
    weights: BoundedMap<String, u64>,
}

impl Default for FoldedStacks {
    fn default() -> Self {
        Self::new(StackRoot::default())
    }
}

/// The root frame of a stack of `kind`.
pub fn kind_frame(kind: StackKind) -> &'static str {
    match kind {
        StackKind::OnCpu => "[on-cpu]",
        StackKind::OffCpu => "[off-cpu]",
        StackKind::Runqueue => "[runqueue]",
    }
}

/// A frame's text made safe for a folded line: `;` separates frames and the last space the
/// weight.
pub(super) fn folded_frame(text: &str) -> String {
    text.chars()
        .map(|c| if c == ';' { ':' } else { c })
        .collect()
}

impl FoldedStacks {
    /// Stacks rooted at `root`.
    pub fn new(root: StackRoot) -> Self {
        Self {
            root,
            instance_root: false,
            weights: BoundedMap::new(MAX_FOLDED_STACKS),
        }
    }

    /// Roots every stack at its stall's instance first (`redis-server:6379 pid 1234`).
    pub fn with_instance_root(mut self) -> Self {
        self.instance_root = true;
        self
    }

    /// The frames above the kind frame for a stack of `stall`.
    fn root_frames(&self, stall: &Stall) -> Vec<String> {
        let instance = self
            .instance_root
            .then(|| folded_frame(&stall.instance.to_string()));
        let cause = match self.root {
            StackRoot::Kind => Vec::new(),
            StackRoot::Origin => vec![folded_frame(&stall.origin)],
            StackRoot::Cause => vec![folded_frame(&stall.origin), folded_frame(&stall.mechanism)],
        };
        instance.into_iter().chain(cause).collect()
    }

    /// How many frames come before the kind frame.
    fn root_depth(&self) -> usize {
        usize::from(self.instance_root)
            + match self.root {
                StackRoot::Kind => 0,
                StackRoot::Origin => 1,
                StackRoot::Cause => 2,
            }
    }

    /// Adds every stack of `stall`.
    pub fn add_stall(&mut self, stall: &Stall) {
        let root = self.root_frames(stall);
        for stack in &stall.stacks {
            let frames = root
                .iter()
                .cloned()
                .chain([kind_frame(stack.kind).to_owned()])
                .chain(
                    stack
                        .frames
                        .iter()
                        .rev()
                        .map(|frame| folded_frame(&frame_text::render(frame))),
                );
            let folded = frames.collect::<Vec<String>>().join(";");
            let weight = self.weights.entry(folded);
            *weight = weight.saturating_add(stack.weight_us);
        }
    }

    /// `root;...;leaf weight_us` lines, sorted; the stacks past [`MAX_FOLDED_STACKS`] last,
    /// on one `[other stacks]` line.
    pub fn lines(&self) -> Vec<String> {
        folded_lines(&self.weights, |weight| weight)
    }

    pub fn write_folded(&self, writer: impl Write) -> io::Result<()> {
        let mut writer = BufWriter::new(writer);
        for line in self.lines() {
            writeln!(writer, "{line}")?;
        }
        writer.flush()
    }

    /// An SVG flamegraph; an empty one (a note) when there is no stack. Colours (inferno's
    /// Java palette): on-CPU frames red, on-CPU kernel frames orange, and every frame of an
    /// off-CPU or run-queue stack aqua (annotated `_[i]` for inferno, which does not show it).
    pub fn write_flamegraph(&self, title: &str, writer: impl Write) -> io::Result<()> {
        let lines: Vec<String> = self
            .lines()
            .iter()
            .map(|line| mark_off_cpu_frames(line, self.root_depth()))
            .collect();
        let mut palette = PaletteMap::default();
        for (kind, (r, g, b)) in [
            (StackKind::OnCpu, (230, 90, 40)),
            (StackKind::OffCpu, (60, 110, 220)),
            (StackKind::Runqueue, (150, 80, 200)),
        ] {
            palette.insert(kind_frame(kind), flamegraph::color::Color { r, g, b });
        }
        let mut options = flamegraph::Options::default();
        options.title = title.to_owned();
        options.subtitle =
            Some("[on-cpu]: running; [off-cpu]: blocked; [runqueue]: waiting for a CPU".to_owned());
        options.count_name = "us".to_owned();
        options.colors = flamegraph::color::Palette::Multi(flamegraph::color::MultiPalette::Java);
        options.palette_map = Some(&mut palette);
        flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), writer)
            .map_err(io::Error::other)
    }
}

/// The folded lines of `weights` (folded stack -> weight), sorted, with their weights in the
/// unit `unit` gives (lines of weight 0 are left out), the stacks without room of their own
/// on a last `[other stacks]` line.
pub(super) fn folded_lines(
    weights: &BoundedMap<String, u64>,
    unit: impl Fn(u64) -> u64,
) -> Vec<String> {
    let mut lines: Vec<String> = weights
        .iter()
        .filter(|(_, weight)| unit(**weight) > 0)
        .map(|(stack, weight)| format!("{stack} {}", unit(*weight)))
        .collect();
    lines.sort_unstable();
    if let Some(other) = weights
        .other()
        .map(|weight| unit(*weight))
        .filter(|weight| *weight > 0)
    {
        lines.push(format!("{OTHER_STACKS_FRAME} {other}"));
    }
    lines
}

/// A folded line for the SVG: the frames of an off-CPU or run-queue stack (below its kind
/// frame, the `root_depth`-th) annotated `_[i]`.
fn mark_off_cpu_frames(line: &str, root_depth: usize) -> String {
    let off_cpu_kinds = [
        kind_frame(StackKind::OffCpu),
        kind_frame(StackKind::Runqueue),
    ];
    let Some((frames, weight)) = line.rsplit_once(' ') else {
        return line.to_owned();
    };
    let frames: Vec<&str> = frames.split(';').collect();
    if frames
        .get(root_depth)
        .is_none_or(|kind| !off_cpu_kinds.contains(kind))
    {
        return line.to_owned();
    }
    let marked: Vec<String> = frames
        .iter()
        .enumerate()
        .map(|(index, frame)| {
            if index <= root_depth {
                (*frame).to_owned()
            } else {
                format!("{}_[i]", frame.trim_end_matches(frame_text::KERNEL_SUFFIX))
            }
        })
        .collect();
    format!("{} {weight}", marked.join(";"))
}

/// Empties `file` to write it again from the start.
pub(super) fn rewind(file: &mut File) -> io::Result<()> {
    use std::io::Seek as _;
    file.set_len(0)?;
    file.rewind()
}

/// A sink's folded-lines file and flamegraph file, created when the sink is (so an unwritable
/// path fails before attaching) and written whole, again at each summary.
pub(super) struct StackFiles {
    folded: Option<(PathBuf, File)>,
    flamegraph: Option<(PathBuf, File)>,
}

impl StackFiles {
    pub(super) fn create(folded: Option<&Path>, flamegraph: Option<&Path>) -> io::Result<Self> {
        let open = |path: Option<&Path>| -> io::Result<Option<(PathBuf, File)>> {
            path.map(|path| Ok((path.to_owned(), super::create_output_file(path)?)))
                .transpose()
        };
        Ok(Self {
            folded: open(folded)?,
            flamegraph: open(flamegraph)?,
        })
    }

    /// Writes the files anew: the folded lines with `folded`, the SVG with `flamegraph`.
    pub(super) fn write(
        &mut self,
        folded: impl FnOnce(&File) -> io::Result<()>,
        flamegraph: impl FnOnce(BufWriter<&File>) -> io::Result<()>,
    ) -> io::Result<()> {
        if let Some((_, file)) = &mut self.folded {
            rewind(file)?;
            folded(file)?;
        }
        if let Some((_, file)) = &mut self.flamegraph {
            rewind(file)?;
            flamegraph(BufWriter::new(&*file))?;
        }
        Ok(())
    }

    /// The files are written whole at exit: after a rotation, create them again at their paths.
    pub(super) fn reopen(&mut self) -> io::Result<()> {
        for (path, file) in [&mut self.folded, &mut self.flamegraph]
            .into_iter()
            .flatten()
        {
            *file = super::create_output_file(path)?;
        }
        Ok(())
    }

    /// `the <what> files `a` and `b``, for an error message.
    pub(super) fn describe(&self, what: &str) -> String {
        let paths: Vec<String> = [&self.folded, &self.flamegraph]
            .into_iter()
            .flatten()
            .map(|(path, _)| format!("`{}`", path.display()))
            .collect();
        format!("the {what} files {}", paths.join(" and "))
    }
}

/// Writes the folded file and the flamegraph at the end of a run.
pub struct StackFilesSink {
    files: StackFiles,
    title: String,
    stacks: FoldedStacks,
}

impl StackFilesSink {
    pub fn create(
        folded: Option<&Path>,
        flamegraph: Option<&Path>,
        title: String,
        stacks: FoldedStacks,
    ) -> io::Result<Self> {
        Ok(Self {
            files: StackFiles::create(folded, flamegraph)?,
            title,
            stacks,
        })
    }
}

impl Sink for StackFilesSink {
    fn stall(&mut self, stall: &Stall) -> io::Result<()> {
        self.stacks.add_stall(stall);
        Ok(())
    }

    /// Writes the files whole; again at each instance's summary when they hold several.
    fn summary(&mut self, _summary: &Summary) -> io::Result<()> {
        let (stacks, title) = (&self.stacks, &self.title);
        self.files.write(
            |file| stacks.write_folded(file),
            |writer| stacks.write_flamegraph(title, writer),
        )
    }

    fn reopen(&mut self) -> io::Result<()> {
        self.files.reopen()
    }

    fn describe(&self) -> String {
        self.files.describe("stack")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::record::WeightedStack;

    fn stall(stacks: Vec<WeightedStack>) -> Stall {
        Stall {
            stacks,
            ..Stall::example("unknown", "unknown", 300_000)
        }
    }

    fn stack(kind: StackKind, weight_us: u64, frames: &[&str]) -> WeightedStack {
        WeightedStack {
            weight_us,
            kind,
            origin: "unknown".into(),
            mechanism: "cpu".into(),
            samples: 1,
            frames: frames.iter().map(|f| frame_text::parse(f)).collect(),
        }
    }

    #[test]
    fn stacks_fold_root_first_under_their_kind_and_sum_across_stalls() {
        let mut folded = FoldedStacks::default();
        let sleep = stack(
            StackKind::OffCpu,
            290_000,
            &["do_nanosleep_[k]", "debugCommand", "main"],
        );
        let keys = stack(StackKind::OnCpu, 1_000, &["keysCommand", "main"]);
        folded.add_stall(&stall(vec![sleep.clone(), keys]));
        folded.add_stall(&stall(vec![sleep, stack(StackKind::OnCpu, 0, &["idle"])]));
        assert_eq!(
            folded.lines(),
            [
                "[off-cpu];main;debugCommand;do_nanosleep_[k] 580000",
                "[on-cpu];main;keysCommand 1000",
            ]
        );
    }

    #[test]
    fn stacks_past_the_limit_are_summed_on_one_line() {
        let mut folded = FoldedStacks::default();
        for index in 0..MAX_FOLDED_STACKS + 10 {
            let function = format!("f{index}");
            folded.add_stall(&stall(vec![stack(
                StackKind::OnCpu,
                2,
                &[&function, "main"],
            )]));
        }
        let lines = folded.lines();
        assert_eq!(lines.len(), MAX_FOLDED_STACKS + 1);
        assert_eq!(lines.last().unwrap(), "[other stacks] 20");
    }

    #[test]
    fn off_cpu_frames_are_marked_for_the_svg_only() {
        assert_eq!(
            mark_off_cpu_frames("[off-cpu];main;do_nanosleep_[k] 5", 0),
            "[off-cpu];main_[i];do_nanosleep_[i] 5"
        );
        assert_eq!(
            mark_off_cpu_frames("[runqueue];main 7", 0),
            "[runqueue];main_[i] 7"
        );
        assert_eq!(
            mark_off_cpu_frames("[on-cpu];main;read_[k] 5", 0),
            "[on-cpu];main;read_[k] 5"
        );
    }

    #[test]
    fn stacks_can_be_rooted_at_their_stall_s_origin_and_mechanism() {
        let sleeping = Stall {
            stacks: vec![stack(
                StackKind::OffCpu,
                290_000,
                &["do_nanosleep_[k]", "debugCommand", "main"],
            )],
            ..Stall::example("command:debug", "syscall.sleep", 300_000)
        };
        let mut by_cause = FoldedStacks::new(StackRoot::Cause);
        by_cause.add_stall(&sleeping);
        let lines = by_cause.lines();
        assert_eq!(
            lines,
            ["command:debug;syscall.sleep;[off-cpu];main;debugCommand;do_nanosleep_[k] 290000"]
        );
        assert_eq!(
            mark_off_cpu_frames(&lines[0], 2),
            "command:debug;syscall.sleep;[off-cpu];main_[i];debugCommand_[i];do_nanosleep_[i] 290000"
        );
        let mut by_origin = FoldedStacks::new(StackRoot::Origin);
        by_origin.add_stall(&sleeping);
        assert!(by_origin.lines()[0].starts_with("command:debug;[off-cpu];main;"));
    }

    #[test]
    fn separators_inside_names_do_not_split_frames() {
        let mut folded = FoldedStacks::default();
        folded.add_stall(&stall(vec![stack(StackKind::OnCpu, 5, &["a;b", "main"])]));
        assert_eq!(folded.lines(), ["[on-cpu];main;a:b 5"]);
    }

    #[test]
    fn the_flamegraph_is_an_svg_holding_the_frames() {
        let mut folded = FoldedStacks::default();
        folded.add_stall(&stall(vec![stack(
            StackKind::OffCpu,
            290_000,
            &["do_nanosleep_[k]", "main"],
        )]));
        let mut svg = Vec::new();
        folded.write_flamegraph("test", &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.starts_with("<?xml") && svg.contains("<svg"));
        // inferno shows kernel frames without their `_[k]` annotation.
        assert!(
            svg.contains("<title>do_nanosleep (290,000 us") && svg.contains("<title>[off-cpu]"),
            "{svg}"
        );
    }
}
