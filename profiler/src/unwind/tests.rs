//! Unwinding this test process's own stack, cut copies, and registers that point nowhere.
use super::*;

/// This thread's registers and up to 16 KiB of its stack, as the kernel side copies them.
#[inline(never)]
fn record_own_stack(buffer: &mut Vec<u8>) -> (u64, u64, u64) {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: reads three registers.
    unsafe {
        std::arch::asm!("lea {ip}, [rip]", "mov {sp}, rsp", "mov {bp}, rbp", ip = out(reg) ip, sp = out(reg) sp, bp = out(reg) bp);
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let stack_end = maps
        .lines()
        .filter_map(|line| {
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            ))
        })
        .find(|&(start, end)| start <= sp && sp < end)
        .map(|(_, end)| end)
        .unwrap();
    let len = (stack_end - sp).min(16 * 1024) as usize;
    // SAFETY: [sp, sp + len) lies inside this thread's mapped stack.
    buffer.extend_from_slice(unsafe { std::slice::from_raw_parts(sp as *const u8, len) });
    (ip, sp, bp)
}

#[test]
fn our_own_stack_unwinds_through_several_frames_into_the_test_harness() {
    let mut bytes = Vec::new();
    let (ip, sp, bp) = record_own_stack(&mut bytes);
    let mut unwinder = DwarfUnwinder::new(std::process::id());
    let stack = unwinder.unwind(&RecordedStack {
        ip,
        sp,
        bp,
        bytes: &bytes,
    });
    assert!(stack.lookup_addresses.len() >= 5, "{stack:?}");
    let own_module = unwinder.memory_map().find(ip).unwrap().path.clone();
    // The first return address is in this test function, in this test binary.
    assert_eq!(
        unwinder
            .memory_map()
            .find(stack.lookup_addresses[1])
            .unwrap()
            .path,
        own_module
    );
    // The walk leaves the test binary (std's thread start in libc: clone3 / start_thread).
    assert!(stack.lookup_addresses.iter().any(|&a| {
        unwinder
            .memory_map()
            .find(a)
            .is_some_and(|m| m.path != own_module)
    }));
}

#[test]
fn a_truncated_copy_cuts_the_stack_without_failing() {
    let mut bytes = Vec::new();
    let (ip, sp, bp) = record_own_stack(&mut bytes);
    let mut unwinder = DwarfUnwinder::new(std::process::id());
    let full = unwinder.unwind(&RecordedStack {
        ip,
        sp,
        bp,
        bytes: &bytes,
    });
    let cut = unwinder.unwind(&RecordedStack {
        ip,
        sp,
        bp,
        bytes: &bytes[..64],
    });
    assert!(cut.lookup_addresses.len() < full.lookup_addresses.len());
    assert_eq!(cut.lookup_addresses[0], ip);
}

#[test]
fn registers_that_point_nowhere_give_one_unknown_frame() {
    let mut unwinder = DwarfUnwinder::new(std::process::id());
    for (ip, sp) in [(0, 0), (0xdead_beef, 0x10), (u64::MAX, u64::MAX - 4)] {
        let stack = unwinder.unwind(&RecordedStack {
            ip,
            sp,
            bp: 0,
            bytes: &[0xff; 32],
        });
        assert_eq!(stack.lookup_addresses, [ip]);
    }
}

#[test]
fn a_process_that_is_gone_unwinds_nothing_and_does_not_fail() {
    let mut unwinder = DwarfUnwinder::new(u32::MAX - 1);
    let stack = unwinder.unwind(&RecordedStack {
        ip: 0x1000,
        sp: 0x2000,
        bp: 0,
        bytes: &[0; 64],
    });
    assert_eq!(stack.lookup_addresses, [0x1000]);
}

#[test]
fn a_reading_outside_the_copy_fails() {
    let bytes = [1u8, 0, 0, 0, 0, 0, 0, 0, 2];
    let stack = RecordedStack {
        ip: 0,
        sp: 100,
        bp: 0,
        bytes: &bytes,
    };
    assert_eq!(stack.read(100), Ok(1));
    assert_eq!(stack.read(101), Ok(0x0200_0000_0000_0000));
    assert_eq!(stack.read(102), Err(()));
    assert_eq!(stack.read(99), Err(()));
    assert_eq!(stack.read(u64::MAX), Err(()));
}

#[test]
fn nesting_ranges_match_and_overlapping_ones_do_not() {
    assert!(ranges_nest(0x1000, 0x5000, 0x2000, 0x1000));
    assert!(ranges_nest(0x2000, 0x1000, 0x1000, 0x5000));
    assert!(!ranges_nest(0x1000, 0x2000, 0x2000, 0x2000));
}

/// Fuzzing: arbitrary registers and stack bytes against this process's real modules (one
/// unwinder for all cases: loading the modules is the slow part). `PROPTEST_CASES` sets
/// the number of cases.
#[test]
fn arbitrary_registers_and_bytes_unwind_without_failing() {
    use proptest::{
        collection::vec, num::u8, num::u64, strategy::Strategy, test_runner::TestRunner,
    };
    let unwinder = std::cell::RefCell::new(DwarfUnwinder::new(std::process::id()));
    let code = arbitrary_registers_and_bytes_unwind_without_failing as *const () as u64;
    let registers = (u64::ANY, u64::ANY, u64::ANY, vec(u8::ANY, 0..512));
    // Half the cases start in real code of this binary with a stack of random words.
    let in_code = (0u64..4096, vec(u64::ANY, 0..64)).prop_map(move |(offset, words)| {
        (
            code + offset,
            0,
            0,
            words
                .iter()
                .flat_map(|word| word.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
    });
    TestRunner::default()
        .run(
            &proptest::prop_oneof![registers, in_code],
            |(ip, sp, bp, bytes)| {
                let sp = if sp == 0 { bytes.as_ptr() as u64 } else { sp };
                let stack = unwinder.borrow_mut().unwind(&RecordedStack {
                    ip,
                    sp,
                    bp,
                    bytes: &bytes,
                });
                proptest::prop_assert_eq!(stack.lookup_addresses[0], ip);
                proptest::prop_assert!(stack.lookup_addresses.len() <= MAX_FRAMES);
                Ok(())
            },
        )
        .unwrap();
}
