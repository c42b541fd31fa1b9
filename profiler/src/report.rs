//! `redis-stallprof report FILE.jsonl`: a recorded run -> its stalls and summary on the
//! console, and its folded stacks, flamegraph and pprof profile, built the way the live run
//! built them.
use std::{
    fs::File,
    io::{self, BufRead, BufReader},
};

use anyhow::Context as _;
use serde_json::Value;

use crate::{
    cli::ReportArgs,
    output::{
        ConsoleSink, FoldedStacks, PprofProfile, Sink, create_output_file, flamegraph_title,
        record::{Stall, Summary},
    },
};

pub fn run_report(args: &ReportArgs) -> anyhow::Result<()> {
    let path = args.file.display();
    let file = File::open(&args.file).with_context(|| format!("cannot read `{path}`"))?;
    let mut console = ConsoleSink::default();
    let mut folded = FoldedStacks::new(args.stack_root);
    let mut pprof = PprofProfile::default();
    let mut title = None;
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read `{path}`"))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("`{path}` line {}", index + 1);
        let record: Value =
            serde_json::from_str(&line).with_context(|| format!("{}: not a JSON record", at()))?;
        match record["type"].as_str() {
            Some("attached") => {
                let name = record["name"].as_str().unwrap_or("redis-server");
                title = Some(flamegraph_title(
                    name,
                    record["pid"].as_u64().unwrap_or(0) as u32,
                ));
            }
            Some("stall") => {
                let stall: Stall = serde_json::from_value(record)
                    .with_context(|| format!("{}: not a stall", at()))?;
                console.stall(&stall)?;
                folded.add_stall(&stall);
                pprof.add_stall(&stall);
            }
            Some("summary") => {
                let summary: Summary = serde_json::from_value(record)
                    .with_context(|| format!("{}: not a summary", at()))?;
                console.summary(&summary)?;
            }
            _ => {} // kinds added later, or by a newer version
        }
    }
    match &args.folded {
        Some(path) => {
            let file = create_output_file(path)
                .with_context(|| format!("cannot write `{}`", path.display()))?;
            folded
                .write_folded(file)
                .with_context(|| format!("cannot write `{}`", path.display()))?;
        }
        None => folded
            .write_folded(io::stdout())
            .context("cannot write to stdout")?,
    }
    if let Some(path) = &args.pprof {
        let file = create_output_file(path)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
        pprof
            .write(io::BufWriter::new(file))
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    if let Some(path) = &args.flamegraph {
        let file = create_output_file(path)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
        let title = title.unwrap_or_else(|| "redis-stallprof".to_owned());
        folded
            .write_flamegraph(&title, io::BufWriter::new(file))
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    Ok(())
}
