//! Helpers shared by the gradient-comparison tests (grad_cache.rs, fast_train.rs).

use sembed::train::data::Example;
use sembed::train::trainer::Trainer;
use sembed::DType;
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// Each variable's name and gradient (None: the loss does not reach it).
pub type Named = Vec<(String, Option<Vec<f64>>)>;

/// The loss and every variable's gradient of `t` on `examples`, by name, in f64.
pub fn named_gradients(t: &Trainer, examples: &[Example]) -> (f64, Named) {
    let refs: Vec<&Example> = examples.iter().collect();
    let (loss, grads) = t.gradients(&refs).unwrap();
    let named = t
        .variables()
        .iter()
        .zip(grads)
        .map(|((n, _), g)| {
            let g = g.map(|g| {
                let g = g.to_dtype(DType::F64).unwrap();
                g.flatten_all().unwrap().to_vec1::<f64>().unwrap()
            });
            (n.clone(), g)
        })
        .collect();
    (loss, named)
}

/// The worst per-tensor `max|a − b| / max|b|` between two sets of gradients, the scale floored at
/// 1e-3 of the largest gradient anywhere, and the tensor it was found in. Panics when a gradient
/// exists on one side only, or nowhere.
pub fn worst_difference(a: &Named, b: &Named) -> (f64, String) {
    let global = b
        .iter()
        .filter_map(|(_, g)| g.as_ref())
        .flatten()
        .fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(global > 0.0, "no gradient at all");
    let mut worst = (0.0f64, String::new());
    for ((name, x), (_, y)) in a.iter().zip(b) {
        match (x, y) {
            (Some(x), Some(y)) => {
                let scale = y
                    .iter()
                    .fold(0.0f64, |m, v| m.max(v.abs()))
                    .max(1e-3 * global);
                let d = x
                    .iter()
                    .zip(y)
                    .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()));
                if d / scale > worst.0 {
                    worst = (d / scale, name.clone());
                }
            }
            (None, None) => {}
            _ => panic!("{name}: a gradient on one side only"),
        }
    }
    worst
}
