//! Progress bars on stderr for the long commands (`embed`, `eval`, `mine`): rate and ETA, only when
//! stderr is a terminal and `--quiet` is not given, never on stdout (where results go).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sembed::embed::{Embed, EmbedOptions, Encoded, Stages};
use std::io::IsTerminal;

/// A bar of `len` `unit`s, or `None` (quiet, or stderr is not a terminal).
pub fn bar(len: u64, unit: &str, quiet: bool) -> Option<ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(s) = ProgressStyle::with_template(&format!(
        "{{bar:40}} {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}"
    )) {
        b.set_style(s);
    }
    Some(b)
}

/// Texts per step of a progress bar: large enough that each step still batches by length.
fn chunk(opts: &EmbedOptions) -> usize {
    (opts.batch_size.max(1) * 8).max(256)
}

/// A model that embeds in chunks and moves a bar as they finish; every call adds its texts to the
/// bar's length (`eval` embeds queries, then documents, then negatives).
pub struct Progressed<'a> {
    pub inner: &'a dyn Embed,
    pub bar: Option<ProgressBar>,
}

impl Embed for Progressed<'_> {
    fn embed_staged(
        &self,
        texts: &[String],
        opts: &EmbedOptions,
        stages: &mut Stages,
    ) -> sembed::Result<Vec<Vec<f32>>> {
        let Some(bar) = &self.bar else {
            return self.inner.embed_staged(texts, opts, stages);
        };
        bar.inc_length(texts.len() as u64);
        let mut out = Vec::with_capacity(texts.len());
        for part in texts.chunks(chunk(opts)) {
            out.extend(self.inner.embed_staged(part, opts, stages)?);
            bar.inc(part.len() as u64);
        }
        Ok(out)
    }
    fn encode(&self, texts: &[String], opts: &EmbedOptions) -> sembed::Result<Encoded> {
        self.inner.encode(texts, opts)
    }
    fn embed_encoded(
        &self,
        encoded: &Encoded,
        opts: &EmbedOptions,
        stages: &mut Stages,
    ) -> sembed::Result<Vec<Vec<f32>>> {
        self.inner.embed_encoded(encoded, opts, stages)
    }
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }
    fn engine(&self) -> String {
        self.inner.engine()
    }
    fn engine_reasons(&self) -> Vec<String> {
        self.inner.engine_reasons()
    }
    fn release_memory(&self) {
        self.inner.release_memory()
    }
    fn models(&self) -> usize {
        self.inner.models()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn knows_task(&self, task: &str) -> bool {
        self.inner.knows_task(task)
    }
    fn max_length(&self) -> usize {
        self.inner.max_length()
    }
    fn task_names(&self) -> Vec<String> {
        self.inner.task_names()
    }
}

impl Drop for Progressed<'_> {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
