//! `xtask ping-pong N`: the context-switch microbenchmark. Two processes pinned to one CPU
//! pass a byte back and forth through two pipes N times (two context switches per round trip,
//! nothing to do with Redis) and the parent prints the nanoseconds per round trip. Run with
//! and without profilers watching idle servers, the difference is what their scheduler
//! programs add to every context switch on the host.
use std::{io, time::Instant};

use anyhow::{Context as _, bail};

pub fn run(round_trips: u64) -> anyhow::Result<()> {
    let (to_child, from_parent) = pipe()?;
    let (to_parent, from_child) = pipe()?;
    // SAFETY: fork in a single-threaded process; the child only uses the pipes and exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        bail!("fork: {}", io::Error::last_os_error());
    }
    let mut byte = [0u8; 1];
    if child == 0 {
        // SAFETY: the parent's ends are closed (so the parent's close ends the loop), then
        // reads and writes of one byte on the child's ends.
        unsafe {
            libc::close(to_child);
            libc::close(from_child);
            while libc::read(from_parent, byte.as_mut_ptr().cast(), 1) == 1 {
                if libc::write(to_parent, byte.as_ptr().cast(), 1) != 1 {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    // SAFETY: the child's ends, not the parent's to use.
    unsafe {
        libc::close(from_parent);
        libc::close(to_parent);
    }
    let start = Instant::now();
    for _ in 0..round_trips {
        // SAFETY: one byte through the parent's pipe ends.
        let passed = unsafe {
            libc::write(to_child, byte.as_ptr().cast(), 1) == 1
                && libc::read(from_child, byte.as_mut_ptr().cast(), 1) == 1
        };
        if !passed {
            bail!("the ping-pong partner went away");
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / round_trips.max(1) as f64;
    // SAFETY: closing our end ends the child's loop; then it is reaped.
    unsafe {
        libc::close(to_child);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    println!("{ns:.1}");
    Ok(())
}

/// A pipe: (write end, read end).
fn pipe() -> anyhow::Result<(i32, i32)> {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error()).context("pipe");
    }
    Ok((fds[1], fds[0]))
}
