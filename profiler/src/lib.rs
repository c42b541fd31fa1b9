//! redis-stallprof: an eBPF latency profiler for a live Redis. It times every iteration of the
//! event loop in the kernel and reports the ones longer than a threshold (stalls).
//!
//! Pipeline: [`cli`] flags -> [`config`] -> [`kernel`] checks and [`target`] -> [`probes`]
//! attached -> ring-buffer bytes decoded by [`events`] -> stack events unwound ([`unwind`],
//! over [`memory_map`]) and assembled into stalls, then symbolized ([`symbolize`]) and
//! attributed ([`attribute`]) by [`stall`] into typed [`stack`] frames -> records
//! ([`output::record`]) to the [`output`] sinks, [`metrics`] and [`alert`]s. [`attach`]
//! drives a run; [`accept`] watches the accept queues, [`madvise`] and [`histogram`] keep
//! their totals; [`doctor`] checks a machine and [`report`] renders a recorded run again.
pub mod accept;
pub mod alert;
pub mod attach;
pub mod attribute;
pub mod bounded;
pub mod cli;
pub mod clock;
pub mod config;
pub mod doctor;
pub mod error_chain;
pub mod events;
pub mod histogram;
pub mod kernel;
pub mod kernel_layout;
pub mod madvise;
pub mod memory;
pub mod memory_map;
pub mod metrics;
pub mod module_file;
pub mod output;
pub mod privileges;
pub mod probes;
pub mod report;
pub mod stack;
pub mod stall;
pub mod symbolize;
pub mod tail_calls;
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
            attach::run_attach(args)?;
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
