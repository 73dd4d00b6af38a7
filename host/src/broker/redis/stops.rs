//! Stop requests pushed to every host. A running job learns that it was
//! cancelled when its worker renews its lease, up to a third of the lease
//! later (10 s with the default lease); so that a cancel (`celer cancel`,
//! `DELETE /api/jobs/{id}`, a Celery `revoke(terminate=True)`) stops the
//! job at once, the cancel is also PUBLISHed on `<prefix>stop-requests`,
//! and every worker hears it and renews that job's lease right away (the
//! renewal, not the message, is what stops the job: a stray message
//! cannot). A message lost while a host reconnects only costs the wait
//! for the next renewal.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::conn::{Conn, Target};

/// The channel stop requests are published on.
pub(super) fn channel(prefix: &str) -> String {
    format!("{prefix}stop-requests")
}

/// Tells every listening host that job `id` should stop; best effort.
pub(super) async fn publish(mut conn: Conn, channel: &str, id: &str) {
    let sent: Result<i64, _> = ::redis::cmd("PUBLISH").arg(channel).arg(id).query_async(&mut conn).await;
    if let Err(e) = sent {
        tracing::debug!(job_id = id, error = %e, "stop request not published; the job stops at its next lease renewal");
    }
}

/// Forwards the stop requests heard on `channel` to `to`, reconnecting
/// when Redis goes away, until the broker drops (the task is aborted).
pub(super) async fn listen(target: Target, channel: String, to: broadcast::Sender<String>) {
    // On a cluster, a message published on any node reaches subscribers on
    // all: any node will do, the next one when one fails.
    let urls = match &target {
        Target::Single(url) => vec![url.clone()],
        Target::Cluster(nodes) => nodes.clone(),
    };
    let mut failures = 0usize;
    loop {
        let Some(url) = urls.get(failures % urls.len().max(1)) else { return };
        let subscribed = async {
            let client = ::redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(5), subscribed).await {
            Ok(Ok(pubsub)) => {
                if failures > 0 {
                    tracing::info!(channel, "subscribed to stop requests again");
                }
                failures = 0;
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    if let Ok(id) = message.get_payload::<String>() {
                        // No receiver left: nothing runs here to stop.
                        let _ = to.send(id);
                    }
                }
                tracing::debug!(channel, "stop requests: connection lost; subscribing again");
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                // Once per outage; the next tries quietly.
                if failures == 0 {
                    tracing::warn!(error, channel, "cannot subscribe to stop requests; running jobs stop at their next lease renewal until it works again");
                } else {
                    tracing::debug!(error, channel, "still cannot subscribe to stop requests");
                }
                failures += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
