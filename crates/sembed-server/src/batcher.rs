//! Dynamic batching: requests are queued (bounded, in texts), and a dedicated thread per model takes
//! the oldest request plus every queued request that fits the token budget, runs one forward pass
//! for all of them, and answers each. Requests arrive tokenised (the route counted their tokens from
//! the same ids, so each request is tokenised once) and each sequence carries its own task adapter,
//! so requests with different roles, tasks or truncation share a batch. A request whose client has
//! gone (its reply channel closed) is dropped before it costs a forward pass. After a burst, once the
//! queue has been idle for a while, the engines give back their scratch memory.
//!
//! Faults stay contained: a panic inside a forward pass answers that batch's requests with an error
//! (500) and the worker goes on; if the worker dies anyway, a supervisor restarts it after
//! [`RESTART_DELAY`], and [`Batcher::alive`] is false (so `/health` answers 503) until it is back.

use crate::metrics::Metrics;
use sembed::embed::{Embed, EmbedOptions, Encoded};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

/// Options of the forward pass: post-processing (Matryoshka truncation, normalisation) is per
/// request, below.
fn forward_options() -> EmbedOptions {
    EmbedOptions {
        normalize: false,
        dimensions: None,
        // Length-sorted sub-batches: one mega-batch would unbalance the threads.
        batch_size: 32,
        ..Default::default()
    }
}

/// How long the queue stays empty before the engines give back their scratch memory.
pub const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a dead worker stays down before its supervisor restarts it.
pub const RESTART_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

pub type Reply = Result<Vec<Vec<f32>>, String>;

/// The message of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

pub struct Job {
    /// The request's token ids, as counted.
    pub encoded: Encoded,
    pub tokens: usize,
    pub dimensions: Option<usize>,
    pub normalize: bool,
    pub reply: oneshot::Sender<Reply>,
    pub enqueued: Instant,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    queued_texts: usize,
    shutdown: bool,
}

/// The queue of one model and its worker thread.
pub struct Batcher {
    state: Mutex<State>,
    ready: Condvar,
    paused: AtomicBool,
    /// The worker is running (false between its death and its restart).
    alive: AtomicBool,
    max_queue_texts: usize,
    max_batch_tokens: usize,
    model_name: String,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
pub struct Overloaded;

impl Batcher {
    pub fn start(
        name: &str,
        model: Arc<dyn Embed>,
        max_queue_texts: usize,
        max_batch_tokens: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let b = Arc::new(Batcher {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            paused: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            max_queue_texts,
            max_batch_tokens,
            model_name: name.to_string(),
            metrics,
        });
        b.metrics.queue_size.with_label_values(&[name]).set(0);
        let worker = b.clone();
        std::thread::Builder::new()
            .name(format!("model-{name}"))
            .spawn(move || worker.supervise(model))
            .expect("spawn model thread");
        b
    }

    /// The queue. A panic while its lock was held poisons it; the queue itself is still sound
    /// (every change to it is complete before anything that can panic runs), so take it anyway.
    fn queue(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the worker is running.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Run the worker; restart it whenever it dies of a panic, until shutdown.
    fn supervise(&self, model: Arc<dyn Embed>) {
        loop {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&model)));
            let Err(p) = run else { return };
            self.alive.store(false, Ordering::SeqCst);
            self.metrics.worker_restarts.inc();
            tracing::error!(model = %self.model_name, panic = %panic_message(&*p), "model worker died; restarting");
            std::thread::sleep(RESTART_DELAY);
            self.state.clear_poison();
            self.alive.store(true, Ordering::SeqCst);
        }
    }

    /// Queue a job, or refuse at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), Overloaded> {
        let mut s = self.queue();
        if s.queued_texts + job.encoded.len() > self.max_queue_texts && !s.jobs.is_empty() {
            return Err(Overloaded);
        }
        s.queued_texts += job.encoded.len();
        s.jobs.push_back(job);
        self.metrics
            .queue_size
            .with_label_values(&[&self.model_name])
            .set(s.queued_texts as i64);
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// Stop taking work from the queue (requests still queue up, and overflow answers 429). For
    /// operations (draining) and for tests that need a full queue deterministically.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.ready.notify_all();
    }

    pub fn shutdown(&self) {
        self.queue().shutdown = true;
        self.ready.notify_all();
    }

    /// The next batch, waiting for one; `held` says the engines hold scratch from earlier work,
    /// which `release` gives back once the queue has been idle for [`IDLE_RELEASE`].
    fn next_batch(&self, held: &mut bool, release: &dyn Fn()) -> Option<Vec<Job>> {
        let mut s = self.queue();
        loop {
            if s.shutdown && s.jobs.is_empty() {
                return None;
            }
            if !s.jobs.is_empty() && !self.paused.load(Ordering::SeqCst) {
                break;
            }
            if *held {
                let (guard, wait) = self
                    .ready
                    .wait_timeout(s, IDLE_RELEASE)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                s = guard;
                if wait.timed_out() && s.jobs.is_empty() {
                    drop(s);
                    release();
                    *held = false;
                    s = self.queue();
                }
            } else {
                s = self
                    .ready
                    .wait(s)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
        let mut batch: Vec<Job> = Vec::new();
        let mut tokens = 0;
        let mut i = 0;
        while i < s.jobs.len() {
            let job = &s.jobs[i];
            if job.reply.is_closed() {
                let job = s.jobs.remove(i).expect("index in range");
                s.queued_texts -= job.encoded.len();
                self.metrics
                    .requests
                    .with_label_values(&["cancelled"])
                    .inc();
                continue;
            }
            let fits = batch.is_empty() || tokens + job.tokens <= self.max_batch_tokens;
            if fits {
                let job = s.jobs.remove(i).expect("index in range");
                s.queued_texts -= job.encoded.len();
                tokens += job.tokens;
                batch.push(job);
            } else {
                i += 1;
            }
        }
        self.metrics
            .queue_size
            .with_label_values(&[&self.model_name])
            .set(s.queued_texts as i64);
        Some(batch)
    }

    fn run(&self, model: &Arc<dyn Embed>) {
        let mut held = false;
        let release = || {
            model.release_memory();
            tracing::debug!(model = %self.model_name, "idle: scratch memory given back");
        };
        while let Some(mut batch) = self.next_batch(&mut held, &release) {
            if batch.is_empty() {
                continue;
            }
            held = true;
            let started = Instant::now();
            for job in &batch {
                self.metrics
                    .stage_seconds
                    .with_label_values(&["queue"])
                    .observe(started.duration_since(job.enqueued).as_secs_f64());
            }
            // Each job's size is kept for splitting the answer; its ids move into the batch.
            let sizes: Vec<usize> = batch.iter().map(|j| j.encoded.len()).collect();
            let mut encoded = Encoded::default();
            let mut joined = Ok(());
            for job in &mut batch {
                if joined.is_ok() {
                    joined = encoded.append(std::mem::take(&mut job.encoded));
                }
            }
            let tokens: usize = batch.iter().map(|j| j.tokens).sum();
            self.metrics.batch_size.observe(encoded.len() as f64);
            self.metrics.batch_tokens.observe(tokens as f64);
            let result = joined.and_then(|()| {
                // A panic in the model answers this batch with an error; the worker goes on.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    model.embed_encoded(&encoded, &forward_options(), &mut Default::default())
                }))
                .unwrap_or_else(|p| {
                    self.metrics.model_panics.inc();
                    Err(sembed::Error::Internal(format!(
                        "the model panicked: {}",
                        panic_message(&*p)
                    )))
                })
            });
            self.metrics
                .stage_seconds
                .with_label_values(&["inference"])
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(vectors) => {
                    let mut vectors = vectors.into_iter();
                    for (job, size) in batch.into_iter().zip(sizes) {
                        let mut mine: Vec<Vec<f32>> = vectors.by_ref().take(size).collect();
                        if let Some(d) = job.dimensions {
                            mine.iter_mut().for_each(|v| v.truncate(d));
                        }
                        if job.normalize {
                            sembed::pool::normalize_rows(&mut mine);
                        }
                        let _ = job.reply.send(Ok(mine));
                    }
                }
                Err(e) => {
                    tracing::error!(model = %self.model_name, error = %e, "batch failed");
                    for job in batch {
                        let _ = job.reply.send(Err(e.to_string()));
                    }
                }
            }
        }
    }
}
