//! Connections to the target's listening ports: each one entering an accept queue (its
//! handshake completed), each one the target takes off a queue (`accept`/`accept4`), and each
//! one closing.
use aya_ebpf::{
    helpers::generated::bpf_probe_read_kernel, macros::tracepoint, programs::TracePointContext,
};
use aya_log_ebpf::debug;
use profiler_common::{
    AcceptEvent, ConnectionEvent, Counter, EVENT_KIND_ACCEPT, EVENT_KIND_CONNECTION,
    EVENT_KIND_CONNECTION_CLOSED, ListenKey,
};

use super::{
    ACCEPT_IN_FLIGHT, LISTEN_PORTS, count, current_loop_thread, current_target, loop_state, now_ns,
    send, settings,
};

const IPPROTO_TCP: u16 = 6;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
const AF_INET: u16 = 2;

/// Offsets in `events/sock/inet_sock_set_state/format`.
mod set_state {
    /// `skaddr`: the socket.
    pub const SOCKET: usize = 8;
    pub const OLD_STATE: usize = 16;
    pub const NEW_STATE: usize = 20;
    /// `sport`: the listener's port, on the server side of the connection.
    pub const PORT: usize = 24;
    /// `dport`: the client's port.
    pub const CLIENT_PORT: usize = 26;
    pub const FAMILY: usize = 28;
    pub const PROTOCOL: usize = 30;
    /// `daddr[4]`: the client's IPv4 address.
    pub const CLIENT_ADDR_V4: usize = 36;
    /// `daddr_v6[16]`: the client's IPv6 address.
    pub const CLIENT_ADDR_V6: usize = 56;
}
/// Offset of `int fd` (8 bytes wide) in `events/syscalls/sys_enter_accept4/format` (and
/// `sys_enter_accept`).
const ACCEPT_FD_OFFSET: usize = 16;
/// Offset of `long ret` in `events/syscalls/sys_exit_accept4/format` (and `sys_exit_accept`).
const ACCEPT_RET_OFFSET: usize = 16;

/// `sock:inet_sock_set_state`: a connection to one of the target's ports completed its
/// handshake (SYN_RECV -> ESTABLISHED) and entered the accept queue, or one closed (any
/// state of an accepted connection -> CLOSE). Fires in softirq context, so it filters on the
/// port, not the process.
#[tracepoint]
pub fn connection_state(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets of fields of the tracepoint's record (see `set_state`).
    let (old_state, new_state, port, family, protocol) = unsafe {
        (
            ctx.read_at::<i32>(set_state::OLD_STATE).unwrap_or(0),
            ctx.read_at::<i32>(set_state::NEW_STATE).unwrap_or(0),
            ctx.read_at::<u16>(set_state::PORT).unwrap_or(0),
            ctx.read_at::<u16>(set_state::FAMILY).unwrap_or(0),
            ctx.read_at::<u16>(set_state::PROTOCOL).unwrap_or(0),
        )
    };
    let kind = match (old_state, new_state) {
        (TCP_SYN_RECV, TCP_ESTABLISHED) => EVENT_KIND_CONNECTION,
        // A listener closing, or a connection the target opened itself (its source port is
        // not a listener's), is not a client's.
        (TCP_LISTEN | TCP_SYN_SENT, _) => return 0,
        (_, TCP_CLOSE) => EVENT_KIND_CONNECTION_CLOSED,
        _ => return 0,
    };
    if protocol != IPPROTO_TCP {
        return 0;
    }
    let key = ListenKey {
        // SAFETY: offset of a field of the tracepoint's record (see `set_state`).
        netns: network_namespace(unsafe { ctx.read_at::<u64>(set_state::SOCKET) }.unwrap_or(0)),
        port,
        _padding: 0,
    };
    // SAFETY: a lookup by value in a map of plain data.
    let Some(slot) = (unsafe { LISTEN_PORTS.get(&key) }).copied() else {
        return 0;
    };
    let Some(settings) = settings(slot) else {
        return 0;
    };
    let mut client_addr = [0u8; 16];
    // SAFETY: offsets of fields of the tracepoint's record (see `set_state`).
    unsafe {
        if family == AF_INET {
            client_addr[..4].copy_from_slice(
                &ctx.read_at::<[u8; 4]>(set_state::CLIENT_ADDR_V4)
                    .unwrap_or([0; 4]),
            );
        } else {
            client_addr = ctx
                .read_at::<[u8; 16]>(set_state::CLIENT_ADDR_V6)
                .unwrap_or([0; 16]);
        }
    }
    let event = ConnectionEvent {
        kind,
        port,
        family,
        time_ns: now_ns(),
        // SAFETY: offset of a field of the tracepoint's record (see `set_state`).
        client_port: unsafe { ctx.read_at::<u16>(set_state::CLIENT_PORT) }.unwrap_or(0),
        _padding: 0,
        pid: settings.pid,
        client_addr,
    };
    send(&event, slot, Counter::ConnectionEventsLost);
    0
}

/// The inode number of the network namespace of the socket at `socket` (a `struct sock`):
/// two reads at the offsets userspace found in the kernel's BTF; 0 when they are unknown or
/// a read fails.
#[inline(always)]
fn network_namespace(socket: u64) -> u32 {
    let (net_offset, inum_offset) = (global!(SOCK_NET_OFFSET), global!(NET_INUM_OFFSET));
    if net_offset == 0 || socket == 0 {
        return 0;
    }
    let mut net: u64 = 0;
    let mut inum: u32 = 0;
    // SAFETY: kernel reads by a helper that fails instead of faulting, into our own locals.
    unsafe {
        if bpf_probe_read_kernel(
            (&raw mut net).cast(),
            8,
            (socket + u64::from(net_offset)) as *const core::ffi::c_void,
        ) != 0
            || net == 0
            || bpf_probe_read_kernel(
                (&raw mut inum).cast(),
                4,
                (net + u64::from(inum_offset)) as *const core::ffi::c_void,
            ) != 0
        {
            return 0;
        }
    }
    inum
}

/// `sys_enter_accept4` / `sys_enter_accept`: remember the listening socket.
#[tracepoint]
pub fn accept_entry(ctx: TracePointContext) -> u32 {
    let Some((target, tid)) = current_target() else {
        return 0;
    };
    // SAFETY: offset of a field of the tracepoint's record (see the constant).
    let listen_fd = unsafe { ctx.read_at::<i64>(ACCEPT_FD_OFFSET) }.unwrap_or(-1);
    if ACCEPT_IN_FLIGHT.insert(&tid, &listen_fd, 0).is_err() {
        count(target.slot, Counter::AcceptsUntracked);
        debug!(
            &ctx,
            "accept of thread {} not followed: the calls in flight fill their table", tid
        );
    }
    0
}

/// `sys_exit_accept4` / `sys_exit_accept`: the target took a connection off the queue.
#[tracepoint]
pub fn accept_return(ctx: TracePointContext) -> u32 {
    let Some((target, tid)) = current_target() else {
        return 0;
    };
    // SAFETY: a plain value copied out before the entry is removed.
    let Some(listen_fd) = (unsafe { ACCEPT_IN_FLIGHT.get(&tid) }).copied() else {
        return 0;
    };
    let _ = ACCEPT_IN_FLIGHT.remove(&tid);
    // SAFETY: offset of a field of the tracepoint's record (see the constant).
    let result = unsafe { ctx.read_at::<i64>(ACCEPT_RET_OFFSET) }.unwrap_or(-1);
    if result < 0 {
        return 0;
    }
    let event = AcceptEvent {
        kind: EVENT_KIND_ACCEPT,
        tid,
        time_ns: now_ns(),
        listen_fd,
        result,
        pid: target.settings.pid,
        _padding: 0,
    };
    send(&event, target.slot, Counter::ConnectionEventsLost);
    0
}

/// Offsets of `unsigned int fd` (8 bytes wide) and `char *buf` in
/// `events/syscalls/sys_enter_read/format`.
const READ_FD_OFFSET: usize = 16;
const READ_BUFFER_OFFSET: usize = 24;

/// `sys_enter_read`, attached with `--clients exact` only (it runs for every `read` of every
/// process on the host): the event-loop thread's last read, so that the samples of a command
/// tell whose request it was and what it said.
#[tracepoint]
pub fn read_entry(ctx: TracePointContext) -> u32 {
    let Some(state) = current_loop_thread().and_then(|target| loop_state(target.slot)) else {
        return 0;
    };
    // SAFETY: offsets of fields of the tracepoint's record (see the constants).
    let (fd, buffer) = unsafe {
        (
            ctx.read_at::<u64>(READ_FD_OFFSET).unwrap_or(u64::MAX),
            ctx.read_at::<u64>(READ_BUFFER_OFFSET).unwrap_or(0),
        )
    };
    state.read_fd = fd.wrapping_add(1) & u64::from(u32::MAX);
    state.read_buffer = buffer;
    0
}
