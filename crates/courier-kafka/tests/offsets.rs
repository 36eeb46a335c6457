//! At-least-once offsets: what is committed is exactly the next offset after the processed
//! messages of each partition — never past an unprocessed one, never short of a processed one.
//! (A regression test: `rd_kafka_offset_store` adds one to what it is given.)

mod common;

use std::collections::HashMap;
use std::time::Duration;

use courier_core::{DeliveryClient, Guarantee, Message, Position, Subscription};
use rdkafka::consumer::{BaseConsumer, Consumer};

#[tokio::test(flavor = "multi_thread")]
async fn committed_offsets_match_processed_messages() {
    let boot = common::mock_bootstrap();
    let topic = courier_testkit::unique("offsets");
    common::mock_create_topic(&topic).unwrap();
    let client = courier_kafka::connect(&common::config(&boot, Guarantee::AtLeastOnce))
        .await
        .unwrap();
    let mut d = client
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .unwrap();
    for i in 0..30 {
        client
            .publish(
                &topic,
                Message::new(format!("{i}")).with_key(format!("k{i}")),
            )
            .await
            .unwrap();
    }
    // Process 30 messages but leave one unsettled in the middle of its partition.
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut held = None;
    for i in 0..30 {
        let delivery = d
            .next_timeout(Duration::from_secs(30))
            .await
            .expect("delivery")
            .unwrap();
        let Position::Offset { partition, offset } = delivery.position else {
            panic!()
        };
        if i == 10 {
            held = Some((partition, offset, delivery));
            continue;
        }
        if held.as_ref().is_none_or(|(p, _, _)| *p != partition) {
            next.insert(partition, offset + 1);
        }
        delivery.ack().await.unwrap();
    }
    let (held_p, held_o, held_d) = held.unwrap();
    next.insert(held_p, held_o); // the unsettled message is the committable position
    drop(held_d);
    d.close().await.unwrap();
    let bc: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &boot)
        .set("group.id", "g")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(&topic, p);
    }
    let committed = bc.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    for el in committed.elements() {
        // No commit means "from the beginning": the same as a committed 0.
        let expected = next.get(&el.partition()).copied().unwrap_or(0);
        let got = match el.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => 0,
        };
        assert_eq!(
            got,
            expected,
            "partition {}: committed {:?}, processed up to {:?}",
            el.partition(),
            got,
            expected
        );
    }
}
