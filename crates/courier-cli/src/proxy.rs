//! A TCP fault proxy for `courier verify --faults cut=N`: the client talks to the broker through
//! it, and a *cut* drops every connection passing through at that moment — publishers and
//! consumers alike — the way a network partition or a load balancer reset does. New connections
//! are accepted again right away, so the client's own recovery is what gets tested.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy on `127.0.0.1:<port>` forwarding to one upstream address.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    live: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on an ephemeral loopback port and forward each accepted connection to `upstream`
    /// (`host:port`).
    pub async fn start(upstream: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fault proxy on 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(0u64);
        let (live, _) = watch::channel(0u64);
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream.to_owned(),
            cut.clone(),
            live.clone(),
        ));
        Ok(FaultProxy {
            addr,
            cut,
            live,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drop every connection open right now; returns how many there were.
    pub fn cut(&self) -> u64 {
        let n = *self.live.borrow();
        self.cut.send_modify(|g| *g += 1);
        n
    }

    /// Connections currently open through the proxy.
    pub fn live(&self) -> u64 {
        *self.live.borrow()
    }

    /// Wait until at least one connection is open through the proxy (a client reconnecting after
    /// the previous cut), for at most `limit`; whether one is.
    pub async fn connected(&self, limit: Duration) -> bool {
        let mut live = self.live.subscribe();
        tokio::time::timeout(limit, live.wait_for(|n| *n > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Existing connections end with the proxy, as if the network went away for good.
        self.cut.send_modify(|g| *g += 1);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: String,
    cut: watch::Sender<u64>,
    live: watch::Sender<u64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let mut cuts = cut.subscribe();
        cuts.mark_unchanged();
        let upstream = upstream.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return; // upstream down: the client sees its connection closed
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            live.send_modify(|n| *n += 1);
            let (mut client, mut server) = (client, server);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cuts.changed() => {}
            }
            live.send_modify(|n| *n -= 1);
            // Both sockets drop here: each side sees its connection end mid-stream.
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("proxy answered in time")?;
        Ok(buf[..n].to_vec())
    }

    #[tokio::test]
    async fn forwards_then_cuts_live_connections_and_accepts_new_ones() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(&upstream.to_string()).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut a).await.unwrap(), b"ping");
        assert_eq!(proxy.live(), 1);
        assert!(proxy.connected(std::time::Duration::from_secs(5)).await);

        assert_eq!(proxy.cut(), 1);
        // The cut connection ends: a read returns EOF or an error, never the echo.
        let after = roundtrip(&mut a).await;
        assert!(
            matches!(&after, Ok(v) if v.is_empty()) || after.is_err(),
            "cut connection still forwarded: {after:?}"
        );

        // A new connection goes through.
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut b).await.unwrap(), b"ping");
    }
}
