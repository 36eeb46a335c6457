//! A custom `RetryStrategy` decides per failure: here validation errors are dead-lettered at
//! once (retrying cannot fix them) and everything else gets four attempts. The consume loop
//! follows it, and nothing is lost either way: every message is handled or dead-lettered with
//! the strategy's reason and the attempts it took (memory broker, the embedded default).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use courier::{
    header, Consumer, Context, DeliveryClient, Failure, Guarantee, Handler, HandlerError, Message,
    RetryDecision, RetryStrategy, Subscription,
};
use parking_lot::Mutex;

#[derive(Debug)]
struct ValidationFirst;

impl RetryStrategy for ValidationFirst {
    fn decide(&self, f: &Failure<'_>) -> RetryDecision {
        let reason = f.reason();
        if reason.starts_with("invalid") {
            RetryDecision::DeadLetter(format!("validation: {reason}"))
        } else if f.attempt < 4 {
            RetryDecision::Retry(Duration::from_millis(10))
        } else {
            RetryDecision::DeadLetter(format!("gave up after {} attempts: {reason}", f.attempt))
        }
    }
}

/// Fails by payload: `invalid` always with a validation error, `down` always with a timeout,
/// `flaky` on its first two attempts; records every attempt.
struct ByPayload(Arc<Mutex<HashMap<String, Vec<u32>>>>);

#[async_trait::async_trait]
impl Handler for ByPayload {
    async fn handle(&self, m: &Message, cx: &mut Context) -> Result<(), HandlerError> {
        let payload = String::from_utf8_lossy(&m.payload).into_owned();
        self.0
            .lock()
            .entry(payload.clone())
            .or_default()
            .push(cx.attempt());
        match payload.as_str() {
            "invalid" => Err(HandlerError::retryable("invalid amount: -5")),
            "down" => Err(HandlerError::retryable("timeout calling the ledger")),
            "flaky" if cx.attempt() < 3 => Err(HandlerError::retryable("connection reset")),
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn the_consumer_follows_a_custom_retry_strategy() {
    let client: Arc<dyn DeliveryClient> =
        courier::connect(&courier::Config::default().with_guarantee(Guarantee::AtLeastOnce))
            .await
            .expect("memory backend")
            .into();
    client.create_destination("payments").await.unwrap();
    let sub = Subscription::new("payments", "ledger");
    client
        .create_destination(&sub.dead_letter_destination())
        .await
        .unwrap();
    let dead = client
        .subscribe(Subscription::new(sub.dead_letter_destination(), "ops"))
        .await
        .unwrap();
    let attempts = Arc::new(Mutex::new(HashMap::new()));
    let consumer = Consumer::new(client.clone(), sub)
        .retry_strategy(ValidationFirst)
        .spawn(ByPayload(attempts.clone()))
        .await
        .unwrap();
    for p in ["invalid", "down", "flaky", "fine"] {
        client.publish("payments", Message::new(p)).await.unwrap();
    }

    let mut dead = dead;
    let mut dead_letters = HashMap::new();
    while dead_letters.len() < 2 {
        let d = dead
            .next_timeout(Duration::from_secs(10))
            .await
            .expect("two dead letters within 10 s")
            .unwrap();
        let h = |k: &str| d.message.headers.get(k).cloned().unwrap_or_default();
        dead_letters.insert(
            String::from_utf8_lossy(&d.message.payload).into_owned(),
            (
                h(header::DEAD_LETTER_REASON),
                h(header::DEAD_LETTER_ATTEMPTS),
            ),
        );
        d.ack().await.unwrap();
    }
    let idle = consumer
        .wait_idle(Duration::from_millis(200), Duration::from_secs(10))
        .await;
    let stats = consumer.shutdown().await.unwrap();
    assert!(idle, "the consumer did not go idle: {stats:?}");

    assert_eq!(
        dead_letters.get("invalid"),
        Some(&("validation: invalid amount: -5".to_owned(), "1".to_owned())),
        "a validation error is dead-lettered on its first attempt"
    );
    assert_eq!(
        dead_letters.get("down"),
        Some(&(
            "gave up after 4 attempts: timeout calling the ledger".to_owned(),
            "4".to_owned()
        ))
    );
    let attempts = attempts.lock();
    assert_eq!(attempts["invalid"], vec![1]);
    assert_eq!(attempts["down"], vec![1, 2, 3, 4]);
    assert_eq!(attempts["flaky"], vec![1, 2, 3]);
    assert_eq!(attempts["fine"], vec![1]);
    assert_eq!(stats.dead_lettered, 2, "{stats:?}");
    assert_eq!(stats.handled, 2, "{stats:?}");
    assert_eq!(stats.retried, 5, "3 of `down`, 2 of `flaky`: {stats:?}");
}

#[tokio::test]
async fn a_strategy_that_fails_validation_keeps_the_consumer_from_starting() {
    #[derive(Debug)]
    struct Refuses;
    impl RetryStrategy for Refuses {
        fn decide(&self, f: &Failure<'_>) -> RetryDecision {
            RetryDecision::DeadLetter(f.reason())
        }
        fn validate(&self) -> courier::Result<()> {
            Err(courier::Error::config("no retries configured"))
        }
    }
    let client: Arc<dyn DeliveryClient> = courier::connect(&courier::Config::default())
        .await
        .expect("memory backend")
        .into();
    client.create_destination("payments").await.unwrap();
    let started = Consumer::new(client, Subscription::new("payments", "ledger"))
        .retry_strategy(Refuses)
        .spawn(courier::handler_fn(|_m| async { Ok(()) }))
        .await;
    match started {
        Err(courier::Error::Config { message }) => {
            assert!(message.contains("no retries"), "{message}")
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}
