//! Endpoints the tests read, from the environment with loopback defaults (same names as
//! `scripts/services` and `docker-compose.yml`).

fn var(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// `KAFKA_BOOTSTRAP` (default `127.0.0.1:9092`).
pub fn kafka_bootstrap() -> String {
    var("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
}

/// `KAFKA_FLAVOR` (default `apache`): which Kafka-protocol broker `KAFKA_BOOTSTRAP` points at.
/// `scripts/services` runs Apache Kafka; set another value (`redpanda`, `nisshi`, …) when the
/// suites target a broker that lacks what a test needs (aborted-transaction filtering), and that
/// test reports itself as skipped.
pub fn kafka_flavor() -> String {
    var("KAFKA_FLAVOR", "apache")
}

/// `RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
pub fn rabbitmq_url() -> String {
    var("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

/// `RABBITMQ_TLS_URL` (default `amqps://guest:guest@127.0.0.1:5671/%2f`, the TLS listener
/// `scripts/services` gives RabbitMQ).
pub fn rabbitmq_tls_url() -> String {
    var("RABBITMQ_TLS_URL", "amqps://guest:guest@127.0.0.1:5671/%2f")
}

/// `RABBITMQ_TLS_CA` (default `/etc/rabbitmq/courier-tls/ca.pem`): the CA of that listener.
pub fn rabbitmq_tls_ca() -> String {
    var("RABBITMQ_TLS_CA", "/etc/rabbitmq/courier-tls/ca.pem")
}

/// `RABBITMQ_TLS_CLIENT` (default `/etc/rabbitmq/courier-tls/client.p12`, password
/// `courier`): a client identity that CA signed.
pub fn rabbitmq_tls_client() -> String {
    var(
        "RABBITMQ_TLS_CLIENT",
        "/etc/rabbitmq/courier-tls/client.p12",
    )
}

/// `SQS_ENDPOINT` (default `http://127.0.0.1:4566`).
pub fn sqs_endpoint() -> String {
    var("SQS_ENDPOINT", "http://127.0.0.1:4566")
}

/// `AWS_REGION` (default `us-east-1`).
pub fn aws_region() -> String {
    var("AWS_REGION", "us-east-1")
}

/// `REDIS_URL` (default `redis://127.0.0.1:6379`).
pub fn redis_url() -> String {
    var("REDIS_URL", "redis://127.0.0.1:6379")
}

/// `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/courier`).
pub fn database_url() -> String {
    var("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/courier")
}

/// Whether the tests run in CI (`CI=true`).
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Panic with a clear message that a service is unreachable. Tests never skip for that: a
/// broker that is down is a failure (start it with `scripts/services up`).
pub fn unreachable(service: &str, endpoint: &str, error: impl std::fmt::Display) -> ! {
    panic!(
        "{service} is not reachable at {endpoint}: {error}\n  run `scripts/services up` (or point the endpoint variable at a running {service})"
    )
}

/// Tell whoever runs the test command that something was skipped or left out, and why. Written
/// straight to stderr, which the test harness does not capture (it captures `println!` and
/// `eprintln!` of passing tests), so the reason shows in every run's output.
pub fn notice(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "NOTICE: {text}");
}

/// Multiply a test wait bound by `COURIER_TEST_TIME_SCALE` (default 1) for slow machines.
pub fn scaled(d: std::time::Duration) -> std::time::Duration {
    let f: f64 = std::env::var("COURIER_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    d.mul_f64(f.max(0.1))
}
