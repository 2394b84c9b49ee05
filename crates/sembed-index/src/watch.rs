//! Keeping an index current: an [`Indexer`] runs [`index::run`] on demand (a refresh) or whenever
//! files change ([`Indexer::watch`]: file-system events through `notify`, debounced, so that a branch
//! switch of thousands of files is one run), and reports how stale the index is ([`Status`]).
//!
//! A run after events reads again only the files the events named (and every new or deleted file,
//! which the walk finds); when the event queue overflowed, every file. Events under hidden folders
//! (`.git`, `.sembed`, where the index itself is written) are not changes of the tree.

use crate::error::{Error, Result};
use crate::index::{self, IndexOptions, Progress, Report};
use crate::store::Store;
use sembed::embed::Embed;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a watcher waits for changes to settle.
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    /// Run once no event came for this long.
    pub quiet: Duration,
    /// ... or once the first unindexed change is this old, even if events keep coming.
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// Where an index stands.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// A watcher is running.
    pub watching: bool,
    /// A run is under way.
    pub running: bool,
    /// Runs finished (or failed).
    pub runs: u64,
    /// Chunks to embed in the run under way, and embedded so far.
    pub to_embed: usize,
    pub embedded: usize,
    /// When the last run finished, and what it did (or why it failed).
    pub finished: Option<Instant>,
    pub last: Option<Report>,
    pub last_seconds: f64,
    pub last_error: Option<String>,
    /// Changed paths seen and not yet indexed, and when the first of them changed.
    pub pending: usize,
    pub pending_since: Option<Instant>,
}

impl Status {
    /// Seconds since the oldest change the index does not hold yet (0: current, as far as events
    /// tell).
    pub fn stale_seconds(&self) -> f64 {
        self.pending_since
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "watching": self.watching,
            "running": self.running,
            "runs": self.runs,
            "to_embed": self.to_embed,
            "embedded": self.embedded,
            "indexed_seconds_ago": self.finished.map(|t| t.elapsed().as_secs_f64()),
            "last_run": self.last,
            "last_run_seconds": self.last_seconds,
            "last_error": self.last_error,
            "pending_changes": self.pending,
            "stale_seconds": self.stale_seconds(),
        })
    }
}

/// Runs indexing for one index, one run at a time, from a refresh or a watcher.
pub struct Indexer {
    target: String,
    opts: IndexOptions,
    model: Arc<dyn Embed>,
    store: Mutex<Box<dyn Store>>,
    status: Mutex<Status>,
    stop: Arc<AtomicBool>,
}

struct StatusProgress<'a>(&'a Mutex<Status>);

impl Progress for StatusProgress<'_> {
    fn start(&mut self, to_embed: usize) {
        let mut s = lock(self.0);
        s.to_embed = to_embed;
        s.embedded = 0;
    }
    fn embedded(&mut self, n: usize) {
        lock(self.0).embedded += n;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Indexer {
    /// An indexer of `opts` into `store` (its own connection: searches go on through another one)
    /// with `model`; `stop` interrupts a run (what is committed stays) and ends a watcher.
    pub fn new(
        target: String,
        store: Box<dyn Store>,
        model: Arc<dyn Embed>,
        opts: IndexOptions,
        stop: Arc<AtomicBool>,
    ) -> Indexer {
        Indexer {
            target,
            opts,
            model,
            store: Mutex::new(store),
            status: Mutex::new(Status::default()),
            stop,
        }
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    pub fn options(&self) -> &IndexOptions {
        &self.opts
    }

    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    /// One incremental run (`changed`: the hint of [`IndexOptions::changed`]); waits for a run under
    /// way to end first.
    pub fn run_once(&self, changed: Option<HashSet<PathBuf>>) -> Result<Report> {
        let mut store = lock(&self.store);
        let started = Instant::now();
        {
            let mut s = lock(&self.status);
            s.running = true;
            s.to_embed = 0;
            s.embedded = 0;
        }
        let mut opts = self.opts.clone();
        opts.changed = changed;
        let result = index::run(
            store.as_mut(),
            &self.target,
            self.model.as_ref(),
            &opts,
            &mut StatusProgress(&self.status),
            &self.stop,
        );
        let mut s = lock(&self.status);
        s.running = false;
        s.runs += 1;
        s.finished = Some(Instant::now());
        s.last_seconds = started.elapsed().as_secs_f64();
        match &result {
            Ok(r) => {
                s.last = Some(r.clone());
                s.last_error = None;
                if !r.interrupted {
                    // Changes seen before this run began are in it.
                    if s.pending_since.is_some_and(|t| t <= started) {
                        s.pending = 0;
                        s.pending_since = None;
                    }
                }
            }
            Err(e) => s.last_error = Some(e.to_string()),
        }
        result
    }

    /// Watch the roots and run whenever files change, until `stop`; `on_run` hears each run that
    /// changed something (or failed) and its seconds. Errors of a run are reported, not fatal: the
    /// next change runs again.
    pub fn watch(
        &self,
        debounce: Debounce,
        on_run: &mut dyn FnMut(&Result<Report>, f64),
    ) -> Result<()> {
        use notify::Watcher as _;
        let (tx, rx) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(tx)
            .map_err(|e| Error::Invalid(format!("watching files: {e}")))?;
        let roots: Vec<PathBuf> = self
            .opts
            .roots
            .iter()
            .map(|r| {
                r.canonicalize().map_err(|e| Error::Io {
                    path: r.display().to_string(),
                    source: e,
                })
            })
            .collect::<Result<_>>()?;
        for r in &roots {
            watcher
                .watch(r, notify::RecursiveMode::Recursive)
                .map_err(|e| Error::Invalid(format!("watching {}: {e}", r.display())))?;
        }
        lock(&self.status).watching = true;
        // Files changed before the watcher was installed (during a first run, say) sent no event:
        // one full run now catches them (it reads every file, embeds only what changed).
        let t = Instant::now();
        let first = self.run_once(None);
        let full_next = report_run(&first, t.elapsed().as_secs_f64(), on_run);
        let result = if self.stop.load(Ordering::Relaxed) {
            Ok(())
        } else {
            self.watch_loop(&rx, &roots, debounce, full_next, on_run)
        };
        lock(&self.status).watching = false;
        drop(watcher);
        result
    }

    fn watch_loop(
        &self,
        rx: &mpsc::Receiver<notify::Result<notify::Event>>,
        roots: &[PathBuf],
        debounce: Debounce,
        mut full_next: bool,
        on_run: &mut dyn FnMut(&Result<Report>, f64),
    ) -> Result<()> {
        let tick = Duration::from_millis(100)
            .min(debounce.quiet)
            .max(Duration::from_millis(1));
        loop {
            // Wait for the first change.
            let mut changed: HashSet<PathBuf> = HashSet::new();
            // After a failed or interrupted run the changes it held are not known to be indexed:
            // the next run reads every file.
            let mut rescan = std::mem::take(&mut full_next);
            let mut last_event = Instant::now();
            while changed.is_empty() && !rescan {
                if self.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                match rx.recv_timeout(tick) {
                    Ok(ev) => {
                        if take(ev, roots, &mut changed) {
                            rescan = true;
                        }
                        last_event = Instant::now();
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
            let first = Instant::now();
            {
                let mut s = lock(&self.status);
                s.pending_since.get_or_insert(first);
                s.pending = changed.len();
            }
            // Let the changes settle.
            while last_event.elapsed() < debounce.quiet && first.elapsed() < debounce.max_delay {
                if self.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                match rx.recv_timeout(tick) {
                    Ok(ev) => {
                        let before = changed.len();
                        if take(ev, roots, &mut changed) {
                            rescan = true;
                        }
                        if changed.len() != before || rescan {
                            last_event = Instant::now();
                            lock(&self.status).pending = changed.len();
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
            let t = Instant::now();
            let r = self.run_once((!rescan).then_some(changed));
            full_next = report_run(&r, t.elapsed().as_secs_f64(), on_run);
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
    }
}

/// Tell `on_run` of a run that changed something or failed; true when the run did not finish (an
/// error or an interruption), so that the next one must read every file.
fn report_run(r: &Result<Report>, secs: f64, on_run: &mut dyn FnMut(&Result<Report>, f64)) -> bool {
    let (did_something, unfinished) = match r {
        Ok(rep) => (
            rep.files_changed + rep.files_removed > 0 || rep.interrupted,
            rep.interrupted,
        ),
        Err(_) => (true, true),
    };
    if did_something {
        on_run(r, secs);
    }
    unfinished
}

/// Add the paths of one event that can be changes of the tree to `changed`; true when the watcher
/// lost events and every file must be read again.
fn take(
    ev: notify::Result<notify::Event>,
    roots: &[PathBuf],
    changed: &mut HashSet<PathBuf>,
) -> bool {
    let ev = match ev {
        Ok(ev) => ev,
        // An error of the watcher (a queue overflow, a watch lost): trust nothing.
        Err(_) => return true,
    };
    if ev.need_rescan() {
        return true;
    }
    if matches!(ev.kind, notify::EventKind::Access(_)) {
        return false;
    }
    for p in ev.paths {
        if in_tree(&p, roots) {
            changed.insert(p);
        }
    }
    false
}

/// Whether a path is under a root and under no hidden folder there (the walk leaves those out).
fn in_tree(p: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| {
        p.strip_prefix(r).is_ok_and(|rel| {
            !rel.components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::in_tree;
    use std::path::{Path, PathBuf};

    #[test]
    fn hidden_folders_and_other_trees_are_not_changes() {
        let roots = [PathBuf::from("/r/a")];
        assert!(in_tree(Path::new("/r/a/src/x.py"), &roots));
        assert!(!in_tree(Path::new("/r/a/.git/index"), &roots));
        assert!(!in_tree(Path::new("/r/a/.sembed/index.sqlite-wal"), &roots));
        assert!(!in_tree(Path::new("/r/a/src/.x.py.swp"), &roots));
        assert!(!in_tree(Path::new("/r/b/x.py"), &roots));
    }
}
