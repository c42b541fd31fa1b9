//! The JSON Schema of the records (`docs/reference/redis-stallprof.schema.json`) against the
//! records of a real run: every kind a run writes (stalls, alerts final and in progress,
//! interval lines, memory growth, the census, accept-queue overflows when a storm outlives its
//! stall, the summary) validates, and a record with a field of the wrong type does not.
use std::{fs, path::Path, thread, time::Duration};

use serde_json::Value;
use stallprof_testkit::{NetworkNamespace, Profiler, RedisServer, connection_storm};

fn validator() -> jsonschema::Validator {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/redis-stallprof.schema.json");
    let schema: Value =
        serde_json::from_slice(&fs::read(&path).expect("the schema")).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema")
}

/// The schema's complaints about `record`, one line each.
fn errors(validator: &jsonschema::Validator, record: &Value) -> Vec<String> {
    validator
        .iter_errors(record)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect()
}

#[test]
fn every_record_of_a_real_run_validates_against_the_schema() {
    let namespace = NetworkNamespace::create("schema");
    let redis = RedisServer::start_in(&namespace, &["--tcp-backlog", "16"]);
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--interval",
        "1s",
        "--alert",
        "100ms",
    ]);
    redis.cli(&["DEBUG", "POPULATE", "200000"]);
    redis.cli(&["KEYS", "nomatch*"]);
    let mut sleep = redis.command("redis-cli");
    sleep.args(["-p", &redis.port.to_string(), "DEBUG", "SLEEP", "0.6"]);
    let sleeping = thread::spawn(move || sleep.output().unwrap());
    thread::sleep(Duration::from_millis(100));
    let connections = connection_storm(redis.port, 200, Some(&namespace));
    sleeping.join().unwrap();
    thread::sleep(Duration::from_millis(1_500));
    let run = profiler.stop();
    drop(connections);
    assert!(run.status.success(), "{}", run.stderr);

    let validator = validator();
    let mut kinds: Vec<&str> = Vec::new();
    for record in &run.records {
        let errors = errors(&validator, record);
        assert!(errors.is_empty(), "{record}\n{}", errors.join("\n"));
        let kind = record["type"].as_str().unwrap();
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    for kind in [
        "attached",
        "stall",
        "alert",
        "interval",
        "memory",
        "connections",
        "summary",
    ] {
        assert!(kinds.contains(&kind), "a {kind} record in {kinds:?}");
    }
    assert!(
        run.records
            .iter()
            .any(|record| record["type"] == "alert" && record["state"] == "in_progress"),
        "an in-progress alert"
    );
}

#[test]
fn the_schema_refuses_a_record_that_breaks_it() {
    let validator = validator();
    let stall: Value = serde_json::from_str(
        r#"{"type":"stall","instance":{"pid":1,"port":6379,"name":"redis-server"},
            "time":"2026-12-04T22:25:13.632771Z","pid":1,"tid":1,"duration_us":20000,
            "threshold_us":10000,"origin":"command:keys","mechanism":"cpu","breakdown":[],
            "on_cpu_us":0,"off_cpu_us":0,"runqueue_us":0,"samples":0,"stacks":[],
            "madvise":{"calls":0,"bytes":0,"us":0},"incomplete":false,"poll_handed_off":false,
            "client":{"source":"none","candidates":[]}}"#,
    )
    .unwrap();
    assert_eq!(errors(&validator, &stall), Vec::<String>::new());
    for (field, value) in [
        ("duration_us", Value::from(-1)),
        ("origin", Value::from("")),
        ("time", Value::from("yesterday")),
        (
            "client",
            serde_json::json!({"source":"guess","candidates":[]}),
        ),
    ] {
        let mut broken = stall.clone();
        broken[field] = value;
        assert!(
            !errors(&validator, &broken).is_empty(),
            "{field} broken: {broken}"
        );
    }
    let mut missing = stall.clone();
    missing.as_object_mut().unwrap().remove("duration_us");
    assert!(!errors(&validator, &missing).is_empty());
}
