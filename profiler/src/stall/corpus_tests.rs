//! The recorded corpus: real stalls of every scenario of the attribution matrix on every build
//! (`tests/tests/matrix.rs` writes them with `REDIS_STALLPROF_CORPUS=DIR`), kept in
//! `src/attribute/corpus/`. Each stall's stacks are attributed again with the built-in rules:
//! a rules change that misnames one shows here in milliseconds.
use std::{fs, path::Path};

use serde::Deserialize;

use super::resolve::diagnose;
use crate::{attribute::Rules, output::frame_text, stack::StackKind};

#[derive(Deserialize)]
struct Fixture {
    scenario: String,
    build: String,
    threshold: String,
    origins: Vec<String>,
    mechanisms: Vec<String>,
    stalls: Vec<RecordedStall>,
}

#[derive(Deserialize)]
struct RecordedStall {
    stacks: Vec<RecordedStack>,
    #[serde(default)]
    poll_handed_off: bool,
}

#[derive(Deserialize)]
struct RecordedStack {
    kind: StackKind,
    weight_us: u64,
    frames: Vec<String>,
}

#[test]
fn every_recorded_stall_is_named_as_its_scenario_expects() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/attribute/corpus");
    let rules = Rules::builtin();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for entry in fs::read_dir(&dir).expect("the corpus directory") {
        let path = entry.expect("a corpus file").path();
        let text = fs::read_to_string(&path).expect("a readable fixture");
        let fixture: Fixture = serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        for stall in &fixture.stalls {
            let stacks = stall.stacks.iter().map(|stack| {
                let frames = stack.frames.iter().map(|f| frame_text::parse(f)).collect();
                (stack.kind, frames, stack.weight_us * 1_000)
            });
            let (origin, mechanism) = diagnose(&rules, stacks, stall.poll_handed_off);
            checked += 1;
            if !fixture.origins.contains(&origin) || !fixture.mechanisms.contains(&mechanism) {
                wrong.push(format!(
                    "{} on {} at {}: {origin} / {mechanism}, expected {:?} / {:?}",
                    fixture.scenario,
                    fixture.build,
                    fixture.threshold,
                    fixture.origins,
                    fixture.mechanisms
                ));
            }
        }
    }
    assert!(checked > 50, "the corpus holds {checked} stalls");
    assert!(
        wrong.is_empty(),
        "{} misnamed:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
