//! Mined (documentation → code) pairs and their held-out split by file: no file contributes to both.
//! The mining itself parses code, so it lives with the code chunker (`sembed_index::mine`), which
//! cuts every language the index reads with the same rules.

use super::data::{Example, SplitMix64};
use std::collections::HashSet;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Mined {
    pub file: PathBuf,
    pub example: Example,
}

/// Split by file: about `heldout_fraction` of the files (seeded) go to the held-out set.
pub fn split_by_file(
    mined: Vec<Mined>,
    heldout_fraction: f64,
    seed: u64,
) -> (Vec<Mined>, Vec<Mined>) {
    let mut files: Vec<PathBuf> = mined.iter().map(|m| m.file.clone()).collect();
    files.dedup();
    let mut order = files.clone();
    SplitMix64(seed).shuffle(&mut order);
    let n_held = ((files.len() as f64 * heldout_fraction).round() as usize)
        .clamp(usize::from(files.len() > 1), files.len().saturating_sub(1));
    let held: HashSet<PathBuf> = order.into_iter().take(n_held).collect();
    mined.into_iter().partition(|m| !held.contains(&m.file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_never_shares_a_file() {
        let mined: Vec<Mined> = (0..40)
            .map(|i| Mined {
                file: PathBuf::from(format!("f{}.rs", i / 4)),
                example: Example {
                    anchor: format!("a{i}"),
                    positive: format!("p{i}"),
                    negatives: vec![],
                },
            })
            .collect();
        let (train, held) = split_by_file(mined, 0.2, 1);
        assert!(!train.is_empty() && !held.is_empty());
        let tf: HashSet<_> = train.iter().map(|m| &m.file).collect();
        assert!(held.iter().all(|m| !tf.contains(&m.file)));
        assert_eq!(train.len() + held.len(), 40);
    }
}
