//! `xtask poll-loop`: the target of the poll microbenchmark. Its main thread idles in an
//! `epoll_wait` on stdin; for each line `N` it makes N zero-timeout `epoll_wait` calls and prints
//! the nanoseconds per call. Aimed at by the profiler (`--force`), the difference with the
//! figure without it is the full added cost per poll: the tracepoint's dispatch and the program.
use std::{
    io::{self, Write as _},
    time::Instant,
};

use anyhow::{Context as _, bail};

pub fn run() -> anyhow::Result<()> {
    // SAFETY: plain system calls on descriptors this function owns, with valid buffers.
    unsafe {
        let epoll = libc::epoll_create1(0);
        if epoll < 0 {
            bail!("epoll_create1: {}", io::Error::last_os_error());
        }
        let mut interest = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        if libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, 0, &mut interest) < 0 {
            bail!("epoll_ctl on stdin: {}", io::Error::last_os_error());
        }
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }];
        let mut pending = Vec::new();
        loop {
            if libc::epoll_wait(epoll, ready.as_mut_ptr(), 1, -1) < 0 {
                continue;
            }
            let mut chunk = [0u8; 64];
            let read = libc::read(0, chunk.as_mut_ptr().cast(), chunk.len());
            if read <= 0 {
                return Ok(());
            }
            pending.extend_from_slice(&chunk[..read as usize]);
            while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let calls: u64 = std::str::from_utf8(&line)?
                    .trim()
                    .parse()
                    .context("expected a number of calls")?;
                let start = Instant::now();
                for _ in 0..calls {
                    libc::epoll_wait(epoll, ready.as_mut_ptr(), 1, 0);
                }
                let ns_per_call = start.elapsed().as_nanos() as f64 / calls.max(1) as f64;
                let mut stdout = io::stdout();
                writeln!(stdout, "{ns_per_call:.1}")?;
                stdout.flush()?;
            }
        }
    }
}
