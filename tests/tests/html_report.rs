//! The HTML report of a real run (`attach --html`, and `report --html` from its recording),
//! opened in a real browser: Debian's chromium, headless. The page names every stall's origin
//! in its rendered DOM, its charts paint pixels, it makes no request (the browser's network log
//! shows none of the page's own, and a control page shows that the check sees them), and a
//! screenshot is taken (`target/tmp/html-report/report.png`, to look at).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use serde_json::Value;
use stallprof_testkit::{Profiler, RedisServer, run_profiler};

/// Chromium as the machine's probe ran it: headless, as root, with none of its own traffic
/// that can be turned off, and a fresh profile.
fn chromium(profile: &Path) -> Command {
    let mut command = Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    command
}

/// What the browser made of a page.
struct Opened {
    /// The DOM after its scripts ran.
    dom: String,
    /// The URLs the page itself asked for (the browser's own requests left out).
    page_requests: Vec<String>,
}

/// Opens `page` in chromium and returns its DOM and the requests it made.
fn open(page: &Path, scratch: &Path) -> Opened {
    let netlog = scratch.join("netlog.json");
    let output = chromium(&scratch.join("profile"))
        .arg(format!("--log-net-log={}", netlog.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium");
    assert!(
        output.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let log: Value = serde_json::from_slice(&fs::read(&netlog).expect("the network log"))
        .expect("the network log is JSON");
    let start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"].clone();
    // A request the browser makes for itself has no initiator ("not an origin"); a page's
    // carries its origin ("null" for a file).
    let page_requests = log["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|event| event["type"] == start_job)
        .filter(|event| {
            event["params"]["url"].is_string() && event["params"]["initiator"] != "not an origin"
        })
        .map(|event| {
            event["params"]["url"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    Opened {
        dom: String::from_utf8_lossy(&output.stdout).into_owned(),
        page_requests,
    }
}

/// The value of the attribute `name` of the page's `<body>`, unescaped.
fn body_attribute(dom: &str, name: &str) -> Option<String> {
    let body = &dom[dom.find("<body")?..];
    let body = &body[..body.find('>')?];
    let start = body.find(&format!("{name}=\""))? + name.len() + 2;
    let value = &body[start..];
    Some(
        value[..value.find('"')?]
            .replace("&quot;", "\"")
            .replace("&amp;", "&"),
    )
}

/// The rendered table with `id`, as text.
fn table<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("<table id=\"{id}\">"))
        .unwrap_or_else(|| panic!("table {id} in the DOM"));
    let end = start + dom[start..].find("</table>").expect("the table ends");
    &dom[start..end]
}

/// Checks what a user would look for in the page `page` of a run with `stalls`; returns the
/// DOM.
fn check_page(page: &Path, stalls: &[&Value], scratch: &Path) -> String {
    let size = fs::metadata(page).expect("the report was written").len();
    assert!(size < 4 << 20, "a short run's page is small: {size} bytes");
    let opened = open(page, scratch);
    assert_eq!(
        body_attribute(&opened.dom, "data-ready").as_deref(),
        Some("yes"),
        "the page's script ran to its end"
    );
    let listed = table(&opened.dom, "stalls");
    for stall in stalls {
        let origin = stall["origin"].as_str().unwrap();
        assert!(listed.contains(origin), "stall {origin} listed: {listed}");
    }
    assert!(
        table(&opened.dom, "causes").contains("SCAN"),
        "KEYS' advice"
    );
    let painted: Value = serde_json::from_str(
        &body_attribute(&opened.dom, "data-painted").expect("the charts were drawn"),
    )
    .unwrap();
    for chart in ["timeline", "memory", "census"] {
        assert!(
            painted[chart].as_u64().unwrap_or(0) > 2_000,
            "the {chart} chart painted: {painted}"
        );
    }
    let flamegraphs = opened.dom.matches("data:image/svg+xml;base64,").count();
    assert!(
        flamegraphs >= stalls.len(),
        "a flamegraph per stall: {flamegraphs}"
    );
    assert!(
        opened.page_requests.is_empty(),
        "the page asked for {:?}",
        opened.page_requests
    );
    opened.dom
}

#[test]
fn the_html_report_shows_a_runs_stalls_and_charts_and_loads_nothing() {
    let redis = RedisServer::start(&[]);
    redis.cli(&["DEBUG", "POPULATE", "400000"]);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.jsonl");
    let html = dir.path().join("live.html");
    let profiler = Profiler::attach_writing(
        &[
            "--pid",
            &redis.pid().to_string(),
            "--interval",
            "1s",
            "--html",
            html.to_str().unwrap(),
        ],
        &json,
    );
    thread::sleep(Duration::from_millis(1_200));
    // Memory growth while attached, for the memory chart.
    redis.cli(&["DEBUG", "POPULATE", "100000", "grown"]);
    redis.cli(&["KEYS", "nomatch*"]);
    redis.cli(&["DEBUG", "SLEEP", "0.2"]);
    thread::sleep(Duration::from_millis(1_500));
    let run = profiler.stop();
    assert!(run.status.success(), "{}", run.stderr);
    let stalls = run.of_type("stall");
    let origins: Vec<&str> = stalls
        .iter()
        .map(|stall| stall["origin"].as_str().unwrap())
        .collect();
    assert!(origins.contains(&"command:keys"), "{origins:?}");
    assert!(origins.contains(&"command:debug"), "{origins:?}");
    assert!(!run.of_type("interval").is_empty(), "interval records");

    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("html-report");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).unwrap();
    check_page(&html, &stalls, &scratch.join("live"));

    // The same page from the recording.
    let rendered = scratch.join("report.html");
    let output = run_profiler(&[
        "report",
        json.to_str().unwrap(),
        "--html",
        rendered.to_str().unwrap(),
        "--folded",
        dir.path().join("folded").to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    check_page(&rendered, &stalls, &scratch.join("recorded"));

    let screenshot = scratch.join("report.png");
    let output = chromium(&scratch.join("profile"))
        .arg("--window-size=1400,2600")
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(format!("file://{}", rendered.display()))
        .output()
        .expect("run chromium");
    assert!(output.status.success());
    let png = fs::read(&screenshot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 50_000,
        "{} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", screenshot.display());
}

#[test]
fn the_request_check_sees_a_page_that_asks_for_something() {
    let scratch = tempfile::tempdir().unwrap();
    let page = scratch.path().join("control.html");
    fs::write(
        &page,
        "<html><body><img src=\"http://127.0.0.1:9/probe.png\"></body></html>",
    )
    .unwrap();
    let opened = open(&page, scratch.path());
    assert_eq!(opened.page_requests, ["http://127.0.0.1:9/probe.png"]);
}
