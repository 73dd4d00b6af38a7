//! One pub/sub subscription kept alive: subscribe, hand every message on,
//! and when the connection drops or cannot be made, subscribe again a
//! second later (on a cluster, through the next node: a message published
//! on any node reaches subscribers on all). A failure is logged once per
//! outage, with what goes without meanwhile. Stop requests
//! ([`super::stops`]) and Celery's remote control (`celery::control`)
//! listen this way.

use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;

/// How long a subscription may take before it counts as failed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The wait before subscribing again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a subscription is for, as its log lines say it.
pub struct Purpose {
    /// What listens, e.g. "stop requests".
    pub what: &'static str,
    /// What goes without while it cannot subscribe.
    pub meanwhile: &'static str,
}

/// Subscribes to `channel` on one of `urls` and passes each message's
/// payload to `on_message`, one at a time, until `stop` turns true (or,
/// without `stop`, until the task is aborted).
pub async fn listen<F, Fut>(urls: Vec<String>, channel: String, purpose: Purpose, mut stop: Option<watch::Receiver<bool>>, mut on_message: F)
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: Future<Output = ()>,
{
    let Purpose { what, meanwhile } = purpose;
    let mut failures = 0usize;
    loop {
        if stop.as_ref().is_some_and(|s| *s.borrow()) {
            return;
        }
        let Some(url) = urls.get(failures % urls.len().max(1)) else { return };
        let subscribed = async {
            let client = ::redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        };
        let attempt = tokio::select! {
            r = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribed) => r,
            _ = stopped(&mut stop) => return,
        };
        match attempt {
            Ok(Ok(pubsub)) => {
                if failures > 0 {
                    tracing::info!(channel, "{what}: subscribed again");
                }
                failures = 0;
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        m = messages.next() => m,
                        _ = stopped(&mut stop) => return,
                    };
                    let Some(message) = message else { break };
                    on_message(message.get_payload_bytes().to_vec()).await;
                }
                tracing::debug!(channel, "{what}: connection lost; subscribing again");
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                // Once per outage; the next tries quietly.
                if failures == 0 {
                    tracing::warn!(error, channel, "{what}: cannot subscribe; {meanwhile} until it works again");
                } else {
                    tracing::debug!(error, channel, "{what}: still cannot subscribe");
                }
                failures += 1;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_AFTER) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Resolves when `stop` changes (or its sender is gone); never without one.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        Some(s) => {
            let _ = s.changed().await;
        }
        None => std::future::pending().await,
    }
}
