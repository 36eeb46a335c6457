//! Parsing and validating configurations of every compiled-in backend: TOML, URLs, secrets,
//! and the typed errors for what is wrong.

use std::time::Duration;

use courier::config::Secret;
use courier::{BackendConfig, Config, Error, Guarantee};

#[test]
fn toml_round_trip_for_every_backend() {
    let text = r#"
        guarantee = "exactly-once"
        [backend]
        kind = "kafka"
        bootstrap = "127.0.0.1:9092"
        settings = { "security.protocol" = "SASL_SSL", "sasl.password" = "hunter2" }
        [consumer]
        concurrency = 4
        retry = { max_attempts = 3, initial_backoff = "10ms", max_backoff = "1s" }
        [idempotency]
        store = "redis://:hunter2@127.0.0.1:6379"
        ttl = "1h"
    "#;
    let c = Config::from_toml_str(text).unwrap();
    assert_eq!(c.guarantee, Guarantee::ExactlyOnce);
    assert_eq!(c.consumer.retry.max_attempts, 3);
    let BackendConfig::Kafka(k) = &c.backend else {
        panic!()
    };
    assert_eq!(k.settings["sasl.password"], "hunter2");
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("hunter2"), "{dbg}");
    assert!(!c.to_toml().contains("hunter2"));
    // The child-process hand-over keeps every secret, and only for that call.
    let exposed = c.to_toml_with_secrets().unwrap();
    assert_eq!(Config::from_toml_str(&exposed).unwrap(), c);
    assert!(!c.to_toml().contains("hunter2"));
    for url in [
        "amqp://user:hunter2@127.0.0.1:5672/%2f?guarantee=at-most-once",
        "sqs://us-east-1?endpoint=http://127.0.0.1:4566",
    ] {
        let mut c = Config::from_url(url).unwrap();
        if let BackendConfig::Sqs(s) = &mut c.backend {
            s.secret_access_key = Some(Secret::new("hunter2"));
        }
        let back = Config::from_toml_str(&c.to_toml_with_secrets().unwrap()).unwrap();
        assert_eq!(back, c, "{url}");
        assert!(!c.to_toml().contains("hunter2"), "{url}");
    }

    for kind in ["memory", "rabbitmq", "sqs"] {
        let c = Config::from_toml_str(&format!("[backend]\nkind = \"{kind}\"\n")).unwrap();
        assert_eq!(c.backend.kind(), kind);
        assert_eq!(c.guarantee, Guarantee::AtLeastOnce);
    }
    let c = Config::from_toml_str(
        "[backend]\nkind = \"rabbitmq\"\noperation_timeout = \"3s\"\nconfirm_timeout = \"1m\"\n",
    )
    .unwrap();
    let BackendConfig::Rabbitmq(r) = &c.backend else {
        panic!()
    };
    assert_eq!(r.operation_timeout, Duration::from_secs(3));
    assert_eq!(r.confirm_timeout, Duration::from_secs(60));
}

#[test]
fn bad_config_is_a_typed_error() {
    for bad in [
        "[backend]\nkind = \"nats\"\n",
        "guarantee = \"twice\"\n[backend]\nkind = \"memory\"\n",
        "[backend]\nkind = \"memory\"\nbogus = 1\n",
        "[backend]\nkind = \"memory\"\n[consumer]\nconcurrency = 0\n",
        "[backend]\nkind = \"sqs\"\nwait_time = \"30s\"\n",
        "[backend]\nkind = \"memory\"\nfaults = { drop_on_publish = 1.5 }\n",
        "[backend]\nkind = \"rabbitmq\"\noperation_timeout = \"0s\"\n",
        "[backend]\nkind = \"rabbitmq\"\nconfirm_timeout = \"0s\"\n",
    ] {
        let e = Config::from_toml_str(bad).unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{bad}: {e}");
    }
}

#[test]
fn urls() {
    let c = Config::from_url("kafka://a:9092,b:9092?guarantee=exactly-once").unwrap();
    let BackendConfig::Kafka(k) = &c.backend else {
        panic!()
    };
    assert_eq!(k.bootstrap, "a:9092,b:9092");
    assert_eq!(c.guarantee, Guarantee::ExactlyOnce);
    let c = Config::from_url("amqp://guest:secretpw@127.0.0.1:5672/%2f?guarantee=at-most-once")
        .unwrap();
    assert!(!format!("{c:?}").contains("secretpw"));
    let c = Config::from_url("sqs://us-east-1?endpoint=http://127.0.0.1:4566&auto_create=true")
        .unwrap();
    let BackendConfig::Sqs(s) = &c.backend else {
        panic!()
    };
    assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
    assert_eq!(s.region.as_deref(), Some("us-east-1"));
    assert!(s.auto_create);
    let c = Config::from_url("memory://?guarantee=alo").unwrap();
    assert_eq!(c.backend.kind(), "memory");
    assert!(Config::from_url("nats://x").is_err());
    assert!(Config::from_url("memory://x?frobnicate=1").is_err());
    let c = Config::from_url("sqs://eu-west-1?fifo=true").unwrap();
    let BackendConfig::Sqs(s) = &c.backend else {
        panic!()
    };
    assert!(s.fifo);
    let c = Config::from_url(
        "amqps://u:p@rabbit:5671/%2f?tls_ca_file=/ca.pem&tls_client_identity=/c.p12&tls_client_identity_password=s3cr3t-pw",
    )
    .unwrap();
    let BackendConfig::Rabbitmq(r) = &c.backend else {
        panic!()
    };
    assert_eq!(r.tls_ca_file.as_deref(), Some("/ca.pem"));
    assert_eq!(r.tls_client_identity.as_deref(), Some("/c.p12"));
    assert!(!format!("{c:?}").contains("s3cr3t"), "{c:?}");
    let c = Config::from_url(
        "kafka://b:9093?security_protocol=SASL_SSL&sasl_mechanism=PLAIN&sasl_username=u&sasl_password=s3cr3t-pw",
    )
    .unwrap();
    let BackendConfig::Kafka(k) = &c.backend else {
        panic!()
    };
    assert_eq!(k.settings["security.protocol"], "SASL_SSL");
    assert_eq!(k.settings["sasl.username"], "u");
    assert!(!format!("{c:?}").contains("s3cr3t"), "{c:?}");
    // A parameter of another backend is a typo, not ignored.
    for (bad, param) in [
        ("kafka://b:9092?fifo=true", "fifo"),
        ("sqs://eu-west-1?tls_ca_file=/ca.pem", "tls_ca_file"),
        ("memory://?endpoint=http://x", "endpoint"),
    ] {
        match Config::from_url(bad) {
            Err(Error::Config { message }) => assert!(
                message.contains(&format!("unknown URL parameter {param:?}")),
                "{bad}: {message}"
            ),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

/// Typos are refused with a message that shows the fix, never read as a default.
#[test]
fn malformed_urls_are_refused() {
    for (bad, says) in [
        ("sqs:/us-east-1", "write sqs://us-east-1"),
        ("memory:/x", "write memory://x"),
        ("memory:x", "write memory://x"),
        ("kafka:127.0.0.1:9092", "write kafka://127.0.0.1:9092"),
        ("memory", "<scheme>://"),
        ("memory://x/y", "no path"),
        ("sqs://us-east-1/queue", "no path"),
        ("kafka://", "needs the bootstrap servers"),
        ("kafka://?guarantee=alo", "needs the bootstrap servers"),
        ("sqs://eu-west-1?fifo=yes", "fifo=yes"),
    ] {
        match Config::from_url(bad) {
            Err(Error::Config { message }) => {
                assert!(message.contains(says), "{bad}: {message}")
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    // Good URLs with a trailing slash or an empty host stay good.
    assert!(Config::from_url("memory://").is_ok());
    assert!(Config::from_url("memory://x/").is_ok());
    assert!(Config::from_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
}

/// Each backend's kind in the facade's `[backend] kind` is the backend's own `Backend::KIND`.
#[test]
fn kinds_are_the_backends_own() {
    let compiled = BackendConfig::compiled();
    assert_eq!(compiled.len(), 4, "{compiled:?}");
    for b in compiled {
        let (kind, schemes) = (b.kind, b.schemes);
        let c = Config::from_toml_str(&format!("[backend]\nkind = \"{kind}\"\n")).unwrap();
        assert_eq!(c.backend.kind(), kind);
        let url = format!(
            "{}://{}",
            schemes[0],
            if kind == "kafka" { "b:9092" } else { "" }
        );
        assert_eq!(
            Config::from_url(&url).unwrap().backend.kind(),
            kind,
            "{url}"
        );
    }
}

/// A backend crate used alone reads the same file (its `kind` checked and dropped) and refuses
/// another backend's file or URL.
#[test]
fn one_backend_alone_reads_its_own_section() {
    let text =
        "guarantee = \"at-most-once\"\n[backend]\nkind = \"kafka\"\nbootstrap = \"k:9092\"\n";
    let k = courier::kafka::Config::from_toml_str(text).unwrap();
    assert_eq!(k.backend.bootstrap, "k:9092");
    assert_eq!(k.guarantee, Guarantee::AtMostOnce);
    let facade = Config::from_toml_str(text).unwrap();
    assert_eq!(facade.backend, BackendConfig::Kafka(k.backend.clone()));
    assert_eq!(Config::new(k.backend.clone()).backend, facade.backend);
    for bad in [
        "[backend]\nkind = \"sqs\"\n".to_owned(),
        "[backend]\nkind = \"kafka\"\nqueue_type = \"quorum\"\n".to_owned(),
    ] {
        let e = courier::kafka::Config::from_toml_str(&bad).unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{bad}: {e}");
    }
    match courier::kafka::Config::from_url("amqp://guest:guest@h/%2f") {
        Err(Error::Config { message }) => assert!(message.contains("kafka://"), "{message}"),
        other => panic!("{other:?}"),
    }
}

/// An unknown kind or scheme names what this build has.
#[test]
fn unknown_backends_name_the_compiled_ones() {
    for e in [
        Config::from_toml_str("[backend]\nkind = \"nats\"\n").unwrap_err(),
        Config::from_url("nats://x").unwrap_err(),
    ] {
        let Error::Config { message } = e else {
            panic!("{e:?}")
        };
        assert!(
            message.contains("memory")
                && message.contains("sqs")
                && message.contains("cargo features"),
            "{message}"
        );
    }
}

/// A wrong value in a configuration file is reported with its line, as TOML's own errors are.
#[test]
fn errors_in_a_file_show_where() {
    let e = Config::from_toml_str(
        "guarantee = \"at-least-once\"\n[backend]\nkind = \"memory\"\nbogus = 1\n",
    )
    .unwrap_err();
    let Error::Config { message } = e else {
        panic!("{e:?}")
    };
    assert!(
        message.contains("line ") && message.contains("bogus"),
        "{message}"
    );
}
