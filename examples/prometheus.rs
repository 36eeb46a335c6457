//! Metrics with a Prometheus exporter: run a consumer on the memory broker and serve
//! `http://127.0.0.1:9898/metrics`.
//!
//! ```text
//! cargo run --example prometheus            # then: curl -s 127.0.0.1:9898/metrics | grep courier_
//! cargo run --example prometheus -- --once  # print the scrape once and exit (what CI runs)
//! ```

use std::sync::Arc;
use std::time::Duration;

use courier::{handler_fn, Config, DeliveryClient, HandlerError, Message, Subscription};
use metrics_exporter_prometheus::PrometheusBuilder;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let once = std::env::args().any(|a| a == "--once");
    let addr: std::net::SocketAddr = "127.0.0.1:9898".parse()?;
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;

    let config = Config::from_url("memory://prometheus?auto_create=true")?;
    let client: Arc<dyn DeliveryClient> = courier::connect(&config).await?.into();
    // Every tenth order fails on its first attempt, to show retries in the metrics.
    let failed_once = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let consumer = courier::consumer(
        &config,
        client.clone(),
        Subscription::new("orders", "shipping"),
        handler_fn(move |m: Message| {
            let failed_once = failed_once.clone();
            async move {
                if m.payload.ends_with(b"0") && failed_once.lock().unwrap().insert(m.id.clone()) {
                    return Err(HandlerError::retryable("warehouse busy"));
                }
                Ok(())
            }
        }),
    )
    .await?;
    for i in 0..100 {
        client
            .publish(
                "orders",
                Message::new(format!("order {i}")).with_key(format!("c{}", i % 7)),
            )
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let body = scrape(addr).await?;
    let lines: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("courier_") && !l.starts_with('#'))
        .collect();
    println!("metrics served at http://{addr}/metrics — courier lines:");
    for l in &lines {
        println!("  {l}");
    }
    if !once {
        println!("serving until Ctrl-C");
        tokio::signal::ctrl_c().await?;
    }
    consumer.shutdown().await?;
    Ok(())
}

/// One HTTP GET of /metrics with a plain TCP stream (no HTTP client needed).
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}
