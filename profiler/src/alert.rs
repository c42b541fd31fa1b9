//! Alerts on stall duration. A stall at least `--alert` long gives a final alert; an iteration
//! still running past `--alert` gives an in-progress alert at once (the kernel's loop state says
//! when the iteration began). Alerts go to the outputs, and with `--alert-exec` to a command.
//!
//! The command is run by the run's one [`AlertRunner`]: a thread that holds no capability
//! (its bounding set emptied, `no_new_privs` set), fed through a bounded queue, under one
//! per-minute cap for every target. Each command runs in a process group of its own with
//! empty capability sets (as `--alert-user` when given), gets the alert JSON on its standard
//! input without the runner ever blocking on it, and is killed, group and all, after
//! `--alert-timeout`. Nothing is dropped silently: alerts over the cap, past a full queue or
//! left when the run ends are counted.
use std::{
    cell::RefCell,
    collections::VecDeque,
    io::{self, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    rc::Rc,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use caps::{CapSet, Capability, CapsHashSet};

use crate::output::record::{Alert, AlertCounts, AlertState, Stall};

/// How often the current iteration's age is checked: an in-progress alert goes out at most
/// this long after the iteration crosses the alert threshold.
pub const IN_PROGRESS_CHECK_PERIOD: Duration = Duration::from_millis(10);
/// Alerts waiting for the command; more are counted as dropped (a command slower than the
/// alerts come cannot make the profiler's memory grow).
const QUEUE_LENGTH: usize = 16;
/// How often a running command is looked at (its exit, its standard input).
const RUN_POLL_PERIOD: Duration = Duration::from_millis(5);

/// `--alert`: the threshold, and `--alert-exec` when given.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    pub threshold: Duration,
    pub exec: Option<ExecSettings>,
}

/// The alerts of one target: which stalls and iterations get one, and their counts.
pub struct Alerting {
    threshold: Duration,
    /// The run's runner, and this target's counts of its runs.
    exec: Option<(Rc<AlertRunner>, Arc<ExecCounts>)>,
    counts: AlertCounts,
    /// Start of the iteration an in-progress alert was last given for.
    alerted_iteration_ns: u64,
}

impl Alerting {
    /// Alerts at `threshold`, with `runner` running `--alert-exec` when there is one.
    pub fn new(threshold: Duration, runner: Option<Rc<AlertRunner>>) -> Self {
        Self {
            threshold,
            exec: runner.map(|runner| (runner, Arc::default())),
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
        if let Some((runner, counts)) = &self.exec {
            runner.submit(&alert, counts);
        }
        alert
    }

    /// The counts for the summary, the `--alert-exec` runs included.
    pub fn counts(&self) -> AlertCounts {
        let mut counts = self.counts.clone();
        if let Some((_, exec)) = &self.exec {
            exec.add_to(&mut counts);
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
    /// `--alert-user`: the user the command runs as (else the profiler's, without privileges).
    pub user: Option<AlertUser>,
}

/// The user and group an `--alert-exec` command runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertUser {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for AlertUser {
    type Err = String;

    /// A user name (its primary group), `UID` (the same number as group) or `UID:GID`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let number = |text: &str| text.parse::<u32>().ok();
        if let Some((uid, gid)) = value.split_once(':') {
            return match (number(uid), number(gid)) {
                (Some(uid), Some(gid)) => Ok(Self { uid, gid }),
                _ => Err(format!("`{value}` is not UID:GID")),
            };
        }
        if let Some(uid) = number(value) {
            return Ok(Self { uid, gid: uid });
        }
        user_by_name(value).ok_or_else(|| format!("no user `{value}` on this host"))
    }
}

/// The uid and primary gid of the user called `name` (`getpwnam_r`).
fn user_by_name(name: &str) -> Option<AlertUser> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam_r writes into `entry` and `buffer`, both ours and of the sizes given.
    unsafe {
        let mut entry: libc::passwd = std::mem::zeroed();
        let mut buffer = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let failed = libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        );
        (failed == 0 && !found.is_null()).then_some(AlertUser {
            uid: entry.pw_uid,
            gid: entry.pw_gid,
        })
    }
}

/// One target's counts of its `--alert-exec` runs, kept by the runner thread too.
#[derive(Debug, Default)]
pub struct ExecCounts {
    runs: AtomicU64,
    suppressed: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    not_run: AtomicU64,
}

impl ExecCounts {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn add_to(&self, counts: &mut AlertCounts) {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        counts.exec_runs = read(&self.runs);
        counts.exec_suppressed = read(&self.suppressed);
        counts.exec_dropped = read(&self.dropped);
        counts.exec_failed = read(&self.failed);
        counts.exec_not_run = read(&self.not_run);
    }
}

/// An alert waiting for the command, and the counts of the target it came from.
struct Job {
    input: ExecInput,
    counts: Arc<ExecCounts>,
}

/// The run's `--alert-exec` runner: one thread, one bounded queue, one per-minute cap.
pub struct AlertRunner {
    sender: RefCell<Option<mpsc::SyncSender<Job>>>,
    /// When the runs of the last minute were handed over.
    recent_runs: RefCell<VecDeque<Instant>>,
    max_per_minute: u32,
    /// Past this, the runner starts no queued command (set when the run ends).
    last_start: Arc<Mutex<Option<Instant>>>,
    timeout: Duration,
    thread: RefCell<Option<thread::JoinHandle<()>>>,
}

impl AlertRunner {
    /// Starts the runner thread, which first gives up every capability but, with `user`, the
    /// two it needs to become that user. Started before the run drops its own capabilities:
    /// emptying a bounding set needs CAP_SETPCAP.
    pub fn start(settings: ExecSettings) -> io::Result<Self> {
        let (sender, receiver) = mpsc::sync_channel::<Job>(QUEUE_LENGTH);
        let last_start = Arc::new(Mutex::new(None::<Instant>));
        let thread_last_start = Arc::clone(&last_start);
        let ExecSettings {
            argv,
            timeout,
            max_per_minute,
            user,
        } = settings;
        let thread = thread::Builder::new()
            .name("alert-exec".into())
            .spawn(move || {
                if let Err(error) = confine_this_thread(user.is_some()) {
                    log::warn!("--alert-exec: cannot give up this thread's privileges: {error}");
                }
                for job in receiver {
                    let too_late = thread_last_start
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .is_some_and(|last| Instant::now() >= last);
                    if too_late {
                        ExecCounts::add(&job.counts.not_run);
                        continue;
                    }
                    ExecCounts::add(&job.counts.runs);
                    if let Err(problem) = run_once(&argv, &job.input, timeout, user) {
                        ExecCounts::add(&job.counts.failed);
                        log::warn!("--alert-exec: {problem}");
                    }
                }
            })?;
        Ok(Self {
            sender: RefCell::new(Some(sender)),
            recent_runs: RefCell::new(VecDeque::new()),
            max_per_minute,
            last_start,
            timeout,
            thread: RefCell::new(Some(thread)),
        })
    }

    /// Queues `alert` for the command, unless the per-minute cap is reached or the queue is
    /// full (counted in `counts` either way).
    fn submit(&self, alert: &Alert, counts: &Arc<ExecCounts>) {
        let now = Instant::now();
        let mut recent_runs = self.recent_runs.borrow_mut();
        while recent_runs
            .front()
            .is_some_and(|run| now.duration_since(*run) >= Duration::from_secs(60))
        {
            recent_runs.pop_front();
        }
        if recent_runs.len() >= self.max_per_minute as usize {
            ExecCounts::add(&counts.suppressed);
            return;
        }
        let input = match ExecInput::of(alert) {
            Ok(input) => input,
            Err(problem) => {
                log::warn!("--alert-exec: {problem}");
                ExecCounts::add(&counts.failed);
                return;
            }
        };
        let job = Job {
            input,
            counts: Arc::clone(counts),
        };
        let sent = match self.sender.borrow().as_ref() {
            Some(sender) => sender.try_send(job),
            None => Err(mpsc::TrySendError::Disconnected(job)),
        };
        match sent {
            Ok(()) => recent_runs.push_back(now),
            Err(mpsc::TrySendError::Full(job)) => {
                ExecCounts::add(&job.counts.dropped);
                log::warn!(
                    "--alert-exec: {QUEUE_LENGTH} alerts already wait for the command; this one \
                     is dropped (counted)"
                );
            }
            Err(mpsc::TrySendError::Disconnected(job)) => ExecCounts::add(&job.counts.not_run),
        }
    }

    /// At the end of the run: the queued alerts still start for one `--alert-timeout`, then
    /// the rest are counted as not run; returns once the last command has ended (killed at
    /// its timeout if need be).
    pub fn finish(&self) {
        *self
            .last_start
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(Instant::now() + self.timeout);
        self.sender.borrow_mut().take();
        if let Some(thread) = self.thread.borrow_mut().take()
            && thread.join().is_err()
        {
            log::warn!("--alert-exec: the runner thread failed");
        }
    }
}

/// Capabilities of the runner thread: none, but CAP_SETUID and CAP_SETGID when its commands
/// become another user. Also empties the bounding set (so that a command running as root
/// cannot regain any capability by exec) and sets `no_new_privs` (nor through a set-user-ID
/// or file-capability program). Every change is to the calling thread alone.
fn confine_this_thread(switches_user: bool) -> Result<(), caps::errors::CapsError> {
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        for capability in caps::read(None, CapSet::Bounding)? {
            caps::drop(None, CapSet::Bounding, capability)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let kept: CapsHashSet = if switches_user {
        [Capability::CAP_SETUID, Capability::CAP_SETGID].into()
    } else {
        CapsHashSet::new()
    };
    let kept: CapsHashSet = kept
        .intersection(&caps::read(None, CapSet::Permitted)?)
        .copied()
        .collect();
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    // SAFETY: a prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        log::warn!(
            "--alert-exec: cannot set no_new_privs: {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

/// What one `--alert-exec` run is given: the alert's JSON on its standard input and
/// `REDIS_STALLPROF_*` variables (made on the event path, sent to the runner thread).
struct ExecInput {
    json: Vec<u8>,
    environment: [(&'static str, String); 7],
}

impl ExecInput {
    fn of(alert: &Alert) -> Result<Self, String> {
        let state = match alert.state {
            AlertState::Final => "final",
            AlertState::InProgress => "in_progress",
        };
        let mut json = serde_json::to_vec(alert).map_err(|error| error.to_string())?;
        json.push(b'\n');
        Ok(Self {
            json,
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
                (
                    "REDIS_STALLPROF_CLIENT",
                    alert
                        .stall
                        .client
                        .sender()
                        .map(|sender| sender.addr.clone())
                        .unwrap_or_default(),
                ),
            ],
        })
    }
}

/// `capset(2)`'s header and data (`linux/capability.h`), version 3: two data words.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// In the forked child, before exec: become `user` if given, then empty every capability
/// set. Raw system calls only (the child of a threaded process may not allocate or lock).
fn drop_privileges_before_exec(user: Option<AlertUser>) -> io::Result<()> {
    // SAFETY: system calls with arguments that live on this stack frame.
    unsafe {
        if let Some(AlertUser { uid, gid }) = user {
            let groups = [gid];
            if libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let none = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &header, none.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs the command once with the alert on stdin and `REDIS_STALLPROF_*` in its environment,
/// in a process group of its own, without privileges; kills the group after `timeout`.
fn run_once(
    argv: &[String],
    input: &ExecInput,
    timeout: Duration,
    user: Option<AlertUser>,
) -> Result<(), String> {
    let (program, arguments) = argv.split_first().ok_or("no command given")?;
    let mut command = Command::new(program);
    command
        .args(arguments)
        .envs(input.environment.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0);
    // SAFETY: the closure makes raw system calls only.
    unsafe { command.pre_exec(move || drop_privileges_before_exec(user)) };
    let deadline = Instant::now() + timeout;
    let mut child = command
        .spawn()
        .map_err(|error| format!("cannot run `{program}`: {error}"))?;
    let mut stdin = child.stdin.take().and_then(|stdin| {
        set_nonblocking(&stdin)
            .is_ok()
            .then_some((stdin, input.json.as_slice()))
    });
    loop {
        if let Some((pipe, pending)) = &mut stdin {
            // A command that does not read its input is its own business: what does not fit
            // in the pipe by the deadline is not sent.
            match pipe.write(pending) {
                Ok(written) => *pending = &pending[written..],
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => *pending = &[],
            }
            if pending.is_empty() {
                stdin = None; // closed: the command sees the end of its input
            }
        }
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("`{program}` failed: {status}")),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(&mut child);
                return Err(format!(
                    "`{program}` still ran after {timeout:?}; killed it and its process group"
                ));
            }
            Ok(None) => thread::sleep(RUN_POLL_PERIOD),
            Err(error) => {
                kill_group(&mut child);
                return Err(format!("cannot wait for `{program}`: {error}"));
            }
        }
    }
}

fn set_nonblocking(stdin: &ChildStdin) -> io::Result<()> {
    let fd = stdin.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kills the command's process group (it leads it) and reaps the command.
fn kill_group(child: &mut Child) {
    if let Ok(group) = libc::pid_t::try_from(child.id()) {
        // SAFETY: signals the process group our own child leads.
        unsafe { libc::killpg(group, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
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

    fn shell(script: &str) -> Vec<String> {
        vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()]
    }

    fn settings(argv: Vec<String>, timeout: Duration, max_per_minute: u32) -> ExecSettings {
        ExecSettings {
            argv,
            timeout,
            max_per_minute,
            user: None,
        }
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
        run_once(
            &shell(&script),
            &input(AlertState::Final),
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let (json, environment) = text.split_once('\n').unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(json).unwrap()["mechanism"],
            "syscall.sleep"
        );
        assert_eq!(environment.trim(), "command:debug final");
    }

    #[test]
    fn a_hanging_command_is_killed_with_its_group_and_a_missing_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        // A background child in the command's group outlives the command unless the group dies.
        let script = format!("sleep 30 & echo $! > {}; sleep 30", pids.display());
        let started = Instant::now();
        let error = run_once(
            &shell(&script),
            &input(AlertState::Final),
            Duration::from_millis(300),
            None,
        )
        .unwrap_err();
        assert!(
            error.contains("killed it") && started.elapsed() < Duration::from_secs(5),
            "{error}"
        );
        let background: u32 = std::fs::read_to_string(&pids)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        thread::sleep(Duration::from_millis(100));
        let state = std::fs::read_to_string(format!("/proc/{background}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "the background child was killed too: {state}"
        );
        let missing = vec!["/nonexistent/notify".to_owned()];
        assert!(
            run_once(
                &missing,
                &input(AlertState::Final),
                Duration::from_secs(1),
                None
            )
            .unwrap_err()
            .contains("cannot run")
        );
        assert!(find_program("sh").is_some() && find_program("/nonexistent/notify").is_none());
    }

    #[test]
    fn a_command_that_neither_reads_nor_exits_cannot_block_the_runner() {
        // Far more than a pipe holds: writing it all would block until `sleep` exits.
        let big = ExecInput {
            json: vec![b'x'; 4 << 20],
            environment: input(AlertState::Final).environment,
        };
        let started = Instant::now();
        let sleeper = vec!["sleep".to_owned(), "30".to_owned()];
        let error = run_once(&sleeper, &big, Duration::from_millis(300), None).unwrap_err();
        assert!(error.contains("killed it"), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn runs_beyond_the_cap_or_the_queue_are_counted_and_queued_ones_end_with_the_run() {
        let runner = Rc::new(
            AlertRunner::start(settings(vec!["true".into()], Duration::from_secs(5), 2)).unwrap(),
        );
        let mut first = Alerting::new(Duration::from_millis(100), Some(Rc::clone(&runner)));
        let mut second = Alerting::new(Duration::from_millis(100), Some(Rc::clone(&runner)));
        let stall = Stall::example("command:debug", "syscall.sleep", 200_000);
        for _ in 0..3 {
            first.final_alert(&stall);
            second.final_alert(&stall);
        }
        runner.finish();
        let (first, second) = (first.counts(), second.counts());
        // One cap for the run: two runs in all, the other four suppressed.
        assert_eq!(first.exec_runs + second.exec_runs, 2);
        assert_eq!(first.exec_suppressed + second.exec_suppressed, 4);
        assert_eq!(first.finals, 3);

        // A slow command: the queue holds QUEUE_LENGTH, the rest are dropped; at the end the
        // waiting ones start for one timeout, then are counted as not run.
        let slow = Rc::new(
            AlertRunner::start(settings(
                vec!["sleep".into(), "0.2".into()],
                Duration::from_millis(300),
                1_000,
            ))
            .unwrap(),
        );
        let mut alerting = Alerting::new(Duration::from_millis(100), Some(Rc::clone(&slow)));
        for _ in 0..100 {
            alerting.final_alert(&stall);
        }
        slow.finish();
        let counts = alerting.counts();
        assert!(
            counts.exec_dropped >= 100 - QUEUE_LENGTH as u64 - 1,
            "{counts:?}"
        );
        assert!(counts.exec_not_run > 0, "{counts:?}");
        assert_eq!(
            counts.exec_runs + counts.exec_dropped + counts.exec_not_run,
            100,
            "every alert is accounted for: {counts:?}"
        );
    }
}
