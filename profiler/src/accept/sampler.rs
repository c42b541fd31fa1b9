//! The targets' listening sockets sampled with netlink sock_diag, in each target's own network
//! namespace: each listener's accept queue, its limit and its drop counter, and the
//! connections of its clients (address, idle time, bytes received) for the census. The targets
//! of one namespace share its socket and its listener dumps (one per tick, not one per target).
use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    fs, io,
    net::IpAddr,
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    rc::{Rc, Weak},
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::target::socket_inodes;

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("cannot enter the network namespace of process {pid} (`/proc/{pid}/ns/net`)")]
    Namespace {
        pid: u32,
        #[source]
        cause: io::Error,
    },
    #[error("cannot ask the kernel for socket diagnostics (netlink sock_diag)")]
    Netlink {
        #[source]
        cause: io::Error,
    },
}

/// One listening socket at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerSample {
    /// The socket's inode: a port often has two listeners (IPv4 and IPv6).
    pub inode: u64,
    pub port: u16,
    /// Connections waiting in the accept queue.
    pub queue: u32,
    /// The queue's limit (the listen backlog).
    pub limit: u32,
    /// The listener's drop counter (connections dropped with the queue full, among others).
    pub drops: u64,
}

/// One connection to a listener, at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionSample {
    /// The socket's inode (it names the connection while it lives).
    pub inode: u64,
    /// The client's address and port.
    pub client: IpAddr,
    pub client_port: u16,
    /// Bytes received and not yet read by the server (`idiag_rqueue`).
    pub queued_bytes: u32,
    /// Time since data was last received from the client (`tcpi_last_data_recv`), in ms.
    pub idle_ms: Option<u32>,
    /// Bytes received from the client so far (`tcpi_bytes_received`).
    pub received_bytes: Option<u64>,
}

/// How old a namespace's dump may be to serve another target's sample: the targets sample one
/// after the other at each tick, microseconds apart.
const DUMP_REUSE: Duration = Duration::from_millis(1);

/// A sock_diag socket in one network namespace, shared by the targets in it: one dump of its
/// listeners serves every target that samples within [`DUMP_REUSE`].
pub struct NamespaceSampler {
    socket: Socket,
    /// The last dump: when, and every listener of the namespace (its port in `inode`'s place
    /// of [`ListenerSample`]).
    last: Option<(Instant, Vec<ListenerSample>)>,
}

impl NamespaceSampler {
    /// Opens a sock_diag socket in the network namespace of `pid` (a socket keeps the namespace
    /// it was created in; `setns` moves only the short-lived thread that creates it).
    fn open(pid: u32) -> Result<Self, AcceptError> {
        let namespace = fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|cause| AcceptError::Namespace { pid, cause })?;
        let socket = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this thread alone, with a namespace fd we own.
                    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(AcceptError::Namespace {
                            pid,
                            cause: io::Error::last_os_error(),
                        });
                    }
                    let mut socket = Socket::new(NETLINK_SOCK_DIAG)
                        .map_err(|cause| AcceptError::Netlink { cause })?;
                    socket
                        .bind_auto()
                        .map_err(|cause| AcceptError::Netlink { cause })?;
                    socket
                        .connect(&SocketAddr::new(0, 0))
                        .map_err(|cause| AcceptError::Netlink { cause })?;
                    Ok(socket)
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(AcceptError::Netlink {
                        cause: io::Error::other("the namespace thread failed"),
                    })
                })
        })?;
        Ok(Self { socket, last: None })
    }

    /// Every TCP listener of the namespace now (a dump at most [`DUMP_REUSE`] old).
    fn listeners(&mut self) -> Result<&[ListenerSample], AcceptError> {
        let fresh = self
            .last
            .as_ref()
            .is_some_and(|(taken, _)| taken.elapsed() < DUMP_REUSE);
        if !fresh {
            let mut listeners = Vec::new();
            self.dump(
                StateFlags::LISTEN,
                ExtensionFlags::SKMEMINFO,
                ANY_PORT,
                |response| {
                    let drops = response.nlas.iter().find_map(|nla| match nla {
                        Nla::MemInfo(info) => Some(u64::from(info.drops)),
                        _ => None,
                    });
                    listeners.push(ListenerSample {
                        inode: u64::from(response.header.inode),
                        port: response.header.socket_id.source_port,
                        queue: response.header.recv_queue,
                        limit: response.header.send_queue,
                        drops: drops.unwrap_or(0),
                    });
                },
            )?;
            self.last = Some((Instant::now(), listeners));
        }
        Ok(self.last.as_ref().map_or(&[], |(_, listeners)| listeners))
    }

    /// The namespace's connections whose local port is one of `ports` (the clients of those
    /// listeners), with their `tcp_info`.
    fn connections(&mut self, ports: &HashSet<u16>) -> Result<Vec<ConnectionSample>, AcceptError> {
        let mut connections = Vec::new();
        let states = StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT;
        for &port in ports {
            self.connections_of_port(port, states.clone(), &mut connections)?;
        }
        Ok(connections)
    }

    /// Adds the namespace's connections of local `port` in `states` to `connections` (the
    /// kernel leaves the host's other sockets out of the dump).
    fn connections_of_port(
        &mut self,
        port: u16,
        states: StateFlags,
        connections: &mut Vec<ConnectionSample>,
    ) -> Result<(), AcceptError> {
        self.dump(states, ExtensionFlags::INFO, port, |response| {
            let id = &response.header.socket_id;
            if id.source_port != port {
                return;
            }
            let info = response.nlas.iter().find_map(|nla| match nla {
                Nla::TcpInfo(bytes) => Some(bytes.as_slice()),
                _ => None,
            });
            connections.push(ConnectionSample {
                inode: u64::from(response.header.inode),
                client: id.destination_address,
                client_port: id.destination_port,
                queued_bytes: response.header.recv_queue,
                idle_ms: info.and_then(|info| tcp_info_field::<u32>(info, TCPI_LAST_DATA_RECV)),
                received_bytes: info
                    .and_then(|info| tcp_info_field::<u64>(info, TCPI_BYTES_RECEIVED)),
            });
        })
    }

    /// Dumps the namespace's TCP sockets in `states` (IPv4, then IPv6) with `extensions` and
    /// local port `local_port` ([`ANY_PORT`]: all), handing each to `each`.
    fn dump(
        &mut self,
        states: StateFlags,
        extensions: ExtensionFlags,
        local_port: u16,
        mut each: impl FnMut(&InetResponse),
    ) -> Result<(), AcceptError> {
        for family in [AF_INET, AF_INET6] {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            let mut socket_id = if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            };
            // The kernel skips sockets of another local port when this is not zero.
            socket_id.source_port = local_port;
            let request = InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: extensions.clone(),
                states: states.clone(),
                socket_id,
            };
            let mut packet =
                NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
            packet.finalize();
            let mut buffer = vec![0; packet.buffer_len()];
            packet.serialize(&mut buffer);
            self.socket
                .send(&buffer, 0)
                .map_err(|cause| AcceptError::Netlink { cause })?;
            let mut received = Vec::with_capacity(64 * 1024);
            loop {
                received.clear();
                self.socket
                    .recv(&mut received, 0)
                    .map_err(|cause| AcceptError::Netlink { cause })?;
                if read_responses(&received, &mut each)? {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// A dump's local port that stands for every port.
const ANY_PORT: u16 = 0;

/// Offset of `__u32 tcpi_last_data_recv` (ms) in `struct tcp_info` (`include/uapi/linux/tcp.h`).
const TCPI_LAST_DATA_RECV: usize = 52;
/// Offset of `__u64 tcpi_bytes_received` in `struct tcp_info` (Linux 4.1 and later).
const TCPI_BYTES_RECEIVED: usize = 128;

/// A field of a `struct tcp_info` as the kernel sent it (`None` if it is too short).
fn tcp_info_field<T: FromLeBytes>(info: &[u8], offset: usize) -> Option<T> {
    info.get(offset..offset + size_of::<T>()).map(T::from_le)
}

/// An integer from its little-endian bytes.
trait FromLeBytes: Sized {
    fn from_le(bytes: &[u8]) -> Self;
}

impl FromLeBytes for u32 {
    fn from_le(bytes: &[u8]) -> Self {
        u32::from_le_bytes(bytes.try_into().unwrap_or_default())
    }
}

impl FromLeBytes for u64 {
    fn from_le(bytes: &[u8]) -> Self {
        u64::from_le_bytes(bytes.try_into().unwrap_or_default())
    }
}

/// Reads one batch of sock_diag answers, handing each socket to `each`; returns whether the
/// dump is done.
fn read_responses(
    received: &[u8],
    each: &mut impl FnMut(&InetResponse),
) -> Result<bool, AcceptError> {
    let mut offset = 0;
    while offset < received.len() {
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(&received[offset..]).map_err(
            |error| AcceptError::Netlink {
                cause: io::Error::other(error.to_string()),
            },
        )?;
        let length = message.header.length as usize;
        match message.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                each(&response);
            }
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(error) => {
                return Err(AcceptError::Netlink {
                    cause: io::Error::other(format!("{error:?}")),
                });
            }
            _ => {}
        }
        if length == 0 {
            break;
        }
        offset += length;
    }
    Ok(false)
}

/// The run's namespace samplers, by network namespace (the inode of `/proc/PID/ns/net`): the
/// targets in one namespace share one. Held weakly: a namespace's socket (which keeps the
/// namespace alive) closes with the last target in it, as a pod's goes when the pod does.
#[derive(Default, Clone)]
pub struct NamespaceSamplers(Rc<RefCell<HashMap<u64, Weak<RefCell<NamespaceSampler>>>>>);

impl NamespaceSamplers {
    /// The sampler of `pid`'s network namespace (opened if no target in it has one).
    fn of_process(&self, pid: u32) -> Result<Rc<RefCell<NamespaceSampler>>, AcceptError> {
        let namespace = fs::metadata(format!("/proc/{pid}/ns/net"))
            .map_err(|cause| AcceptError::Namespace { pid, cause })?
            .ino();
        let mut samplers = self.0.borrow_mut();
        samplers.retain(|_, sampler| sampler.strong_count() > 0);
        if let Some(sampler) = samplers.get(&namespace).and_then(Weak::upgrade) {
            return Ok(sampler);
        }
        let sampler = Rc::new(RefCell::new(NamespaceSampler::open(pid)?));
        samplers.insert(namespace, Rc::downgrade(&sampler));
        Ok(sampler)
    }

    /// Namespaces with a sampler open now.
    #[cfg(test)]
    fn open_namespaces(&self) -> usize {
        self.0
            .borrow()
            .values()
            .filter(|sampler| sampler.strong_count() > 0)
            .count()
    }
}

/// Asks sock_diag about one target's listeners, in the target's network namespace.
pub struct QueueSampler {
    pid: u32,
    namespace: Rc<RefCell<NamespaceSampler>>,
    /// The target's listening sockets: inode -> port.
    listeners: HashMap<u64, u16>,
}

impl QueueSampler {
    /// The sampler of process `pid`'s listeners, sharing `samplers`' one of its namespace.
    pub fn open(pid: u32, samplers: &NamespaceSamplers) -> Result<Self, AcceptError> {
        let mut sampler = Self {
            pid,
            namespace: samplers.of_process(pid)?,
            listeners: HashMap::new(),
        };
        sampler.refresh_listeners();
        Ok(sampler)
    }

    /// Re-reads which sockets the target listens on (listeners come and go): the namespace's
    /// listeners that are among the target's open files.
    pub fn refresh_listeners(&mut self) {
        let sockets: HashSet<u64> = socket_inodes(self.pid).into_iter().collect();
        if let Ok(listeners) = self.namespace.borrow_mut().listeners() {
            self.listeners = listeners
                .iter()
                .filter(|listener| sockets.contains(&listener.inode))
                .map(|listener| (listener.inode, listener.port))
                .collect();
        }
    }

    pub fn has_listeners(&self) -> bool {
        !self.listeners.is_empty()
    }

    /// The target's listening sockets: inode -> port.
    pub fn listeners(&self) -> &HashMap<u64, u16> {
        &self.listeners
    }

    /// The connections to the target's listeners now.
    pub fn connections(&mut self) -> Result<Vec<ConnectionSample>, AcceptError> {
        let ports: HashSet<u16> = self.listeners.values().copied().collect();
        if ports.is_empty() {
            return Ok(Vec::new());
        }
        self.namespace.borrow_mut().connections(&ports)
    }

    /// The target's listeners now.
    pub fn sample(&mut self) -> Result<Vec<ListenerSample>, AcceptError> {
        let mut namespace = self.namespace.borrow_mut();
        Ok(namespace
            .listeners()?
            .iter()
            .filter(|listener| self.listeners.contains_key(&listener.inode))
            .copied()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_s_socket_closes_with_its_last_target() {
        let samplers = NamespaceSamplers::default();
        let first = QueueSampler::open(std::process::id(), &samplers).unwrap();
        let second = QueueSampler::open(std::process::id(), &samplers).unwrap();
        assert!(
            Rc::ptr_eq(&first.namespace, &second.namespace),
            "one per namespace"
        );
        drop(first);
        assert_eq!(samplers.open_namespaces(), 1);
        drop(second);
        assert_eq!(samplers.open_namespaces(), 0);
    }

    #[test]
    fn our_own_listener_is_sampled_with_its_queue_and_limit() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _waiting = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut sampler =
            QueueSampler::open(std::process::id(), &NamespaceSamplers::default()).unwrap();
        let samples = sampler.sample().unwrap();
        let ours = samples
            .iter()
            .find(|s| s.port == port)
            .expect("our listener");
        assert_eq!(ours.queue, 1, "one connection waits to be accepted");
        assert!(ours.limit >= 128, "std's backlog: {ours:?}");
    }
}
