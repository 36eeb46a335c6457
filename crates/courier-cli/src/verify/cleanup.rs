//! After a run: remove what `verify` created on the broker (its destination, dead-letter
//! destination and consumer group) through the backend's own `delete_destination`, so runs do
//! not pile up `verify-…` queues and topics. Not done for `--destination` (the user's) or with
//! `--keep`.

use std::time::Duration;

use anyhow::{anyhow, Result};

use courier::{Config, Guarantee};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Remove the run's `dest` with its `group`, and `dlq`, from the broker of `config`; what was
/// removed. Something already gone is not an error. Bounded as a whole: a broker that stops
/// answering leaves the run's destinations behind, it does not hold the report back.
pub(super) async fn remove(
    config: &Config,
    dest: &str,
    dlq: &str,
    group: &str,
) -> Result<Vec<String>> {
    tokio::time::timeout(TIMEOUT, async {
        // Removing needs no transactions: connect without exactly-once's producer set-up.
        let mut config = config.clone();
        config.guarantee = Guarantee::AtLeastOnce;
        let client = courier::connect(&config).await?;
        let mut removed = client.delete_destination(dest, &[group]).await?;
        removed.extend(client.delete_destination(dlq, &[]).await?);
        client.close().await?;
        Ok(removed)
    })
    .await
    .map_err(|_| anyhow!("the broker did not answer within {TIMEOUT:?}"))?
}
