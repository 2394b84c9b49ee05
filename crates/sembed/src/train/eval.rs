//! Retrieval evaluation as sentence-transformers' InformationRetrievalEvaluator defines it (cosine
//! scores; MRR@10, NDCG@10, Recall@1/10 (its accuracy@k with one relevant document), MAP@100), and
//! triplet accuracy.

use crate::embed::{Embed, EmbedOptions, InputRole};
use crate::error::Result;
use crate::train::data::Example;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetrievalMetrics {
    pub queries: usize,
    pub corpus: usize,
    pub mrr_at_10: f64,
    pub ndcg_at_10: f64,
    pub recall_at_1: f64,
    pub recall_at_10: f64,
    pub map_at_100: f64,
    /// Fraction of examples with a negative where cos(anchor, positive) > cos(anchor, negative).
    pub triplet_accuracy: Option<f64>,
}

/// Metrics from a score matrix `scores[q][d]` and each query's set of relevant documents.
pub fn retrieval_metrics(scores: &[Vec<f32>], relevant: &[Vec<usize>]) -> RetrievalMetrics {
    let (mut mrr, mut ndcg, mut r1, mut r10, mut map) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (row, rel) in scores.iter().zip(relevant) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        // Descending score; ties by index for determinism.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let is_rel = |d: usize| rel.contains(&d);
        if let Some(rank) = order.iter().take(10).position(|&d| is_rel(d)) {
            mrr += 1.0 / (rank as f64 + 1.0);
        }
        let dcg: f64 = order
            .iter()
            .take(10)
            .enumerate()
            .filter(|(_, &d)| is_rel(d))
            .map(|(i, _)| 1.0 / (i as f64 + 2.0).log2())
            .sum();
        let idcg: f64 = (0..rel.len().min(10))
            .map(|i| 1.0 / (i as f64 + 2.0).log2())
            .sum();
        if idcg > 0.0 {
            ndcg += dcg / idcg;
        }
        let hits = |k: usize| {
            order.iter().take(k).filter(|&&d| is_rel(d)).count() as f64 / rel.len().max(1) as f64
        };
        r1 += hits(1);
        r10 += hits(10);
        let mut found = 0.0;
        let mut ap = 0.0;
        for (i, &d) in order.iter().take(100).enumerate() {
            if is_rel(d) {
                found += 1.0;
                ap += found / (i as f64 + 1.0);
            }
        }
        map += ap / rel.len().clamp(1, 100) as f64;
    }
    let n = scores.len().max(1) as f64;
    RetrievalMetrics {
        queries: scores.len(),
        corpus: scores.first().map_or(0, |r| r.len()),
        mrr_at_10: mrr / n,
        ndcg_at_10: ndcg / n,
        recall_at_1: r1 / n,
        recall_at_10: r10 / n,
        map_at_100: map / n,
        triplet_accuracy: None,
    }
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Queries embedded with the query role (or `task`), the corpus with the document role (or `task`),
/// and `scores[q][d]`, their dot products (cosines: the vectors are unit length).
pub type Scored = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>);

/// The vectors of `queries` and `corpus` and their score matrix (see [`Scored`]).
pub fn score_matrix(
    model: &dyn Embed,
    queries: &[String],
    corpus: &[String],
    task: Option<&str>,
    batch_size: usize,
) -> Result<Scored> {
    let opts = |role| EmbedOptions {
        role: if task.is_some() { None } else { Some(role) },
        task: task.map(str::to_string),
        batch_size,
        ..Default::default()
    };
    let q = model.embed(queries, &opts(InputRole::Query))?;
    let d = model.embed(corpus, &opts(InputRole::Document))?;
    let scores = q
        .iter()
        .map(|qv| d.iter().map(|dv| dot(qv, dv)).collect())
        .collect();
    Ok((q, d, scores))
}

/// Evaluate retrieval on pairs: every anchor is a query, the corpus is the set of distinct positives,
/// and a query's relevant document is its own positive. Anchors are embedded with the query role (or
/// `task`), documents with the document role (or `task`).
pub fn evaluate(
    model: &dyn Embed,
    examples: &[Example],
    task: Option<&str>,
    batch_size: usize,
) -> Result<RetrievalMetrics> {
    let mut corpus: Vec<String> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut relevant = Vec::new();
    for ex in examples {
        let id = *index.entry(ex.positive.clone()).or_insert_with(|| {
            corpus.push(ex.positive.clone());
            corpus.len() - 1
        });
        relevant.push(vec![id]);
    }
    let opts = |role| EmbedOptions {
        role: if task.is_some() { None } else { Some(role) },
        task: task.map(str::to_string),
        batch_size,
        ..Default::default()
    };
    let anchors: Vec<String> = examples.iter().map(|e| e.anchor.clone()).collect();
    let (q, d, scores) = score_matrix(model, &anchors, &corpus, task, batch_size)?;
    let mut m = retrieval_metrics(&scores, &relevant);
    let with_neg: Vec<&Example> = examples
        .iter()
        .filter(|e| !e.negatives.is_empty())
        .collect();
    if !with_neg.is_empty() {
        let negs: Vec<String> = with_neg.iter().map(|e| e.negatives[0].clone()).collect();
        let nv = model.embed(&negs, &opts(InputRole::Document))?;
        let mut correct = 0;
        for (k, e) in with_neg.iter().enumerate() {
            let qi = examples
                .iter()
                .position(|x| std::ptr::eq(x, *e))
                .expect("from examples");
            let pos = dot(&q[qi], &d[relevant[qi][0]]);
            if pos > dot(&q[qi], &nv[k]) {
                correct += 1;
            }
        }
        m.triplet_accuracy = Some(correct as f64 / with_neg.len() as f64);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed values for a 3-query example.
    #[test]
    fn metrics_match_hand_computation() {
        let scores = vec![
            vec![0.9, 0.1, 0.2], // relevant 0 at rank 1
            vec![0.9, 0.1, 0.2], // relevant 1 at rank 3
            vec![0.1, 0.2, 0.9], // relevant 2 at rank 1
        ];
        let m = retrieval_metrics(&scores, &[vec![0], vec![1], vec![2]]);
        assert!((m.mrr_at_10 - (1.0 + 1.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
        assert!((m.ndcg_at_10 - (1.0 + 1.0 / 4f64.log2() + 1.0) / 3.0).abs() < 1e-12);
        assert!((m.recall_at_1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.recall_at_10, 1.0);
        assert!(
            (m.map_at_100 - m.mrr_at_10).abs() < 1e-12,
            "one relevant doc: AP = 1/rank"
        );
    }
}
