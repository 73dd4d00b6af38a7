//! Stop requests pushed to every host. A running job learns that it was
//! cancelled when its worker renews its lease, up to a third of the lease
//! later (10 s with the default lease); so that a cancel (`celer cancel`,
//! `DELETE /api/jobs/{id}`, a Celery `revoke(terminate=True)`) stops the
//! job at once, the cancel is also PUBLISHed on `<prefix>stop-requests`,
//! and every worker hears it and renews that job's lease right away (the
//! renewal, not the message, is what stops the job: a stray message
//! cannot). A message lost while a host reconnects only costs the wait
//! for the next renewal.

use tokio::sync::broadcast;

use super::conn::{Conn, Target};
use super::pubsub;

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
    let urls = match target {
        Target::Single(url) => vec![url],
        Target::Cluster(nodes) => nodes,
    };
    let purpose = pubsub::Purpose { what: "stop requests", meanwhile: "running jobs stop at their next lease renewal" };
    pubsub::listen(urls, channel, purpose, None, |payload| {
        if let Ok(id) = String::from_utf8(payload) {
            // No receiver left: nothing runs here to stop.
            let _ = to.send(id);
        }
        std::future::ready(())
    })
    .await;
}
