//! redis-stallprof: an eBPF latency profiler for a live Redis. It times every iteration of the
//! event loop in the kernel and reports the ones longer than a threshold (stalls).
//!
//! Pipeline: [`cli`] flags -> [`kernel`] checks and [`target`] -> [`probes`] attached ->
//! ring-buffer bytes decoded by [`events`] -> [`stall`]s and the [`histogram`] -> [`output`]
//! sinks, with stack events turned into stacks by [`unwind`] (over [`memory_map`]) and
//! [`symbolize`]; [`session`] drives an `attach` run, [`doctor`] checks a machine and
//! [`report`] renders a recorded run again.
pub mod accept;
pub mod alert;
pub mod attribute;
pub mod cli;
pub mod clock;
pub mod doctor;
pub mod events;
pub mod histogram;
pub mod kernel;
pub mod madvise;
pub mod memory_map;
pub mod metrics;
pub mod output;
pub mod privileges;
pub mod probes;
pub mod report;
pub mod session;
pub mod stall;
pub mod symbolize;
pub mod target;
pub mod unwind;

use std::process::ExitCode;

use cli::{Cli, Command};

/// Exit code when the run could not do its job (usage errors exit with 2, from clap).
pub const EXIT_FAILURE: u8 = 1;

/// Runs the command the user gave.
pub fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Attach(args) => {
            session::run_attach(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor => Ok(if doctor::run_doctor() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_FAILURE)
        }),
        Command::Report(args) => {
            report::run_report(args)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
