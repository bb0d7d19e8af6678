//! The daemon's stop signal as every background task sees it (modelled on mini-redis's
//! `Shutdown`): [`Trigger::fire`] once, and every [`Shutdown`] clone's [`Shutdown::recv`]
//! resolves — at once for a task that starts or asks after the signal.

use tokio::sync::watch;

/// Fires the stop signal (held by the daemon's main task).
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Listens for the stop signal. Cheap to clone; one per task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A trigger and its first listener.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Signals every listener, now and later.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// A new listener.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// True once the signal has fired.
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when the signal fires (at once if it already has, or if the trigger is gone).
    pub async fn recv(&mut self) {
        // An error means the trigger was dropped: that is a stop too.
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_listener_hears_it_once_fired_even_late_ones() {
        let (trigger, mut early) = channel();
        assert!(!early.is_shutdown());
        let waiting = tokio::spawn(async move {
            early.recv().await;
            early.is_shutdown()
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        trigger.fire();
        assert!(waiting.await.unwrap());
        let mut late = trigger.subscribe();
        tokio::time::timeout(Duration::from_secs(1), late.recv()).await.expect("at once");
        // Receiving again returns again (a loop that checks after every step stops).
        tokio::time::timeout(Duration::from_secs(1), late.recv()).await.expect("again");
    }

    #[tokio::test]
    async fn a_dropped_trigger_is_a_stop() {
        let (trigger, mut s) = channel();
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(1), s.recv()).await.expect("resolves");
    }
}
