# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_redis_stallprof_global_optspecs
    string join \n v/verbose h/help V/version
end

function __fish_redis_stallprof_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_redis_stallprof_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_redis_stallprof_using_subcommand
    set -l cmd (__fish_redis_stallprof_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c redis-stallprof -n "__fish_redis_stallprof_needs_command" -s v -l verbose -d 'Log more (repeat for debug output); the same as RUST_LOG=info / debug'
complete -c redis-stallprof -n "__fish_redis_stallprof_needs_command" -s h -l help -d 'Print help'
complete -c redis-stallprof -n "__fish_redis_stallprof_needs_command" -s V -l version -d 'Print version'
complete -c redis-stallprof -n "__fish_redis_stallprof_needs_command" -f -a "attach" -d 'Attach to a running Redis and report event-loop stalls until stopped'
complete -c redis-stallprof -n "__fish_redis_stallprof_needs_command" -f -a "doctor" -d 'Check that this machine and these privileges let `attach` work'
complete -c redis-stallprof -n "__fish_redis_stallprof_needs_command" -f -a "report" -d 'Render a recorded JSON-lines file again: stalls, summary, folded stacks, flamegraph'
complete -c redis-stallprof -n "__fish_redis_stallprof_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l pid -d 'Profile the process with this pid (repeat for several)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l port -d 'Profile the process listening on this TCP port (repeat for several)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l threshold -d 'An event-loop iteration at least this long is a stall (e.g. 500us, 10ms, 2s)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l interval -d 'How often to print a one-line summary of iterations on stderr' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l duration -d 'Stop by itself after this long (default: run until Ctrl-C, SIGTERM or the target exits)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l json -d 'Write JSON lines (one object per event) to PATH; `-` writes them to stdout' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l folded -d 'Write the stalls\' stacks as folded lines (flamegraph input, weights in us) at exit' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l flamegraph -d 'Write the stalls\' stacks as a flamegraph SVG at exit' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l pprof -d 'Write the stalls\' stacks as a gzipped pprof profile at exit (go tool pprof, Pyroscope, Parca)' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l html -d 'Write the HTML report to PATH at exit (see `report --html`)' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l stack-root -d 'Root the folded stacks and the flamegraph at the stack\'s kind, or at its stall\'s origin (and mechanism) first' -r -f -a "kind\t'The stack\'s kind: `[on-cpu]`, `[off-cpu]` or `[runqueue]`'
origin\t'The stall\'s origin, then the kind'
cause\t'The stall\'s origin and mechanism, then the kind'"
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l freq -d 'On-CPU sampling frequency of the event-loop thread, in Hz (default: 999, more for a short threshold so that a stall just past it is sampled)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l gate -d 'Capture stacks only once the current iteration is this old (default: half the threshold)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l min-block -d 'Times off the CPU shorter than this are only counted, not recorded with their stacks (default: 1ms, or a tenth of a shorter threshold)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l stack-bytes -d 'Bytes of user stack copied per sample (the unwinder walks only what was copied)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l alert -d 'Alert on every stall at least this long, and on an iteration still running past it' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l alert-exec -d 'With --alert: run this command for each alert, the alert JSON on its stdin (split into words like a shell would, never run by a shell)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l alert-timeout -d 'Kill an --alert-exec command still running after this long' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l alert-user -d 'Run --alert-exec commands as this user: a name (with its primary group), UID or UID:GID (default: the profiler\'s user, without any capability)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l alert-max-per-minute -d 'Run --alert-exec at most this many times a minute, all targets together; further alerts are counted' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l queue-interval -d 'How often to sample the listening sockets\' accept queues' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l fault-sample-interval -d 'At most one page-fault stack sample per this long per target (each stands for the faults since the previous one): bounds the cost when memory grows fast' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l memory-folded -d 'Write the memory growth\'s stacks as folded lines (weights in KiB) at exit' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l memory-flamegraph -d 'Write the memory growth\'s stacks as a flamegraph SVG at exit' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l metrics -d 'Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l rules -d 'Attribution rules (TOML) to use instead of the built-in ones' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l ring-buffer-kib -d 'Size of the kernel-to-userspace ring buffer in KiB (a power of two)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l clients -d 'How a command stall\'s client is found: `census` (costs nothing until a stall; several candidates when several are possible) or `exact` (a program on every `read` system call of the host)' -r -f -a "census\t'From the server\'s connections seen during the stall: the one whose request arrived just before it (several listed when several are possible); costs nothing until a stall'
exact\t'From the event-loop thread\'s last read before the command (and the command\'s name as typed): a program on every `read` system call of the host (see Cost in docs/guide.md)'"
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l probes -d 'How the scheduler and page-fault programs are attached (see Cost in docs/guide.md)' -r -f -a "per-thread\t'Perf events on the watched threads alone: other processes pay nothing per context switch, and per page fault only while a watched server takes faults (falls back to host-wide, saying so, where the kernel\'s BTF lacks the scheduler\'s accounting)'
host-wide\t'BTF tracepoints on every context switch, wake-up and page fault of the host'"
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l max-targets -d 'Targets the kernel\'s maps have room for (each costs about 22 KiB of kernel memory)' -r
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l all -d 'Profile every redis-server and valkey-server on the host, and each that starts later'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l no-wait -d 'With --all: exit with an error when no Redis runs, instead of waiting for one'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l force -d 'Profile the selected process even if it is not a redis-server or valkey-server'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l follow -d 'With one --port: when the target exits, wait for the next process listening on the port (Redis restarting) and profile it too, into the same outputs'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -l no-memory -d 'Do not trace page faults (no `memory` records)'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -s v -l verbose -d 'Log more (repeat for debug output); the same as RUST_LOG=info / debug'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand attach" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand doctor" -s v -l verbose -d 'Log more (repeat for debug output); the same as RUST_LOG=info / debug'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand doctor" -s h -l help -d 'Print help'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand report" -l folded -d 'Write the folded stacks to PATH (default: stdout)' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand report" -l flamegraph -d 'Write a flamegraph SVG to PATH' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand report" -l pprof -d 'Write a gzipped pprof profile to PATH' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand report" -l html -d 'Write the HTML report to PATH: one self-contained page (timeline, causes with advice, the heaviest stalls\' flamegraphs, memory, connections, overflows, lost events)' -r -F
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand report" -l stack-root -d 'Root the folded stacks and the flamegraph at the stack\'s kind, or at its stall\'s origin (and mechanism) first' -r -f -a "kind\t'The stack\'s kind: `[on-cpu]`, `[off-cpu]` or `[runqueue]`'
origin\t'The stall\'s origin, then the kind'
cause\t'The stall\'s origin and mechanism, then the kind'"
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand report" -s v -l verbose -d 'Log more (repeat for debug output); the same as RUST_LOG=info / debug'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand report" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand help; and not __fish_seen_subcommand_from attach doctor report help" -f -a "attach" -d 'Attach to a running Redis and report event-loop stalls until stopped'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand help; and not __fish_seen_subcommand_from attach doctor report help" -f -a "doctor" -d 'Check that this machine and these privileges let `attach` work'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand help; and not __fish_seen_subcommand_from attach doctor report help" -f -a "report" -d 'Render a recorded JSON-lines file again: stalls, summary, folded stacks, flamegraph'
complete -c redis-stallprof -n "__fish_redis_stallprof_using_subcommand help; and not __fish_seen_subcommand_from attach doctor report help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
