//! Request batching without timers, for backends that turn many concurrent
//! small calls into one request (SQS deletes).

use tokio::sync::mpsc;

/// Scheduler turns in a row that bring nothing new and end [`gather_ready`].
const IDLE_YIELDS: u32 = 4;

/// Let the tasks that are already runnable add their calls to `buf` before it goes out as one
/// request: yield to the scheduler and take what arrived on `rx`, until a few yields in a row
/// bring nothing new or `buf` holds `max` calls.
///
/// There is no timer: a lone call waits a few scheduler turns (microseconds), while calls made
/// together by concurrent handlers share one request instead of the first going out alone.
pub async fn gather_ready<T>(rx: &mut mpsc::UnboundedReceiver<T>, buf: &mut Vec<T>, max: usize) {
    let mut idle = 0;
    while buf.len() < max && idle < IDLE_YIELDS {
        tokio::task::yield_now().await;
        let before = buf.len();
        while buf.len() < max {
            match rx.try_recv() {
                Ok(r) => buf.push(r),
                Err(_) => break,
            }
        }
        idle = if buf.len() == before { idle + 1 } else { 0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takes_what_is_queued_up_to_max() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..25 {
            tx.send(i).unwrap();
        }
        let mut buf = Vec::new();
        gather_ready(&mut rx, &mut buf, 10).await;
        assert_eq!(buf, (0..10).collect::<Vec<_>>());
        let mut rest = Vec::new();
        gather_ready(&mut rx, &mut rest, 100).await;
        assert_eq!(rest.len(), 15);
    }

    #[tokio::test]
    async fn picks_up_calls_made_by_tasks_runnable_meanwhile() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..5 {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(i).unwrap() });
        }
        let mut buf = Vec::new();
        gather_ready(&mut rx, &mut buf, 10).await;
        buf.sort();
        assert_eq!(buf, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn returns_when_nothing_arrives() {
        let (_tx, mut rx) = mpsc::unbounded_channel::<u32>();
        let mut buf = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            gather_ready(&mut rx, &mut buf, 10),
        )
        .await
        .expect("gather_ready must return when nothing is queued");
        assert!(buf.is_empty());
    }
}
