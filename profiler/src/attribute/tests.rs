//! Attribution of recorded stacks (leaf first) by the built-in rules.
use super::*;
use crate::output::frame_text;

/// Recorded stacks (leaf first) from Debian's redis-server 7.0.15 with system jemalloc.
const SLEEP: &[&str] = &[
    "__schedule_[k]",
    "schedule_[k]",
    "do_nanosleep_[k]",
    "hrtimer_nanosleep_[k]",
    "common_nsleep_[k]",
    "__x64_sys_clock_nanosleep_[k]",
    "do_syscall_64_[k]",
    "entry_SYSCALL_64_after_hwframe_[k]",
    "__GI___clock_nanosleep",
    "__GI___nanosleep",
    "debugCommand",
    "call",
    "processCommand",
    "processInputBuffer",
    "readQueryFromClient",
    "redis-server+0x13c333",
    "redis-server+0x64ef7",
    "aeMain",
    "main",
    "__libc_start_call_main",
    "__libc_start_main_impl",
    "_start",
];
/// MEMORY PURGE through the stripped system libjemalloc.
const STRIPPED_PURGE: &[&str] = &[
    "unmap_page_range_[k]",
    "zap_page_range_single_batched_[k]",
    "madvise_vma_behavior_[k]",
    "do_madvise_[k]",
    "__x64_sys_madvise_[k]",
    "do_syscall_64_[k]",
    "entry_SYSCALL_64_after_hwframe_[k]",
    "__GI_madvise",
    "libjemalloc.so.2+0x94ee7",
    "libjemalloc.so.2+0x87d3f",
    "jemalloc_purge",
    "memoryCommand",
    "call",
    "processCommand",
    "processInputBuffer",
    "readQueryFromClient",
    "aeMain",
    "main",
];
/// The incident's chain, with Redis's bundled (je_-prefixed) jemalloc.
const QUERYBUF_PURGE: &[&str] = &[
    "je_pages_purge_forced",
    "je_extent_purge_forced_wrapper",
    "je_arena_decay",
    "je_realloc",
    "sdsRemoveFreeSpace",
    "clientsCronResizeQueryBuffer",
    "clientsCron",
    "serverCron",
    "processTimeEvents",
    "aeProcessEvents",
    "aeMain",
    "main",
];
const KEYS: &[&str] = &[
    "dictNext",
    "keysCommand",
    "call",
    "processCommand",
    "processInputBuffer",
    "readQueryFromClient",
    "redis-server+0x13c333",
    "aeMain",
    "main",
];

fn attribute(kind: StackKind, frames: &[&str]) -> (String, String) {
    let frames: Vec<Frame> = frames.iter().map(|text| frame_text::parse(text)).collect();
    let attribution = Rules::builtin().attribute(kind, &frames);
    (attribution.origin, attribution.mechanism)
}

#[test]
fn a_sleeping_command_is_command_debug_syscall_sleep() {
    assert_eq!(
        attribute(StackKind::OffCpu, SLEEP),
        ("command:debug".into(), "syscall.sleep".into())
    );
}

#[test]
fn a_purge_through_a_stripped_jemalloc_is_an_allocator_purge() {
    assert_eq!(
        attribute(StackKind::OnCpu, STRIPPED_PURGE),
        ("command:memory".into(), "allocator.purge".into())
    );
    // A sample inside jemalloc's own (unnamed) code under jemalloc_purge: module says
    // allocator, the purge further out refines it.
    assert_eq!(
        attribute(StackKind::OnCpu, &STRIPPED_PURGE[8..]),
        ("command:memory".into(), "allocator.purge".into())
    );
    // Unnamed jemalloc code alone is allocator work.
    assert_eq!(
        attribute(
            StackKind::OnCpu,
            &["libjemalloc.so.2+0x87d3f", "zmalloc", "call"]
        ),
        ("command:unknown".into(), "allocator".into())
    );
}

#[test]
fn a_module_command_is_named_after_the_function_the_dispatcher_calls() {
    assert_eq!(
        attribute(
            StackKind::OffCpu,
            &[
                "__GI___nanosleep",
                "usleep",
                "HelloBlock_RedisCommand",
                "RedisModuleCommandDispatcher",
                "call",
                "processCommand",
                "main",
            ]
        ),
        (
            "command:module:helloblock_rediscommand".into(),
            "syscall.sleep".into()
        )
    );
}

#[test]
fn the_incident_chain_is_cron_querybuf_resize_allocator_purge() {
    assert_eq!(
        attribute(StackKind::OnCpu, QUERYBUF_PURGE),
        ("cron.querybuf_resize".into(), "allocator.purge".into())
    );
    assert_eq!(
        attribute(StackKind::OnCpu, &QUERYBUF_PURGE[6..]),
        ("cron.clients".into(), "cpu".into())
    );
    assert_eq!(
        attribute(StackKind::OnCpu, &QUERYBUF_PURGE[7..]),
        ("cron.other".into(), "cpu".into())
    );
}

#[test]
fn a_cpu_bound_command_is_its_command_on_the_cpu() {
    assert_eq!(
        attribute(StackKind::OnCpu, KEYS),
        ("command:keys".into(), "cpu".into())
    );
    assert_eq!(
        attribute(StackKind::Runqueue, KEYS),
        ("command:keys".into(), "runqueue".into())
    );
    assert_eq!(
        attribute(StackKind::OffCpu, &["aeMain", "main"]),
        ("event_loop".into(), "off_cpu".into())
    );
    assert_eq!(
        attribute(StackKind::OffCpu, &["main"]),
        ("unknown".into(), "off_cpu".into())
    );
}

#[test]
fn the_outermost_command_wins_over_commands_it_calls() {
    let eval = [
        "setCommand",
        "call",
        "luaRedisCallCommand",
        "luaV_execute",
        "evalCommand",
        "call",
        "main",
    ];
    assert_eq!(attribute(StackKind::OnCpu, &eval).0, "command:eval|eval_ro");
    // processCommand is not called by `call`: not a command of its own.
    assert_eq!(
        attribute(StackKind::OnCpu, &["processCommand", "main"]).0,
        "unknown"
    );
}

#[test]
fn the_expire_cycles_are_named_inside_the_cron_and_before_sleep() {
    // Recorded on Debian's 7.0 (the cron's caller has no symbol there).
    let slow = [
        "activeExpireCycle",
        "databasesCron",
        "serverCron",
        "redis-server+0x65048",
        "aeMain",
        "main",
    ];
    assert_eq!(
        attribute(StackKind::OnCpu, &slow),
        ("cron.expire".into(), "cpu".into())
    );
    let fast = [
        "dictNext",
        "activeExpireCycle",
        "beforeSleep",
        "aeProcessEvents",
        "aeMain",
    ];
    assert_eq!(attribute(StackKind::OnCpu, &fast).0, "before_sleep.expire");
    // The cron's own work on the databases is not an expiry.
    assert_eq!(attribute(StackKind::OnCpu, &slow[1..]).0, "cron.databases");
}

#[test]
fn a_shared_implementation_reached_by_a_tail_call_names_the_commands_that_reach_it() {
    // DEL of a big set on Debian's 7.0: delCommand's frame is gone (tail call).
    let del = [
        "_dictClear",
        "dictRelease",
        "decrRefCount",
        "dictFreeUnlinkedEntry",
        "redis-server+0x9444f",
        "delGenericCommand",
        "call",
        "processCommand",
        "aeMain",
    ];
    assert_eq!(attribute(StackKind::OnCpu, &del).0, "command:del|unlink");
    let sunion = [
        "dictNext",
        "setTypeNextObject",
        "sunionDiffGenericCommand",
        "call",
    ];
    assert_eq!(
        attribute(StackKind::OnCpu, &sunion).0,
        "command:sdiff|sdiffstore|sunion|sunionstore"
    );
    // What `call` does after the command is no command of its own.
    let after = [
        "firePostExecutionUnitJobs",
        "afterCommand",
        "call",
        "processCommand",
    ];
    assert_eq!(attribute(StackKind::OnCpu, &after).0, "command:unknown");
    // Not in the table: named after its prefix.
    let other = ["fooGenericCommand", "call", "main"];
    assert_eq!(attribute(StackKind::OnCpu, &other).0, "command:foo");
    // A command that calls the shared implementation (no tail call) is named itself.
    let direct = ["delGenericCommand", "unlinkCommand", "call"];
    assert_eq!(attribute(StackKind::OnCpu, &direct).0, "command:unlink");
}

#[test]
fn a_compiler_s_copy_of_a_function_is_that_function() {
    assert_eq!(
        without_clone_suffix("sunionDiffGenericCommand.constprop.0"),
        "sunionDiffGenericCommand"
    );
    assert_eq!(
        without_clone_suffix("zslInsertNode.isra.0.cold"),
        "zslInsertNode"
    );
    assert_eq!(without_clone_suffix("keysCommand"), "keysCommand");
    // Recorded on Valkey 8.1.
    let sunion = [
        "hashtableNext",
        "sunionDiffGenericCommand.constprop.0",
        "call",
        "processCommand",
    ];
    assert_eq!(
        attribute(StackKind::OnCpu, &sunion).0,
        "command:sdiff|sdiffstore|sunion|sunionstore"
    );
}

#[test]
fn page_faults_are_found_inside_commands() {
    let fault = [
        "clear_page_erms_[k]",
        "handle_mm_fault_[k]",
        "exc_page_fault_[k]",
        "asm_exc_page_fault_[k]",
        "_sdsnewlen",
        "dbAdd",
        "debugCommand",
        "call",
    ];
    assert_eq!(
        attribute(StackKind::OnCpu, &fault),
        ("command:debug".into(), "page_fault".into())
    );
}

#[test]
fn io_thread_hand_offs_are_named_before_the_wrappers_around_them() {
    // Redis 7.0 (Debian): the reads' hand-off is an unnamed part of the exported function.
    let reads_wait = &[
        "handleClientsWithPendingReadsUsingThreads.part",
        "beforeSleep",
        "redis-server+0x65164",
        "aeMain",
        "main",
    ];
    assert_eq!(
        attribute(StackKind::OnCpu, reads_wait),
        ("io_threads.reads".into(), "cpu".into())
    );
    // The writes' hand-off matches the `client.io` rule's `handleClientsWithPendingWrites*`
    // too: the first rule that matches a frame names it.
    let writes = &[
        "handleClientsWithPendingWritesUsingThreads",
        "beforeSleep",
        "aeMain",
        "main",
    ];
    assert_eq!(attribute(StackKind::OnCpu, writes).0, "io_threads.writes");
    // Valkey 8: a command read by an io thread, run from before-sleep, is the command's.
    let command = &[
        "setCommand",
        "call",
        "processCommand",
        "processInputBuffer",
        "processClientsCommandsBatch",
        "processIOThreadsReadDone",
        "beforeSleep",
        "aeMain",
        "main",
    ];
    assert_eq!(attribute(StackKind::OnCpu, command).0, "command:set");
    let waiting = &[
        "waitForClientIO",
        "freeClient",
        "beforeSleep",
        "aeMain",
        "main",
    ];
    assert_eq!(attribute(StackKind::OnCpu, waiting).0, "io_threads.wait");
}

#[test]
fn a_replica_s_full_sync_is_named_in_psync_and_in_the_replication_cron() {
    let in_psync = &[
        "copy_page_range_[k]",
        "dup_mmap_[k]",
        "copy_process_[k]",
        "kernel_clone_[k]",
        "_Fork",
        "fork",
        "redisFork",
        "rdbSaveBackground",
        "startBgsaveForReplication",
        "syncCommand",
        "call",
        "processCommand",
        "aeMain",
        "main",
    ];
    assert_eq!(
        attribute(StackKind::OnCpu, in_psync),
        ("command:psync|sync".into(), "fork".into())
    );
    let in_cron = &[
        "copy_page_range_[k]",
        "dup_mmap_[k]",
        "copy_process_[k]",
        "_Fork",
        "redisFork",
        "rdbSaveToSlavesSockets",
        "startBgsaveForReplication",
        "replicationStartPendingFork",
        "replicationCron",
        "serverCron",
        "processTimeEvents",
        "aeMain",
        "main",
    ];
    assert_eq!(
        attribute(StackKind::OnCpu, in_cron),
        ("replication.full_sync".into(), "fork".into())
    );
}
