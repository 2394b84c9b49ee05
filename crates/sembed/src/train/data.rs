//! Training data: JSONL pairs `{"anchor","positive"}` and triplets `{"anchor","positive","negative"}`
//! (optionally `"negatives": [...]`), a seeded shuffle, and a batch sampler that never puts the same
//! text twice in one batch (a duplicate would be a false in-batch negative).

use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub anchor: String,
    pub positive: String,
    pub negatives: Vec<String>,
}

impl Example {
    fn texts(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.anchor)
            .chain(std::iter::once(&self.positive))
            .chain(self.negatives.iter())
    }
}

/// Read a JSONL file of examples. Every line must be an object with string `anchor` and `positive`;
/// `negative` (string) and `negatives` (array of strings) are optional; other fields are ignored.
/// A malformed line is an error naming the file and line; blank lines are errors too.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Error::InvalidInput(format!("{}:{line}: not valid UTF-8", path.display()))
    })?;
    let mut out = Vec::new();
    for (i, line) in text
        .strip_suffix('\n')
        .unwrap_or(&text)
        .split('\n')
        .enumerate()
    {
        if text.is_empty() {
            break;
        }
        let line = line.strip_suffix('\r').unwrap_or(line);
        let bad = |m: &str| Error::InvalidInput(format!("{}:{}: {m}", path.display(), i + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("not a JSON object: {e}")))?;
        let field = |k: &str| -> Result<Option<String>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(&format!("field `{k}` is not a string"))),
            }
        };
        let anchor = field("anchor")?.ok_or_else(|| bad("no field `anchor`"))?;
        let positive = field("positive")?.ok_or_else(|| bad("no field `positive`"))?;
        let mut negatives: Vec<String> = field("negative")?.into_iter().collect();
        match v.get("negatives") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for n in a {
                    negatives.push(
                        n.as_str()
                            .ok_or_else(|| bad("`negatives` must hold strings"))?
                            .to_string(),
                    );
                }
            }
            Some(_) => return Err(bad("`negatives` must be an array of strings")),
        }
        out.push(Example {
            anchor,
            positive,
            negatives,
        });
    }
    if out.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: no examples",
            path.display()
        )));
    }
    Ok(out)
}

pub use crate::rng::SplitMix64;

/// The batches of one epoch: a seeded shuffle (seed and epoch fix it), then greedy filling that skips
/// an example whose texts already appear in the batch (it goes to a later batch).
pub fn epoch_batches(
    examples: &[Example],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    SplitMix64(seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut order);
    let mut batches = Vec::new();
    let mut remaining = order;
    while !remaining.is_empty() {
        let mut batch = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut rest = Vec::new();
        for i in remaining {
            let ex = &examples[i];
            if batch.len() < batch_size.max(1) && ex.texts().all(|t| !seen.contains(t.as_str())) {
                seen.extend(ex.texts().map(|t| t.as_str()));
                batch.push(i);
            } else {
                rest.push(i);
            }
        }
        if batch.is_empty() {
            // An example that repeats its own text (anchor == positive) still gets a batch.
            batch.push(rest.remove(0));
        }
        batches.push(batch);
        remaining = rest;
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(a: &str, p: &str) -> Example {
        Example {
            anchor: a.into(),
            positive: p.into(),
            negatives: vec![],
        }
    }

    #[test]
    fn batches_never_repeat_a_text_and_cover_everything_once() {
        // Positives repeat too (d0..d9), and some equal an anchor (`q3`): a batch must hold no text
        // twice, whichever side it is on.
        let examples: Vec<Example> = (0..50)
            .map(|i| {
                let positive = if i % 11 == 0 {
                    "q3".to_string()
                } else {
                    format!("d{}", i % 10)
                };
                ex(&format!("q{}", i % 7), &positive)
            })
            .collect();
        let batches = epoch_batches(&examples, 8, 42, 0);
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
        for b in &batches {
            let mut texts = HashSet::new();
            for &i in b {
                assert!(
                    texts.insert(&examples[i].anchor),
                    "duplicate anchor in a batch"
                );
                assert!(
                    texts.insert(&examples[i].positive),
                    "a positive seen twice in a batch"
                );
            }
        }
        assert_eq!(epoch_batches(&examples, 8, 42, 0), batches, "seeded");
        assert_ne!(epoch_batches(&examples, 8, 42, 1), batches, "epochs differ");
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"anchor\":\"a\",\"positive\":\"b\",\"negative\":\"c\"}\n{\"anchor\":\"a\"}\n",
        )
        .unwrap();
        let e = read_examples(&p).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2: no field `positive`"), "{e}");
        std::fs::write(
            &p,
            "{\"anchor\":\"a\",\"positive\":\"b\",\"negatives\":[\"x\",\"y\"]}\n\n",
        )
        .unwrap();
        let e = read_examples(&p).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2: not a JSON object"), "{e}");
        std::fs::write(
            &p,
            "{\"anchor\":\"a\",\"positive\":\"b\",\"negatives\":[\"x\",\"y\"],\"id\":3}\n",
        )
        .unwrap();
        assert_eq!(read_examples(&p).unwrap()[0].negatives, vec!["x", "y"]);
    }
}
