//! Mined (documentation → code) pairs and their held-out split by file: no file contributes to both.
//! The mining itself parses code, so it lives with the code chunker (`sembed_index::mine`), which
//! cuts every language the index reads with the same rules.

use super::data::{Example, SplitMix64};
use std::collections::HashSet;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Mined {
    pub file: PathBuf,
    /// The definition's qualified symbol, as the code index names its chunk.
    pub symbol: Option<String>,
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

/// Hard-negative mining: for each pair, the functions a base model ranks nearest to the anchor that
/// are not its positive, as sentence-transformers' `mine_hard_negatives` does.
#[derive(Debug, Clone)]
pub struct HardNegatives {
    /// Negatives per pair.
    pub count: usize,
    /// A candidate scoring above `positive score × (1 − relative_margin)` is probably another right
    /// answer (a false negative) and is skipped.
    pub relative_margin: f32,
    /// A candidate this similar to the positive (cosine) is the same code written again: skipped.
    pub duplicate_cosine: f32,
    pub batch_size: usize,
}

impl Default for HardNegatives {
    fn default() -> Self {
        HardNegatives {
            count: 3,
            relative_margin: 0.05,
            duplicate_cosine: 0.98,
            batch_size: 32,
        }
    }
}

/// What the mining skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HardNegativeReport {
    pub pairs: usize,
    pub negatives: usize,
    /// Pairs that got fewer than asked (a small corpus, or every near candidate skipped).
    pub short: usize,
    pub skipped_false_negatives: usize,
    pub skipped_duplicates: usize,
}

/// Add up to `opts.count` hard negatives to every pair, from the other pairs' positives: anchors are
/// embedded as queries and positives as documents by `model`; for each anchor the candidates are taken
/// best first, skipping its own positive, identical code, near-duplicates of the positive and likely
/// false negatives (see [`HardNegatives`]).
pub fn add_hard_negatives(
    model: &dyn crate::embed::Embed,
    pairs: &mut [Mined],
    opts: &HardNegatives,
) -> crate::error::Result<HardNegativeReport> {
    use super::eval::dot;
    use crate::embed::{EmbedOptions, InputRole};
    let mut report = HardNegativeReport {
        pairs: pairs.len(),
        ..Default::default()
    };
    if pairs.is_empty() || opts.count == 0 {
        return Ok(report);
    }
    let embed = |texts: Vec<String>, role| {
        model.embed(
            &texts,
            &EmbedOptions {
                role: Some(role),
                batch_size: opts.batch_size,
                ..Default::default()
            },
        )
    };
    let anchors = embed(
        pairs.iter().map(|m| m.example.anchor.clone()).collect(),
        InputRole::Query,
    )?;
    let docs = embed(
        pairs.iter().map(|m| m.example.positive.clone()).collect(),
        InputRole::Document,
    )?;
    for i in 0..pairs.len() {
        let positive_score = dot(&anchors[i], &docs[i]);
        let ceiling = positive_score * (1.0 - opts.relative_margin);
        let mut scored: Vec<(f32, usize)> = (0..docs.len())
            .filter(|&j| j != i)
            .map(|j| (dot(&anchors[i], &docs[j]), j))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut chosen: Vec<String> = Vec::new();
        for (s, j) in scored {
            if chosen.len() == opts.count {
                break;
            }
            let text = &pairs[j].example.positive;
            if *text == pairs[i].example.positive
                || dot(&docs[i], &docs[j]) >= opts.duplicate_cosine
            {
                report.skipped_duplicates += 1;
                continue;
            }
            if s > ceiling {
                report.skipped_false_negatives += 1;
                continue;
            }
            if !chosen.contains(text) {
                chosen.push(text.clone());
            }
        }
        if chosen.len() < opts.count {
            report.short += 1;
        }
        report.negatives += chosen.len();
        pairs[i].example.negatives = chosen;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_never_shares_a_file() {
        let mined: Vec<Mined> = (0..40)
            .map(|i| Mined {
                file: PathBuf::from(format!("f{}.rs", i / 4)),
                symbol: None,
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

    /// Vectors fixed per text, at an angle (degrees) in the plane: cosines are known exactly.
    struct Angles(Vec<(&'static str, f32)>);

    impl crate::embed::Embed for Angles {
        fn embed_staged(
            &self,
            texts: &[String],
            _: &crate::embed::EmbedOptions,
            _: &mut crate::embed::Stages,
        ) -> crate::error::Result<Vec<Vec<f32>>> {
            Ok(texts
                .iter()
                .map(|t| {
                    let deg = self.0.iter().find(|(n, _)| n == t).expect("known text").1;
                    let r = deg.to_radians();
                    vec![r.cos(), r.sin()]
                })
                .collect())
        }
        fn encode(
            &self,
            _: &[String],
            _: &crate::embed::EmbedOptions,
        ) -> crate::error::Result<crate::embed::Encoded> {
            unreachable!()
        }
        fn embed_encoded(
            &self,
            _: &crate::embed::Encoded,
            _: &crate::embed::EmbedOptions,
            _: &mut crate::embed::Stages,
        ) -> crate::error::Result<Vec<Vec<f32>>> {
            unreachable!()
        }
        fn dimension(&self) -> usize {
            2
        }
        fn engine(&self) -> String {
            "test".into()
        }
        fn engine_reasons(&self) -> Vec<String> {
            vec![]
        }
        fn name(&self) -> &str {
            "angles"
        }
        fn knows_task(&self, _: &str) -> bool {
            false
        }
        fn max_length(&self) -> usize {
            512
        }
        fn task_names(&self) -> Vec<String> {
            vec![]
        }
    }

    fn pair(a: &str, p: &str) -> Mined {
        Mined {
            file: PathBuf::from("x.py"),
            symbol: None,
            example: Example {
                anchor: a.into(),
                positive: p.into(),
                negatives: vec![],
            },
        }
    }

    #[test]
    fn hard_negatives_skip_false_negatives_and_duplicates() {
        // The first anchor at 0°, its positive at 30° (cosine 0.866, so anything above
        // 0.866 × 0.95 = 0.823, i.e. nearer than ~34.6°, is a likely false negative).
        let model = Angles(vec![
            ("a0", 0.0),
            ("p0", 30.0),
            ("a1", 10.0),
            ("p1", 10.0), // nearer than the positive: a false negative
            ("a2", 31.0),
            ("p2", 31.0), // 1° from p0: the same code again
            ("a3", 50.0),
            ("p3", 50.0), // the best real negative
            ("a4", 70.0),
            ("p4", 70.0),
            ("a5", 90.0),
            ("p5", 90.0),
        ]);
        let mut pairs: Vec<Mined> = (0..6)
            .map(|i| pair(&format!("a{i}"), &format!("p{i}")))
            .collect();
        let opts = HardNegatives {
            count: 2,
            ..HardNegatives::default()
        };
        let report = add_hard_negatives(&model, &mut pairs, &opts).unwrap();
        assert_eq!(pairs[0].example.negatives, vec!["p3", "p4"]);
        // Never its own positive.
        for p in &pairs {
            assert!(!p.example.negatives.contains(&p.example.positive));
            assert_eq!(p.example.negatives.len(), 2);
        }
        assert!(report.skipped_false_negatives >= 1 && report.skipped_duplicates >= 1);
        assert_eq!((report.pairs, report.negatives, report.short), (6, 12, 0));
        // With no margin, the near candidate is taken.
        let mut pairs: Vec<Mined> = (0..6)
            .map(|i| pair(&format!("a{i}"), &format!("p{i}")))
            .collect();
        let loose = HardNegatives {
            count: 2,
            relative_margin: -1.0,
            ..HardNegatives::default()
        };
        add_hard_negatives(&model, &mut pairs, &loose).unwrap();
        assert_eq!(pairs[0].example.negatives, vec!["p1", "p3"]);
    }
}
