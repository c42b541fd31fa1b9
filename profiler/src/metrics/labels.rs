//! The label sets of the metrics: every series carries its instance's.
use prometheus_client::encoding::EncodeLabelSet;

use crate::output::record::Instance;

/// The instance every metric is of.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct InstanceLabels {
    pub(super) pid: String,
    /// Its lowest listening port ("" without one).
    pub(super) port: String,
    /// `redis-server` or `valkey-server`.
    pub(super) server: String,
}

impl InstanceLabels {
    pub(super) fn of(instance: &Instance) -> Self {
        Self {
            pid: instance.pid.to_string(),
            port: instance
                .port
                .map(|port| port.to_string())
                .unwrap_or_default(),
            server: instance.name.clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CauseLabels {
    #[prometheus(flatten)]
    pub(super) instance: InstanceLabels,
    pub(super) origin: String,
    pub(super) mechanism: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PortLabels {
    #[prometheus(flatten)]
    pub(super) instance: InstanceLabels,
    pub(super) listen_port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct MadviseLabels {
    #[prometheus(flatten)]
    pub(super) instance: InstanceLabels,
    pub(super) thread_role: String,
    pub(super) advice: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ClientLabels {
    #[prometheus(flatten)]
    pub(super) instance: InstanceLabels,
    /// A client address among the top ones, or `other`.
    pub(super) client: String,
}
