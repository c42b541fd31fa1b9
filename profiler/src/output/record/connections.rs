//! The `connections` record: a census of the clients connected to the target's listeners,
//! per client address.
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::Instance;
use crate::clock::rfc3339;

/// The target's client connections at one moment, and those opened and closed since the last
/// census.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionCensus {
    #[serde(default)]
    pub instance: Instance,
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// Seconds since the last census.
    pub seconds: f64,
    /// Established connections to the target's listeners now.
    pub established: u64,
    /// Connections opened (handshake completed) and closed since the last census.
    pub opened: u64,
    pub closed: u64,
    /// Client addresses with an established connection now.
    pub addresses: u64,
    /// The top addresses: most established connections first, then most opened.
    pub clients: Vec<ClientCensus>,
}

impl Default for ConnectionCensus {
    fn default() -> Self {
        Self {
            instance: Instance::default(),
            time: SystemTime::UNIX_EPOCH,
            seconds: 0.0,
            established: 0,
            opened: 0,
            closed: 0,
            addresses: 0,
            clients: Vec::new(),
        }
    }
}

/// The connections of one client address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientCensus {
    pub addr: String,
    pub established: u64,
    pub opened: u64,
    pub closed: u64,
    /// Bytes received from it since the last census, over the connections established now.
    pub received_bytes: u64,
    /// How long its established connections have been idle (since data was last received),
    /// in milliseconds.
    pub idle_ms: IdleTimes,
}

/// Idle times of a set of connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleTimes {
    pub min: u64,
    pub p50: u64,
    pub max: u64,
}

/// The census over a run (in the summary).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionTotals {
    /// Connections opened and closed during the run.
    pub opened: u64,
    pub closed: u64,
    /// The most connections established at one census.
    pub max_established: u64,
    /// Per address: opens, closes and bytes received over the run; established and idle at
    /// the last census. An address that came after the run had seen too many is counted
    /// under `other`.
    pub clients: Vec<ClientCensus>,
    /// Opens, closes and receptions counted under `other` because the run already kept as
    /// many addresses as it keeps.
    #[serde(default)]
    pub addresses_folded: u64,
}
