//! The connection: one AMQP connection per client, watched for loss and replaced, the
//! channels on it, the timeouts every broker round trip runs under, and the errors.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::{Channel, Connection, ConnectionProperties, Event};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::RabbitMqConfig;
use courier_core::{Error, Result};

use crate::BACKEND;

pub(crate) fn broker_err(operation: &'static str, e: lapin::Error) -> Error {
    let retryable = !matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)));
    Error::broker(BACKEND, operation, retryable, e)
}

pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// The broker refused a declaration whose arguments differ from the existing object's (406).
pub(crate) fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

pub(crate) fn not_found(destination: &str) -> Error {
    Error::DestinationNotFound {
        backend: BACKEND,
        destination: destination.to_owned(),
        hint: "declare it first (DeliveryClient::create_destination) or set backend.auto_create = true".into(),
    }
}

/// Await one lapin operation for at most `limit`, and no longer than the connection lives.
///
/// Both bounds matter. A connection that died without the socket saying so can leave a reply
/// pending forever; and lapin 4.12 can lose a frame queued in the instant its connection fails
/// (an ack issued then never resolves): `lost` — fired when lapin reports the connection failed —
/// ends such a wait at once instead of after `limit`. One stuck await must not stall a publisher
/// or a consumer's handler lane. The outer error is courier's (timeout, connection lost), the
/// inner one lapin's.
pub(crate) async fn within<T>(
    limit: Duration,
    lost: &CancellationToken,
    operation: &'static str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<lapin::Result<T>> {
    tokio::select! {
        r = tokio::time::timeout(limit, fut) => r.map_err(|_| {
            warn!(operation, after = ?limit, "no answer from RabbitMQ in time; treating the channel as broken");
            Error::Timeout {
                operation: operation.to_owned(),
                after: limit,
            }
        }),
        _ = lost.cancelled() => Err(connection_lost(operation)),
    }
}

/// The connection an operation was running on failed (it is re-established by the next use).
pub(crate) fn connection_lost(operation: &'static str) -> Error {
    Error::broker(
        BACKEND,
        operation,
        true,
        "the connection to RabbitMQ was lost; courier reconnects on the next use",
    )
}

/// [`within`], with lapin's error mapped to courier's.
pub(crate) async fn bounded<T>(
    limit: Duration,
    lost: &CancellationToken,
    operation: &'static str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    within(limit, lost, operation, fut)
        .await?
        .map_err(|e| broker_err(operation, e))
}

/// Close a channel without waiting longer than `limit` for the broker's close-ok.
pub(crate) async fn close_channel(ch: &Channel, limit: Duration, reason: &str) {
    let _ = tokio::time::timeout(limit, ch.close(200, reason.into())).await;
}

/// A channel and the token that fires when its connection is lost.
#[derive(Clone)]
pub(crate) struct Watched {
    pub(crate) channel: Channel,
    pub(crate) lost: CancellationToken,
}

/// The live connection of a [`Link`].
pub(crate) struct Live {
    conn: Connection,
    /// The publishing channel (confirm mode).
    publisher: Channel,
    /// Fired when lapin reports the connection failed, or when courier gives it up.
    lost: CancellationToken,
}

/// Fire `lost` when lapin reports that `conn` failed (an error event while the connection is no
/// longer connected: a channel-level error such as a 404 on a passive declare leaves the
/// connection up and is not a loss). The watcher ends with the token.
pub(crate) fn watch(conn: &Connection, lost: CancellationToken) {
    let mut events = conn.events_listener();
    let status = conn.status().clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = lost.cancelled() => return,
                ev = events.next() => match ev {
                    Some(Event::Error(e)) if !status.connected() => {
                        debug!(error = %e, "RabbitMQ connection lost");
                        lost.cancel();
                        return;
                    }
                    Some(_) => {}
                    None => {
                        lost.cancel();
                        return;
                    }
                },
            }
        }
    });
}

/// One connection plus a publishing channel, re-created after failures. The publishing channel
/// is always in confirm mode: at-least-once awaits each confirm; at-most-once does not, but
/// [`close`](Link::close) waits for the outstanding ones, because a channel closed while the
/// broker still holds enqueues for it (a quorum queue's leader being slow) drops them.
///
/// Every broker round trip made under the state lock is bounded by `operation_timeout`, so a
/// reconnect that hangs releases the lock and the next caller starts over.
pub(crate) struct Link {
    pub(crate) config: RabbitMqConfig,
    state: Mutex<Option<Live>>,
    /// Exchanges this client declared (`auto_create`): publishing to them again skips the
    /// declare, which costs a channel and two round trips.
    pub(crate) declared: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// The frame size negotiated on the last connection (AMQP's 131,072 before one).
    frame_max: std::sync::atomic::AtomicU32,
    /// Delay queues this client declared: parking a retry in one again skips the declare.
    pub(crate) delay_queues: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl Link {
    pub(crate) fn new(config: RabbitMqConfig) -> Self {
        Link {
            config,
            state: Mutex::new(None),
            declared: Default::default(),
            frame_max: std::sync::atomic::AtomicU32::new(DEFAULT_FRAME_MAX),
            delay_queues: Default::default(),
        }
    }

    /// The negotiated frame size: a message's properties (id, headers) must fit in one frame.
    pub(crate) fn frame_max(&self) -> u32 {
        self.frame_max.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn op(&self) -> Duration {
        self.config.operation_timeout
    }

    /// Bound on a topology declaration: as long as a confirm, since declaring a quorum queue
    /// starts a Raft group and takes seconds on a busy broker.
    pub(crate) fn declare_timeout(&self) -> Duration {
        self.config.confirm_timeout
    }

    async fn confirm_channel(
        &self,
        conn: &Connection,
        lost: &CancellationToken,
    ) -> Result<Channel> {
        let ch = bounded(self.op(), lost, "channel.open", conn.create_channel()).await?;
        bounded(
            self.op(),
            lost,
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(ch)
    }

    async fn open(&self) -> Result<Live> {
        let props = ConnectionProperties::default().with_connection_name("courier".into());
        let tls = tls_config(&self.config)?;
        let connect = async {
            match tls {
                None => Connection::connect(self.config.url.expose(), props).await,
                Some(tls) => match lapin::ConnectionBuilder::new() {
                    Ok(builder) => {
                        builder
                            .with_uri_str(self.config.url.expose().to_owned())
                            .with_properties(props)
                            .with_tls_config(tls)
                            .connect()
                            .await
                    }
                    Err(e) => Err(e),
                },
            }
            .map_err(|e| broker_err("connect", e))
        };
        let conn = tokio::time::timeout(self.op(), connect)
            .await
            .map_err(|_| Error::Timeout {
                operation: format!("connecting to {}", self.config.url.redacted()),
                after: self.op(),
            })??;
        let negotiated = conn.configuration().frame_max();
        if negotiated > 0 {
            self.frame_max
                .store(negotiated, std::sync::atomic::Ordering::Relaxed);
        }
        let lost = CancellationToken::new();
        watch(&conn, lost.clone());
        match self.confirm_channel(&conn, &lost).await {
            Ok(publisher) => Ok(Live {
                conn,
                publisher,
                lost,
            }),
            Err(e) => {
                self.abandon(conn, lost);
                Err(e)
            }
        }
    }

    /// Give up a connection that failed or stopped answering: fire its token (everything
    /// waiting on it fails over at once), and close it in the background (bounded), so its
    /// socket and lapin's I/O loop go away; never wait for it here.
    fn abandon(&self, conn: Connection, lost: CancellationToken) {
        lost.cancel();
        let limit = self.op();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(limit, conn.close(320, "unresponsive".into())).await;
        });
    }

    /// Give up the current connection, if any (see [`abandon`](Link::abandon)).
    fn give_up(&self, st: &mut Option<Live>) {
        if let Some(Live { conn, lost, .. }) = st.take() {
            self.abandon(conn, lost);
        }
    }

    /// The publishing channel, reconnecting when the connection or channel is gone.
    pub(crate) async fn channel(&self) -> Result<Watched> {
        let mut st = self.state.lock().await;
        if let Some(live) = st.as_mut() {
            if live.lost.is_cancelled() || !live.conn.status().connected() {
                self.give_up(&mut st);
            } else if live.publisher.status().connected() {
                return Ok(Watched {
                    channel: live.publisher.clone(),
                    lost: live.lost.clone(),
                });
            } else {
                match self.confirm_channel(&live.conn, &live.lost).await {
                    Ok(fresh) => {
                        live.publisher = fresh.clone();
                        return Ok(Watched {
                            channel: fresh,
                            lost: live.lost.clone(),
                        });
                    }
                    Err(e) => {
                        // The connection says it is up but does not answer, or it failed
                        // meanwhile: start over on the next use.
                        self.give_up(&mut st);
                        return Err(e);
                    }
                }
            }
        }
        let live = self.open().await?;
        let w = Watched {
            channel: live.publisher.clone(),
            lost: live.lost.clone(),
        };
        *st = Some(live);
        Ok(w)
    }

    /// A publish on `ch` got no confirm in time: stop using that channel, so the next publish
    /// opens a fresh one (or reconnects, if the connection does not answer either). The
    /// unconfirmed messages are published again by the caller with the same ids.
    pub(crate) async fn discard(&self, ch: &Channel) {
        let mut st = self.state.lock().await;
        let Some(live) = st.as_mut() else { return };
        if live.publisher.id() != ch.id() {
            return; // already replaced
        }
        let old = live.publisher.clone();
        let limit = self.op();
        tokio::spawn(async move { close_channel(&old, limit, "confirm timeout").await });
        match self.confirm_channel(&live.conn, &live.lost).await {
            Ok(fresh) => live.publisher = fresh,
            Err(_) => {
                self.give_up(&mut st);
            }
        }
    }

    /// A fresh channel on the (possibly re-established) connection, for topology or consuming.
    pub(crate) async fn new_channel(&self) -> Result<Watched> {
        self.channel().await?;
        let mut st = self.state.lock().await;
        let live = st.as_ref().ok_or(Error::Closed {
            what: "rabbitmq connection",
        })?;
        let lost = live.lost.clone();
        match bounded(self.op(), &lost, "channel.open", live.conn.create_channel()).await {
            Ok(channel) => Ok(Watched { channel, lost }),
            Err(e) => {
                self.give_up(&mut st);
                Err(e)
            }
        }
    }

    /// Flush, then close: wait (bounded by `confirm_timeout`) until the broker confirmed every
    /// publish of the channel, so an at-most-once publish that returned is not dropped by the
    /// close itself.
    pub(crate) async fn close(&self) {
        if let Some(Live {
            conn,
            publisher,
            lost,
        }) = self.state.lock().await.take()
        {
            if publisher.status().connected() {
                let flushed = tokio::time::timeout(
                    self.config.confirm_timeout,
                    publisher.wait_for_confirms(),
                )
                .await;
                if !matches!(flushed, Ok(Ok(_))) {
                    tracing::warn!("closing with publishes the broker has not confirmed");
                }
            }
            close_channel(&publisher, self.op(), "bye").await;
            let _ = tokio::time::timeout(self.op(), conn.close(200, "bye".into())).await;
            lost.cancel();
        }
    }
}

/// The TLS settings of `config` (`tls_ca_file`, `tls_client_identity` and its password), read
/// from their files; `None` when none is set. Guarded by `tests/faults.rs::tls_settings_are_applied`.
pub(crate) fn tls_config(config: &RabbitMqConfig) -> Result<Option<lapin::tcp::OwnedTLSConfig>> {
    if config.tls_ca_file.is_none() && config.tls_client_identity.is_none() {
        return Ok(None);
    }
    let cert_chain = match &config.tls_ca_file {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!("backend.tls_ca_file {path:?} cannot be read: {e}"))
        })?),
        None => None,
    };
    let identity = match &config.tls_client_identity {
        Some(path) => Some(lapin::tcp::OwnedIdentity::PKCS12 {
            der: std::fs::read(path).map_err(|e| {
                Error::config(format!(
                    "backend.tls_client_identity {path:?} cannot be read: {e}"
                ))
            })?,
            password: config
                .tls_client_identity_password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default(),
        }),
        None => None,
    };
    Ok(Some(lapin::tcp::OwnedTLSConfig {
        identity,
        cert_chain,
    }))
}

/// AMQP 0-9-1's default `frame_max` (RabbitMQ's too).
pub(crate) const DEFAULT_FRAME_MAX: u32 = 131_072;
