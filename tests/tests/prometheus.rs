//! The Prometheus an operator runs (Debian's 2.42 and its promtool): the example alerting rules
//! pass their unit tests, the example configuration passes `promtool check config`, and a real
//! prometheus scraping `attach --metrics` through a stall holds the stall's series and fires
//! `RedisEventLoopLongStall`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use stallprof_testkit::{Profiler, RedisServer, free_port};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(examples())
        .output()
        .expect("run promtool (cargo xtask setup installs Debian's prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn every_example_alert_fires_on_its_series_and_stays_quiet_otherwise() {
    let text = promtool(&["test", "rules", "prometheus-alerts.test.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
    // Each rule has a case where it fires (its neighbour's series quiet: promtool wants the
    // alerts exactly) and one where nothing fires.
    let rules = fs::read_to_string(examples().join("prometheus-alerts.yml")).unwrap();
    let tests = fs::read_to_string(examples().join("prometheus-alerts.test.yml")).unwrap();
    let names: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    for name in names {
        let cases: Vec<&str> = tests
            .split("alertname: ")
            .skip(1)
            .filter(|case| case.starts_with(&format!("{name}\n")))
            .collect();
        assert!(
            cases.iter().any(|case| case.contains("exp_labels")),
            "{name} fires in a test"
        );
        assert!(
            cases.iter().any(|case| case.contains("exp_alerts: []")),
            "{name} stays quiet in a test"
        );
    }
}

#[test]
fn the_example_configuration_is_valid() {
    let text = promtool(&["check", "config", "prometheus-scrape.yml"]);
    assert!(text.contains("5 rules found"), "{text}");
}

/// A prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// The HTTP API's answer to `path`, or `None` while it does not answer.
    fn get(&self, path: &str) -> Option<Value> {
        let output = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "5", "-g"])
            .arg(format!("http://127.0.0.1:{}{path}", self.port))
            .output()
            .ok()?;
        serde_json::from_slice(&output.stdout).ok()
    }

    /// Waits up to `timeout` for `check` to hold of the answer to `path`; returns it.
    fn wait_for(&self, path: &str, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.get(path);
            if let Some(answer) = answer.as_ref().filter(|answer| check(answer)) {
                return answer.clone();
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not answer {path} as expected: {answer:?}"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn a_real_prometheus_scrapes_a_stall_and_fires_the_long_stall_alert() {
    let redis = RedisServer::start(&[]);
    let metrics_port = free_port();
    let profiler = Profiler::attach(&[
        "--pid",
        &redis.pid().to_string(),
        "--metrics",
        &format!("127.0.0.1:{metrics_port}"),
    ]);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: redis-stallprof\n    static_configs:\n      \
             - targets: [\"127.0.0.1:{metrics_port}\"]\n",
            examples().join("prometheus-alerts.yml").display()
        ),
    )
    .unwrap();
    let port = free_port();
    let prometheus = Prometheus {
        child: Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (cargo xtask setup installs Debian's package)"),
        port,
    };
    // Scraped before the stall, its stall histogram at zero.
    prometheus.wait_for(
        "/api/v1/query?query=redis_stallprof_stall_seconds_count",
        Duration::from_secs(30),
        |answer| answer["data"]["result"][0]["value"][1] == "0",
    );
    thread::sleep(Duration::from_secs(2));
    redis.cli(&["DEBUG", "SLEEP", "0.3"]);

    let alerts = prometheus.wait_for("/api/v1/alerts", Duration::from_secs(30), |answer| {
        answer["data"]["alerts"].as_array().is_some_and(|alerts| {
            alerts.iter().any(|alert| {
                alert["labels"]["alertname"] == "RedisEventLoopLongStall"
                    && alert["state"] == "firing"
            })
        })
    });
    let long = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|alert| alert["labels"]["alertname"] == "RedisEventLoopLongStall")
        .unwrap();
    assert_eq!(long["labels"]["port"], redis.port.to_string(), "{long}");
    assert_eq!(long["labels"]["severity"], "page", "{long}");

    let stalls = prometheus.wait_for(
        "/api/v1/query?query=redis_stallprof_stalls_total",
        Duration::from_secs(10),
        |answer| {
            answer["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        },
    );
    let series = &stalls["data"]["result"][0];
    assert_eq!(series["metric"]["origin"], "command:debug", "{series}");
    assert_eq!(series["metric"]["mechanism"], "syscall.sleep", "{series}");
    assert_eq!(series["metric"]["pid"], redis.pid().to_string(), "{series}");
    assert_eq!(series["value"][1], "1", "{series}");
    let count = prometheus.wait_for(
        "/api/v1/query?query=redis_stallprof_stall_seconds_count",
        Duration::from_secs(10),
        |answer| answer["data"]["result"][0]["value"][1] == "1",
    );
    assert_eq!(
        count["data"]["result"][0]["metric"]["server"], "redis-server",
        "{count}"
    );
    drop(prometheus);
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);
}
