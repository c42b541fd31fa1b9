//! Alerts on stall duration. A stall at least `--alert` long gives a final alert; an iteration
//! still running past `--alert` gives an in-progress alert at once (the kernel's loop state says
//! when the iteration began). Alerts go to the outputs, and with `--alert-exec` to a command run
//! on its own thread, with the alert JSON on its standard input, a timeout and a per-minute cap.
use std::{
    collections::VecDeque,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::output::record::{Alert, AlertCounts, AlertState, Stall};

/// How often the current iteration's age is checked: an in-progress alert goes out at most
/// this long after the iteration crosses the alert threshold.
pub const IN_PROGRESS_CHECK_PERIOD: Duration = Duration::from_millis(10);

/// `--alert`: the threshold, and `--alert-exec` when given.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    pub threshold: Duration,
    pub exec: Option<ExecSettings>,
}

/// The alerts of a run: which stalls and iterations get one, their counts, and the
/// `--alert-exec` runner.
pub struct Alerting {
    threshold: Duration,
    exec: Option<AlertExec>,
    counts: AlertCounts,
    /// Start of the iteration an in-progress alert was last given for.
    alerted_iteration_ns: u64,
}

impl Alerting {
    pub fn new(settings: AlertSettings) -> Self {
        Self {
            threshold: settings.threshold,
            exec: settings.exec.map(AlertExec::start),
            counts: AlertCounts::default(),
            alerted_iteration_ns: 0,
        }
    }

    fn alert_us(&self) -> u64 {
        self.threshold.as_micros() as u64
    }

    /// The final alert of a stall at least as long as the alert threshold.
    pub fn final_alert(&mut self, stall: &Stall) -> Option<Alert> {
        if stall.duration_us < self.alert_us() {
            return None;
        }
        self.counts.finals += 1;
        Some(self.give(AlertState::Final, None, stall.clone()))
    }

    /// Whether the iteration that began at `iteration_ns` and still runs at `now_ns` is owed
    /// an in-progress alert (past the threshold, and not alerted yet).
    pub fn in_progress_due(&self, iteration_ns: u64, now_ns: u64) -> bool {
        let elapsed_ns = now_ns.saturating_sub(iteration_ns);
        iteration_ns != self.alerted_iteration_ns
            && elapsed_ns >= u64::try_from(self.threshold.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The in-progress alert of the iteration that began at `iteration_ns`, `stall` being
    /// what it has sampled so far.
    pub fn in_progress_alert(&mut self, iteration_ns: u64, now_ns: u64, stall: Stall) -> Alert {
        self.alerted_iteration_ns = iteration_ns;
        self.counts.in_progress += 1;
        let elapsed_us = now_ns.saturating_sub(iteration_ns) / 1_000;
        self.give(AlertState::InProgress, Some(elapsed_us), stall)
    }

    /// Forgets the iteration last alerted (a new process's iterations start afresh).
    pub fn forget_iteration(&mut self) {
        self.alerted_iteration_ns = 0;
    }

    fn give(&mut self, state: AlertState, elapsed_us: Option<u64>, stall: Stall) -> Alert {
        let alert = Alert {
            state,
            elapsed_us,
            alert_us: self.alert_us(),
            stall,
        };
        if let Some(exec) = &mut self.exec {
            exec.submit(&alert);
        }
        alert
    }

    /// The counts for the summary, the `--alert-exec` runs included.
    pub fn counts(&self) -> AlertCounts {
        let mut counts = self.counts.clone();
        if let Some(exec) = &self.exec {
            exec.count_into(&mut counts);
        }
        counts
    }
}

/// What `--alert-exec` runs and how.
#[derive(Debug, Clone)]
pub struct ExecSettings {
    /// Program and arguments (split like a shell would, but never given to a shell).
    pub argv: Vec<String>,
    pub timeout: Duration,
    pub max_per_minute: u32,
}

/// Runs `--alert-exec` off the event path.
pub struct AlertExec {
    sender: mpsc::Sender<ExecInput>,
    recent_runs: VecDeque<Instant>,
    max_per_minute: u32,
    failed: Arc<AtomicU64>,
    runs: u64,
    suppressed: u64,
}

impl AlertExec {
    /// Starts the runner thread (the program was found when the flags were checked, see
    /// [`find_program`]).
    pub fn start(settings: ExecSettings) -> Self {
        let (sender, receiver) = mpsc::channel::<ExecInput>();
        let failed = Arc::new(AtomicU64::new(0));
        let thread_failed = Arc::clone(&failed);
        let ExecSettings {
            argv,
            timeout,
            max_per_minute,
        } = settings;
        thread::Builder::new()
            .name("alert-exec".into())
            .spawn(move || {
                for input in receiver {
                    if let Err(problem) = run_once(&argv, &input, timeout) {
                        thread_failed.fetch_add(1, Ordering::Relaxed);
                        log::warn!("--alert-exec: {problem}");
                    }
                }
            })
            .expect("spawning a thread");
        Self {
            sender,
            recent_runs: VecDeque::new(),
            max_per_minute,
            failed,
            runs: 0,
            suppressed: 0,
        }
    }

    /// Hands `alert` to the runner unless the per-minute cap is reached.
    pub fn submit(&mut self, alert: &Alert) {
        let now = Instant::now();
        while self
            .recent_runs
            .front()
            .is_some_and(|run| now.duration_since(*run) >= Duration::from_secs(60))
        {
            self.recent_runs.pop_front();
        }
        if self.recent_runs.len() >= self.max_per_minute as usize {
            self.suppressed += 1;
            return;
        }
        self.recent_runs.push_back(now);
        self.runs += 1;
        let sent = ExecInput::of(alert).and_then(|input| {
            self.sender
                .send(input)
                .map_err(|_| "the runner thread is gone".to_owned())
        });
        if let Err(problem) = sent {
            log::warn!("--alert-exec: {problem}");
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds this runner's counts to `counts`.
    pub fn count_into(&self, counts: &mut AlertCounts) {
        counts.exec_runs = self.runs;
        counts.exec_suppressed = self.suppressed;
        counts.exec_failed = self.failed.load(Ordering::Relaxed);
    }
}

/// What one `--alert-exec` run is given: the alert's JSON on its standard input and
/// `REDIS_STALLPROF_*` variables (made on the event path, sent to the runner thread).
struct ExecInput {
    json: Vec<u8>,
    environment: [(&'static str, String); 6],
}

impl ExecInput {
    fn of(alert: &Alert) -> Result<Self, String> {
        let state = match alert.state {
            AlertState::Final => "final",
            AlertState::InProgress => "in_progress",
        };
        Ok(Self {
            json: serde_json::to_vec(alert).map_err(|error| error.to_string())?,
            environment: [
                ("REDIS_STALLPROF_STATE", state.to_owned()),
                (
                    "REDIS_STALLPROF_DURATION_US",
                    alert.stall.duration_us.to_string(),
                ),
                ("REDIS_STALLPROF_ORIGIN", alert.stall.origin.clone()),
                ("REDIS_STALLPROF_MECHANISM", alert.stall.mechanism.clone()),
                ("REDIS_STALLPROF_PID", alert.stall.pid.to_string()),
                (
                    "REDIS_STALLPROF_PORT",
                    alert
                        .stall
                        .instance
                        .port
                        .map(|port| port.to_string())
                        .unwrap_or_default(),
                ),
            ],
        })
    }
}

/// Runs the command once with the alert on stdin and `REDIS_STALLPROF_*` in its environment.
fn run_once(argv: &[String], input: &ExecInput, timeout: Duration) -> Result<(), String> {
    let (program, arguments) = argv.split_first().ok_or("no command given")?;
    let mut child = Command::new(program)
        .args(arguments)
        .envs(input.environment.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|error| format!("cannot run `{program}`: {error}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is its own business.
        let _ = stdin
            .write_all(&input.json)
            .and_then(|()| stdin.write_all(b"\n"));
    }
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("`{program}` failed: {status}")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{program}` still ran after {timeout:?}; killed it"
                ));
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(error) => return Err(format!("cannot wait for `{program}`: {error}")),
        }
    }
}

/// The program's path: as given when it has a `/`, else the first match on `PATH`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(state: AlertState) -> Alert {
        Alert {
            state,
            elapsed_us: None,
            alert_us: 100_000,
            stall: Stall::example("command:debug", "syscall.sleep", 200_000),
        }
    }

    fn input(state: AlertState) -> ExecInput {
        ExecInput::of(&alert(state)).unwrap()
    }

    #[test]
    fn an_alert_is_the_stall_with_its_state() {
        let json = serde_json::to_value(alert(AlertState::Final)).unwrap();
        assert_eq!(json["state"], "final");
        assert_eq!(json["origin"], "command:debug");
        assert_eq!(json["duration_us"], 200_000);
        assert!(json.get("elapsed_us").is_none());
    }

    #[test]
    fn the_command_gets_the_json_on_stdin_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "cat > {0}; echo \"$REDIS_STALLPROF_ORIGIN $REDIS_STALLPROF_STATE\" >> {0}",
            out.display()
        );
        let argv = vec!["sh".to_owned(), "-c".to_owned(), script];
        run_once(&argv, &input(AlertState::Final), Duration::from_secs(5)).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let (json, environment) = text.split_once('\n').unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(json).unwrap()["mechanism"],
            "syscall.sleep"
        );
        assert_eq!(environment.trim(), "command:debug final");
    }

    #[test]
    fn a_hanging_command_is_killed_and_a_missing_one_is_an_error() {
        let hang = vec!["sleep".to_owned(), "30".to_owned()];
        let started = Instant::now();
        let error =
            run_once(&hang, &input(AlertState::Final), Duration::from_millis(200)).unwrap_err();
        assert!(
            error.contains("killed it") && started.elapsed() < Duration::from_secs(5),
            "{error}"
        );
        let missing = vec!["/nonexistent/notify".to_owned()];
        assert!(
            run_once(&missing, &input(AlertState::Final), Duration::from_secs(1))
                .unwrap_err()
                .contains("cannot run")
        );
        assert!(find_program("sh").is_some() && find_program("/nonexistent/notify").is_none());
    }

    #[test]
    fn runs_beyond_the_cap_are_suppressed_and_counted() {
        let mut exec = AlertExec::start(ExecSettings {
            argv: vec!["true".into()],
            timeout: Duration::from_secs(5),
            max_per_minute: 2,
        });
        for _ in 0..5 {
            exec.submit(&alert(AlertState::Final));
        }
        let mut counts = AlertCounts::default();
        exec.count_into(&mut counts);
        assert_eq!((counts.exec_runs, counts.exec_suppressed), (2, 3));
    }
}
