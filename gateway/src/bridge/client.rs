//! One face for rumqttc's two clients, MQTT 5 (`rumqttc::v5`) and MQTT 3.1.1: the
//! bridge publishes (with MQTT 5 properties where the version has them), subscribes,
//! acknowledges the requests it took and watches the few events it acts on.
//!
//! MQTT 3.1.1 has no properties: no `boot`/`seq` user properties, no content type, no
//! Response Topic or Correlation Data (command states go to the device's
//! `commands/response` topic) and no session expiry (a persistent session lasts until
//! the broker drops it).

use std::time::Duration;

use bytes::Bytes;
use rumqttc::Transport;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as p5;

use crate::config::MqttVersion;

/// What a connection is opened with, for either version.
pub(super) struct Setup {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    /// The Last Will: retained, at QoS 1.
    pub will_topic: String,
    pub will_payload: Vec<u8>,
    pub transport: Option<Transport>,
    /// Incoming QoS 1 messages the broker may send before we acknowledge them.
    pub receive_maximum: u16,
}

/// The client settings, made once and used for every connection.
#[derive(Clone)]
pub(super) enum Options {
    V5(Box<v5::MqttOptions>),
    /// 3.1.1 keeps its network options in the event loop.
    V4(Box<(rumqttc::MqttOptions, rumqttc::NetworkOptions)>),
}

impl Options {
    pub fn new(version: MqttVersion, s: Setup) -> Self {
        match version {
            MqttVersion::V5 => {
                let mut o = v5::MqttOptions::new(s.client_id, s.host, s.port);
                o.set_keep_alive(s.keep_alive);
                // A persistent session: the broker keeps what it acknowledged for
                // subscribers, and requests for us, while the bridge reconnects.
                o.set_clean_start(false);
                o.set_session_expiry_interval(Some(u32::MAX));
                o.set_connection_timeout(s.connect_timeout.as_secs());
                o.set_max_packet_size(Some(1 << 20));
                // A command request is acknowledged once it is queued in the store (or
                // answered with an error): a crash before that gets it delivered again.
                o.set_manual_acks(true);
                o.set_receive_maximum(Some(s.receive_maximum));
                o.set_last_will(p5::LastWill::new(
                    s.will_topic,
                    s.will_payload,
                    v5::mqttbytes::QoS::AtLeastOnce,
                    true,
                    None,
                ));
                let mut network = o.network_options();
                network.set_tcp_nodelay(true);
                o.set_network_options(network);
                if let Some(t) = s.transport {
                    o.set_transport(t);
                }
                Options::V5(Box::new(o))
            }
            MqttVersion::V311 => {
                let mut o = rumqttc::MqttOptions::new(s.client_id, s.host, s.port);
                o.set_keep_alive(s.keep_alive);
                o.set_clean_session(false);
                o.set_max_packet_size(1 << 20, 1 << 20);
                o.set_manual_acks(true);
                o.set_last_will(rumqttc::LastWill::new(
                    s.will_topic,
                    s.will_payload,
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
                let mut network = rumqttc::NetworkOptions::new();
                network.set_tcp_nodelay(true);
                network.set_connection_timeout(s.connect_timeout.as_secs());
                if let Some(t) = s.transport {
                    o.set_transport(t);
                }
                Options::V4(Box::new((o, network)))
            }
        }
    }

    /// A fresh client and its event loop (which connects when first polled).
    pub fn connect(&self, capacity: usize) -> (Client, Events) {
        match self {
            Options::V5(o) => {
                let (c, e) = v5::AsyncClient::new((**o).clone(), capacity);
                (Client::V5(c), Events::V5(Box::new(e)))
            }
            Options::V4(o) => {
                let (options, network) = &**o;
                let (c, mut e) = rumqttc::AsyncClient::new(options.clone(), capacity);
                e.set_network_options(network.clone());
                (Client::V4(c), Events::V4(Box::new(e)))
            }
        }
    }
}

/// A message to publish.
pub(super) struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// QoS 1 (else 0).
    pub at_least_once: bool,
    /// MQTT 5 only.
    pub content_type: &'static str,
    /// MQTT 5 only.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 only.
    pub correlation: Option<Bytes>,
}

/// A publish the broker sent us (a command request), acknowledged once handled.
pub(super) enum Incoming {
    V5(p5::Publish),
    V4(rumqttc::Publish),
}

impl Incoming {
    pub fn topic(&self) -> String {
        match self {
            Incoming::V5(p) => String::from_utf8_lossy(&p.topic).into_owned(),
            Incoming::V4(p) => p.topic.clone(),
        }
    }

    pub fn payload(&self) -> &[u8] {
        match self {
            Incoming::V5(p) => &p.payload,
            Incoming::V4(p) => &p.payload,
        }
    }

    /// Whether it is a retained message (sent because we subscribed, not because
    /// someone published it now).
    pub fn retained(&self) -> bool {
        match self {
            Incoming::V5(p) => p.retain,
            Incoming::V4(p) => p.retain,
        }
    }

    /// MQTT 5's Response Topic and Correlation Data.
    pub fn reply_to(&self) -> (Option<String>, Option<Bytes>) {
        match self {
            Incoming::V5(p) => p.properties.as_ref().map_or((None, None), |pr| {
                (pr.response_topic.clone(), pr.correlation_data.clone())
            }),
            Incoming::V4(_) => (None, None),
        }
    }
}

/// The events the bridge acts on.
pub(super) enum Happened {
    /// The broker accepted the connection.
    ConnAck,
    /// A publish went out with this packet id.
    Sent(u16),
    /// The broker acknowledged one; `refused` is its reason code when it did not take it.
    Acked { pkid: u16, refused: Option<String> },
    /// A publish from the broker.
    Request(Incoming),
    /// Anything else.
    Other,
}

/// The client side: hands requests to the event loop.
pub(super) enum Client {
    V5(v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

impl Client {
    pub async fn publish(&self, m: Message) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                let qos = if m.at_least_once {
                    v5::mqttbytes::QoS::AtLeastOnce
                } else {
                    v5::mqttbytes::QoS::AtMostOnce
                };
                let properties = p5::PublishProperties {
                    content_type: Some(m.content_type.into()),
                    user_properties: m.user_properties,
                    correlation_data: m.correlation,
                    ..Default::default()
                };
                c.publish_with_properties(m.topic, qos, m.retain, m.payload, properties)
                    .await
                    .map_err(|e| e.to_string())
            }
            Client::V4(c) => {
                let qos = if m.at_least_once {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                c.publish(m.topic, qos, m.retain, m.payload)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Subscribes at QoS 1; with MQTT 5, retained messages are not sent (with 3.1.1
    /// they are, and [`Incoming::retained`] tells them apart).
    pub async fn subscribe(&self, filter: String) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                let mut f = p5::Filter::new(filter, v5::mqttbytes::QoS::AtLeastOnce);
                f.retain_forward_rule = p5::RetainForwardRule::Never;
                c.subscribe_many([f]).await.map_err(|e| e.to_string())
            }
            Client::V4(c) => c
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    pub async fn ack(&self, i: &Incoming) -> Result<(), String> {
        match (self, i) {
            (Client::V5(c), Incoming::V5(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            (Client::V4(c), Incoming::V4(p)) => c.ack(p).await.map_err(|e| e.to_string()),
            // One connection speaks one version.
            _ => Ok(()),
        }
    }

    pub async fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

/// The event loop: polling it does the network I/O.
pub(super) enum Events {
    V5(Box<v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

impl Events {
    /// The next event, or why the connection ended (in words an operator can act on).
    pub async fn poll(&mut self) -> Result<Happened, String> {
        match self {
            Events::V5(e) => {
                use v5::mqttbytes::v5::{Packet, PubAckReason};
                Ok(match e.poll().await.map_err(|e| describe_v5(&e))? {
                    v5::Event::Incoming(Packet::ConnAck(_)) => Happened::ConnAck,
                    v5::Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => Happened::Sent(pkid),
                    v5::Event::Incoming(Packet::PubAck(ack)) => Happened::Acked {
                        pkid: ack.pkid,
                        refused: (!matches!(
                            ack.reason,
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                        ))
                        .then(|| format!("{:?}", ack.reason)),
                    },
                    v5::Event::Incoming(Packet::Publish(p)) => Happened::Request(Incoming::V5(p)),
                    _ => Happened::Other,
                })
            }
            Events::V4(e) => {
                use rumqttc::Packet;
                Ok(match e.poll().await.map_err(|e| describe_v4(&e))? {
                    rumqttc::Event::Incoming(Packet::ConnAck(_)) => Happened::ConnAck,
                    rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => {
                        Happened::Sent(pkid)
                    }
                    rumqttc::Event::Incoming(Packet::PubAck(ack)) => Happened::Acked {
                        pkid: ack.pkid,
                        refused: None,
                    },
                    rumqttc::Event::Incoming(Packet::Publish(p)) => {
                        Happened::Request(Incoming::V4(p))
                    }
                    _ => Happened::Other,
                })
            }
        }
    }
}

fn tls_failed(t: &dyn std::fmt::Display) -> String {
    format!(
        "TLS with the broker failed: {t} (is mqtt.ca the CA of the broker's certificate, \
         and does the certificate name the host in mqtt.url?)"
    )
}

fn describe_v5(e: &v5::ConnectionError) -> String {
    match e {
        v5::ConnectionError::Tls(t) => tls_failed(t),
        v5::ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}

fn describe_v4(e: &rumqttc::ConnectionError) -> String {
    match e {
        rumqttc::ConnectionError::Tls(t) => tls_failed(t),
        rumqttc::ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}
