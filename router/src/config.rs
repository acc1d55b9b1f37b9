//! The router's configuration: one validated serde tree; unknown fields are rejected.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How an address moves messages (design.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressType {
    Anycast,
    Multicast,
    Queue,
    Topic,
    Subscription,
}

impl AddressType {
    pub fn as_str(self) -> &'static str {
        match self {
            AddressType::Anycast => "anycast",
            AddressType::Multicast => "multicast",
            AddressType::Queue => "queue",
            AddressType::Topic => "topic",
            AddressType::Subscription => "subscription",
        }
    }
    /// Store-and-forward types are served by broker shards.
    pub fn is_brokered(self) -> bool {
        matches!(
            self,
            AddressType::Queue | AddressType::Topic | AddressType::Subscription
        )
    }
}

/// One address declaration: exactly one of `name`, `prefix` or `pattern`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressDecl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(rename = "type")]
    pub kind: AddressType,
    /// Queue policy: where rejected messages and those out of attempts go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// Queue policy: deliveries before a message that keeps failing is dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delivery_attempts: Option<u32>,
    /// Queue policy: upper bound on any message's time to live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl_ms: Option<u64>,
    /// Queue: false keeps its messages in memory only (accepted without a disk write, lost on
    /// restart, bounded); default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<bool>,
    /// Queue policy: where expired messages go (dropped when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_address: Option<String>,
    /// Subscription addresses: the topic filter the named subscription collects from
    /// (`/`-separated levels, `*` one level, `#` any number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

impl AddressDecl {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = [&self.name, &self.prefix, &self.pattern]
            .iter()
            .filter(|x| x.is_some())
            .count();
        if n != 1 {
            return Err(ConfigError::Invalid(
                "an address needs exactly one of name, prefix, pattern".into(),
            ));
        }
        let s = self
            .name
            .as_deref()
            .or(self.prefix.as_deref())
            .or(self.pattern.as_deref())
            .unwrap_or_default();
        let policy = self.dead_letter.is_some()
            || self.max_delivery_attempts.is_some()
            || self.max_ttl_ms.is_some()
            || self.expiry_address.is_some()
            || self.durable.is_some();
        if policy && self.kind != AddressType::Queue {
            return Err(ConfigError::Invalid(format!(
                "{s}: durable, dead_letter, max_delivery_attempts, max_ttl_ms and expiry_address apply to queues only"
            )));
        }
        match (self.kind, &self.topic, &self.name) {
            (AddressType::Subscription, Some(t), Some(_)) if !t.is_empty() && t.len() <= 1024 => {}
            (AddressType::Subscription, _, _) => {
                return Err(ConfigError::Invalid(format!(
                    "{s}: a subscription address needs a name and a topic filter (1 to 1024 characters)"
                )));
            }
            (_, Some(_), _) => {
                return Err(ConfigError::Invalid(format!(
                    "{s}: topic applies to subscription addresses only"
                )));
            }
            _ => {}
        }
        if s.is_empty() || s.len() > 1024 {
            return Err(ConfigError::Invalid(
                "address must be 1 to 1024 characters".into(),
            ));
        }
        Ok(())
    }
    /// The declared string, whichever kind it is.
    pub fn key(&self) -> &str {
        self.name
            .as_deref()
            .or(self.prefix.as_deref())
            .or(self.pattern.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    pub max_sessions_per_connection: u16,
    pub max_links_per_connection: usize,
    pub max_message_size: u64,
    pub link_capacity: u32,
    pub max_frame_size: u32,
    pub idle_timeout_ms: u32,
    /// Unsettled deliveries a consumer link may hold; beyond it the router waits for outcomes
    /// whatever credit the consumer grants.
    pub max_unsettled_per_link: u32,
    /// Bytes of messages that may wait in the router per connection, in each direction: a
    /// producer connection is not read past it, a consumer connection is not given more.
    pub connection_buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_sessions_per_connection: 64,
            max_links_per_connection: 5_000,
            max_message_size: 100 * 1024 * 1024,
            link_capacity: 250,
            max_frame_size: 65_536,
            idle_timeout_ms: 60_000,
            max_unsettled_per_link: 5_000,
            connection_buffer_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSection {
    pub id: String,
    pub listen: SocketAddr,
    pub http: SocketAddr,
    pub default_address_type: AddressType,
    pub limits: Limits,
    /// SASL PLAIN users (name → password). Empty: any login and ANONYMOUS are accepted.
    pub users: std::collections::BTreeMap<String, String>,
}

impl Default for RouterSection {
    fn default() -> Self {
        RouterSection {
            id: "standalone".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 5672)),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            default_address_type: AddressType::Anycast,
            limits: Limits::default(),
            users: Default::default(),
        }
    }
}

/// One broker of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterBroker {
    /// host:port where its peers reach it for Raft.
    pub raft: String,
    /// host:port where routers reach it.
    pub client: String,
}

/// Brokers with replicated shards. Every broker and router of a cluster gets the same
/// `shards`, `replicas` and `brokers`; a broker also gets its own `node_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This broker's id (`enmesh broker` only; a key of `brokers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    /// A broker added to a running cluster: on its first start it hosts no replica until
    /// `enmesh cluster move|drain` gives it some (`enmesh broker` only).
    #[serde(default)]
    pub join: bool,
    /// Hand each shard's leadership to its preferred voter, so that leaders spread over the
    /// brokers (`enmesh broker` only; default true).
    #[serde(default = "default_true")]
    pub balance_leaders: bool,
    pub shards: u32,
    /// Replicas per shard (1, 3 or 5).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    pub brokers: std::collections::BTreeMap<u64, ClusterBroker>,
}

fn default_replicas() -> usize {
    3
}

fn default_true() -> bool {
    true
}

impl ClusterSection {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.is_empty() {
            return Err(ConfigError::Invalid(
                "broker.cluster.brokers is empty".into(),
            ));
        }
        if !(1..=1024).contains(&self.shards) {
            return Err(ConfigError::Invalid(
                "broker.cluster.shards must be 1 to 1024".into(),
            ));
        }
        if ![1, 3, 5].contains(&self.replicas) || self.replicas > self.brokers.len() {
            return Err(ConfigError::Invalid(
                "broker.cluster.replicas must be 1, 3 or 5 and at most the number of brokers"
                    .into(),
            ));
        }
        if let Some(id) = self.node_id.filter(|id| !self.brokers.contains_key(id)) {
            return Err(ConfigError::Invalid(format!(
                "broker.cluster.node_id {id} is not one of the brokers"
            )));
        }
        Ok(())
    }

    pub fn spec(&self) -> broker::cluster::ClusterSpec {
        broker::cluster::ClusterSpec {
            brokers: self
                .brokers
                .iter()
                .map(|(id, b)| {
                    (
                        *id,
                        broker::cluster::BrokerAddrs {
                            raft: b.raft.clone(),
                            client: b.client.clone(),
                        },
                    )
                })
                .collect(),
            shards: self.shards,
            replicas: self.replicas,
        }
    }
}

/// The broker shard a standalone process runs beside its router.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    /// Where the shard keeps its log. None: no broker (queue, topic and subscription addresses
    /// are refused).
    pub data_dir: Option<std::path::PathBuf>,
    /// A remote broker (`enmesh broker`) this router forwards brokered addresses to, as
    /// host:port; instead of `data_dir`.
    pub url: Option<String>,
    /// Where `enmesh broker` listens for routers.
    pub listen: SocketAddr,
    /// A cluster of brokers with replicated shards (routers and brokers both read it).
    pub cluster: Option<ClusterSection>,
    /// Explicit placement: address → shard number (otherwise a stable hash of the address).
    pub placement: std::collections::BTreeMap<String, usize>,
    /// This node's id in the shard's Raft group.
    pub node_id: u64,
    /// Log entries between snapshots of the shard state (a restart replays at most this many).
    pub snapshot_every: u64,
    /// Log segment size in bytes (compaction deletes whole segments).
    pub segment_bytes: u64,
}

impl Default for BrokerSection {
    fn default() -> Self {
        let node = broker::node::NodeOptions::default();
        BrokerSection {
            data_dir: None,
            url: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 5800)),
            cluster: None,
            placement: Default::default(),
            node_id: 1,
            snapshot_every: node.snapshot_every,
            segment_bytes: node.segment_bytes,
        }
    }
}

impl BrokerSection {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let shards = self.cluster.as_ref().map_or(1, |c| c.shards as usize);
        if let Some((a, s)) = self.placement.iter().find(|(_, s)| **s >= shards) {
            return Err(ConfigError::Invalid(format!(
                "broker.placement: {a} is placed on shard {s}, but there are {shards}"
            )));
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
            if self.url.is_some() {
                return Err(ConfigError::Invalid(
                    "broker.url and broker.cluster exclude each other".into(),
                ));
            }
        }
        if self.url.is_some() && self.data_dir.is_some() {
            return Err(ConfigError::Invalid(
                "broker.url and broker.data_dir exclude each other (a remote broker or a local shard)"
                    .into(),
            ));
        }
        if self.snapshot_every == 0 {
            return Err(ConfigError::Invalid(
                "broker.snapshot_every must be at least 1".into(),
            ));
        }
        if !(4096..=1 << 32).contains(&self.segment_bytes) {
            return Err(ConfigError::Invalid(
                "broker.segment_bytes must be between 4096 and 4294967296".into(),
            ));
        }
        Ok(())
    }

    pub fn node_options(&self) -> broker::node::NodeOptions {
        broker::node::NodeOptions {
            segment_bytes: self.segment_bytes,
            snapshot_every: self.snapshot_every,
        }
    }
}

/// The MQTT gateway (`enmesh mqtt-gateway`, and `enmesh standalone`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// Where the gateway listens for MQTT (standalone: default 127.0.0.1:1883; `--mqtt`
    /// overrides; `enmesh mqtt-gateway`: `--listen` overrides).
    pub listen: SocketAddr,
    /// MQTT over WebSocket (subprotocol `mqtt`), if set (standalone: `--mqtt-ws` overrides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws_listen: Option<SocketAddr>,
    /// Standalone: whether to run the gateway at all.
    pub enabled: bool,
    /// The router the gateway connects to (`enmesh mqtt-gateway`; standalone uses its own).
    pub router: String,
    /// That router's management HTTP address, where persistent sessions are found
    /// (`enmesh mqtt-gateway`; standalone uses its own).
    pub router_http: String,
    /// Enmesh address prefix of MQTT topics (standalone declares it a topic address).
    pub topic_prefix: String,
    pub max_packet_size: u32,
    pub max_connections: usize,
    /// Unacknowledged QoS 1/2 messages per subscription towards a device.
    pub inflight: u16,
    /// PUBLISHes per second per connection (0: no limit); over it the device is read slower.
    pub max_publish_rate: u32,
    /// Address prefix of the queues that hold retained messages, one per topic (standalone
    /// declares it a queue prefix); empty: retain not available.
    pub retained_prefix: String,
    /// Devices sharing one AMQP connection from the gateway to the router (their links stay
    /// their own). Keep it × the links per device under the router's
    /// `max_links_per_connection`.
    pub devices_per_connection: usize,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            ws_listen: None,
            enabled: true,
            router: "127.0.0.1:5672".into(),
            router_http: "127.0.0.1:8080".into(),
            topic_prefix: "mqtt/".into(),
            max_packet_size: 1024 * 1024,
            max_connections: 100_000,
            inflight: 64,
            max_publish_rate: 0,
            retained_prefix: "mqtt-retained/".into(),
            devices_per_connection: 500,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub router: RouterSection,
    pub broker: BrokerSection,
    pub addresses: Vec<AddressDecl>,
    pub mqtt: MqttSection,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let c: Config =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }
    pub fn validate(&self) -> Result<(), ConfigError> {
        for a in &self.addresses {
            a.validate()?;
        }
        self.broker.validate()?;
        let l = &self.router.limits;
        if l.max_frame_size < 512 {
            return Err(ConfigError::Invalid("max_frame_size must be >= 512".into()));
        }
        if l.max_unsettled_per_link == 0 || l.connection_buffer_bytes == 0 {
            return Err(ConfigError::Invalid(
                "max_unsettled_per_link and connection_buffer_bytes must be > 0".into(),
            ));
        }
        if l.link_capacity == 0 {
            return Err(ConfigError::Invalid("link_capacity must be > 0".into()));
        }
        if l.max_sessions_per_connection == 0 || l.max_links_per_connection == 0 {
            return Err(ConfigError::Invalid(
                "session and link limits must be > 0".into(),
            ));
        }
        let m = &self.mqtt;
        if m.max_packet_size < 128
            || m.inflight == 0
            || m.max_connections == 0
            || m.devices_per_connection == 0
        {
            return Err(ConfigError::Invalid(
                "mqtt: max_packet_size >= 128; inflight, max_connections, devices_per_connection > 0".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_fields() {
        let c = Config::from_yaml(
            "router:\n  id: r1\n  limits:\n    link_capacity: 10\naddresses:\n  - prefix: mc/\n    type: multicast\n",
        )
        .unwrap();
        assert_eq!(c.router.limits.link_capacity, 10);
        assert_eq!(c.addresses[0].kind, AddressType::Multicast);
        assert!(Config::from_yaml("router:\n  bogus: 1\n").is_err());
        assert!(Config::from_yaml("addresses:\n  - type: anycast\n").is_err());
    }
}
