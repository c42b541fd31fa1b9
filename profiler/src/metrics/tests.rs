//! The exposition as Prometheus reads it.
use std::sync::Arc;

use super::*;

#[test]
fn the_exposition_names_every_metric_with_its_instance() {
    let metrics = Arc::new(Metrics::new());
    let instance = |pid, port| Instance {
        pid,
        port,
        name: "redis-server".into(),
    };
    let first = metrics.of(&instance(42, Some(6379)));
    let second = metrics.of(&instance(43, None));
    first.observe_iterations(0.000_02, 3);
    second.observe_iterations(0.000_02, 5);
    let stall = Stall::example("command:debug", "syscall.sleep", 250_000);
    first.observe_stall(&stall);
    first.observe_madvise("main", "MADV_DONTNEED", 4096, 0.000_1);
    first.set_lost_events(2);
    first.observe_accept_queue(6379, 7, 1);
    first.observe_memory(&MemoryGrowth {
        resident_bytes: 8 << 20,
        new_page_bytes: 4 << 20,
        growth: vec![crate::output::record::GrowthEntry {
            origin: "command:sadd".into(),
            mechanism: "allocation".into(),
            bytes: 3 << 20,
            share: 1.0,
        }],
        ..MemoryGrowth::default()
    });
    let census = |addr: &str| ConnectionCensus {
        established: 250,
        opened: 2,
        clients: vec![crate::output::record::ClientCensus {
            addr: addr.into(),
            established: 200,
            idle_ms: crate::output::record::IdleTimes {
                min: 1,
                p50: 1_500,
                max: 2,
            },
            ..Default::default()
        }],
        ..Default::default()
    };
    first.observe_connections(&census("10.0.0.9"));
    first.observe_connections(&census("10.0.0.7"));
    let text = metrics.encode();
    assert!(
        !text.contains("10.0.0.9"),
        "an address out of the top is removed: {text}"
    );
    let labels = r#"pid="42",port="6379",server="redis-server""#;
    for expected in [
        format!("redis_stallprof_eventloop_iteration_seconds_count{{{labels}}} 3"),
        r#"redis_stallprof_eventloop_iteration_seconds_count{pid="43",port="",server="redis-server"} 5"#.to_owned(),
        format!("redis_stallprof_stall_seconds_count{{{labels}}} 1"),
        format!("redis_stallprof_stalls_total{{{labels},origin=\"command:debug\",mechanism=\"syscall.sleep\"}} 1"),
        format!("redis_stallprof_madvise_bytes_total{{{labels},thread_role=\"main\",advice=\"MADV_DONTNEED\"}} 4096"),
        format!("redis_stallprof_lost_events_total{{{labels}}} 2"),
        format!("redis_stallprof_accept_queue_length{{{labels},listen_port=\"6379\"}} 7"),
        format!("redis_stallprof_memory_growth_bytes_total{{{labels},origin=\"command:sadd\",mechanism=\"allocation\"}} 3145728"),
        format!("redis_stallprof_resident_bytes{{{labels}}} 8388608"),
        format!("redis_stallprof_client_connections{{{labels},client=\"10.0.0.7\"}} 200"),
        format!("redis_stallprof_client_connections{{{labels},client=\"other\"}} 50"),
        format!("redis_stallprof_client_connection_idle_seconds{{{labels},client=\"10.0.0.7\"}} 1.5"),
        format!("redis_stallprof_client_connections_opened_total{{{labels}}} 4"),
        "# EOF".to_owned(),
    ] {
        assert!(
            text.contains(&expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    assert_eq!(
        text.matches("# TYPE redis_stallprof_eventloop_iteration_seconds ")
            .count(),
        1,
        "one family for every instance: {text}"
    );
}
