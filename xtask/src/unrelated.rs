//! `xtask syscall-loop N` and `xtask fault-loop N`: what a process nobody watches does all day,
//! timed. The first makes N `getppid` calls, the second writes once to each of N fresh anonymous
//! pages (one page fault each); each prints the nanoseconds per operation. Run beside a
//! profiler and without one, the difference is what the profiler costs the rest of the host.
use std::{io, time::Instant};

use anyhow::bail;

/// N `getppid` system calls.
pub fn syscalls(calls: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    for _ in 0..calls {
        // SAFETY: a system call without arguments.
        unsafe { libc::getppid() };
    }
    println!(
        "{:.1}",
        start.elapsed().as_nanos() as f64 / calls.max(1) as f64
    );
    Ok(())
}

/// One write to each of N fresh anonymous pages; prints the nanoseconds per fault.
pub fn faults(pages: u64) -> anyhow::Result<()> {
    println!("{:.1}", fault_ns(pages as usize)?);
    Ok(())
}

/// Nanoseconds per page fault of one write to each of `pages` fresh anonymous pages.
pub fn fault_ns(pages: usize) -> anyhow::Result<f64> {
    // SAFETY: sysconf reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let length = page * pages;
    // SAFETY: a new private anonymous mapping, written within its length, then unmapped.
    unsafe {
        let memory = libc::mmap(
            std::ptr::null_mut(),
            length,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if memory == libc::MAP_FAILED {
            bail!("mmap: {}", io::Error::last_os_error());
        }
        let bytes = memory.cast::<u8>();
        let start = Instant::now();
        for offset in (0..length).step_by(page) {
            bytes.add(offset).write_volatile(1);
        }
        let ns = start.elapsed().as_nanos() as f64 / pages.max(1) as f64;
        libc::munmap(memory, length);
        Ok(ns)
    }
}
