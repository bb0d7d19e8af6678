//! Writing a reply [`Plan`] into a response body channel, frame by frame, with its delays, and
//! noticing when the client goes away.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;

use super::reply::{Plan, Segment, event_frame, fragments};
use super::server::ConnCtl;
use super::state::{Shared, StreamEnd};

/// Frames buffered between the writer and the connection.
pub(super) const CHANNEL_FRAMES: usize = 16;

/// The client went away (the body's receiver was dropped).
#[derive(Debug)]
struct Gone;

/// Counts the stream open while it lives; closes it as cancelled unless told otherwise (a task
/// aborted at runtime shutdown counts as cancelled too).
struct OpenStream {
    shared: Arc<Shared>,
    client_id: String,
    end: StreamEnd,
}

impl OpenStream {
    fn new(shared: Arc<Shared>, client_id: String) -> Self {
        shared.stream_opened(&client_id);
        OpenStream { shared, client_id, end: StreamEnd::Cancelled }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.shared.stream_closed(&self.client_id, self.end);
    }
}

/// Writes `plan` into `tx`; run as its own task, it ends when the plan does or the client goes.
pub(super) async fn write(
    plan: Plan,
    tx: mpsc::Sender<Bytes>,
    shared: Arc<Shared>,
    client_id: String,
    conn: Arc<ConnCtl>,
) {
    let mut open = OpenStream::new(shared.clone(), client_id.clone());
    let mut writer = Writer { tx, delay: plan.frame_delay, work: shared.opts.frame_work, started: false };
    match writer.run(plan, &conn, &shared, &client_id).await {
        Ok(()) => open.end = StreamEnd::Completed,
        Err(Gone) => tracing::debug!(client_id = %open.client_id, "emulator: client went away mid-stream"),
    }
}

struct Writer {
    tx: mpsc::Sender<Bytes>,
    delay: Duration,
    /// [`EmulatorOptions::frame_work`](super::EmulatorOptions).
    work: Duration,
    started: bool,
}

impl Writer {
    async fn run(
        &mut self,
        plan: Plan,
        conn: &ConnCtl,
        shared: &Shared,
        client_id: &str,
    ) -> Result<(), Gone> {
        let model = plan.model_id;
        for segment in plan.segments {
            match segment {
                Segment::Frame(frame) => self.frame(frame).await?,
                Segment::Text(text) => {
                    for fragment in fragments(&text) {
                        let mut payload = json!({ "content": fragment });
                        if let Some(model) = &model {
                            payload["modelId"] = json!(model);
                        }
                        self.frame(event_frame("assistantResponseEvent", &payload)).await?;
                    }
                }
                Segment::Reasoning { text, signature, split_signature } => {
                    for fragment in fragments(&text) {
                        self.frame(event_frame("reasoningContentEvent", &json!({ "text": fragment })))
                            .await?;
                    }
                    let pieces: Vec<&str> =
                        if split_signature { fragments(&signature).collect() } else { vec![&signature] };
                    for piece in pieces {
                        self.frame(event_frame("reasoningContentEvent", &json!({ "signature": piece })))
                            .await?;
                    }
                }
                Segment::Redacted(content) => {
                    self.frame(event_frame("reasoningContentEvent", &json!({ "redactedContent": content })))
                        .await?;
                }
                Segment::Metered { frame, credits } => {
                    // Counted as the frame is handed over: a client that has read it sees it
                    // counted.
                    shared.add_credits(client_id, credits);
                    self.frame(frame).await?;
                }
                Segment::ToolUse { id, name, input, stop } => {
                    let event = |extra: serde_json::Value| {
                        let mut payload = json!({ "toolUseId": id, "name": name });
                        if let (Some(payload), serde_json::Value::Object(extra)) =
                            (payload.as_object_mut(), extra)
                        {
                            payload.extend(extra);
                        }
                        event_frame("toolUseEvent", &payload)
                    };
                    self.frame(event(json!({}))).await?;
                    for fragment in fragments(&input) {
                        self.frame(event(json!({ "input": fragment }))).await?;
                    }
                    if stop {
                        self.frame(event(json!({ "stop": true }))).await?;
                    }
                }
                Segment::Silence(d) => self.sleep(d).await?,
                Segment::Reset => {
                    self.drained().await?;
                    // Let the connection flush what it took from the channel, then cut it.
                    self.sleep(Duration::from_millis(30)).await?;
                    conn.kill();
                    // Hold the body open until the connection is gone: ending it here would let
                    // the connection finish the response cleanly first.
                    let _ = tokio::time::timeout(Duration::from_secs(5), self.tx.closed()).await;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Sends one frame, after the plan's delay unless it is the first.
    async fn frame(&mut self, frame: Bytes) -> Result<(), Gone> {
        if self.started && !self.delay.is_zero() {
            self.sleep(self.delay).await?;
        }
        self.started = true;
        if self.work.is_zero() {
            return self.tx.send(frame).await.map_err(|_| Gone);
        }
        let t0 = std::time::Instant::now();
        while t0.elapsed() < self.work {
            std::hint::spin_loop();
        }
        self.tx.send(frame).await.map_err(|_| Gone)?;
        // Let the connection write this frame before the next one is made.
        tokio::task::yield_now().await;
        Ok(())
    }

    /// Sleeps, returning early if the client goes away.
    async fn sleep(&self, d: Duration) -> Result<(), Gone> {
        tokio::select! {
            () = tokio::time::sleep(d) => Ok(()),
            () = self.tx.closed() => Err(Gone),
        }
    }

    /// Waits until the connection has taken every frame from the channel.
    async fn drained(&self) -> Result<(), Gone> {
        while self.tx.capacity() < self.tx.max_capacity() {
            self.sleep(Duration::from_millis(2)).await?;
        }
        Ok(())
    }
}
