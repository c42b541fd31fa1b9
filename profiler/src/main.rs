//! `redis-stallprof`: parses the command line, runs it, and turns an error into one line on
//! stderr and exit code 1 (usage errors: 2).
use std::{io::Write as _, process::ExitCode};

use clap::Parser as _;
use redis_stallprof::{EXIT_FAILURE, cli::Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format(|buffer, record| {
            writeln!(
                buffer,
                "redis-stallprof: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
    match redis_stallprof::run(&cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("redis-stallprof: error: {error:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
