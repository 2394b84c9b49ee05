//! The crate's modules form layers, and data flows one way: files (`weights`, `config`,
//! `tokenize`) → models (`nn`, `fast`, `models`, `lora`; `fast` below `models`) → vectors (`backend`, `pool`, `embed`, …),
//! with training (`train`) on top. A module never names one above it. This test reads the sources
//! and fails on any `crate::…` path that points upward (comments aside), so the layering stays.

use std::path::{Path, PathBuf};

/// A module (file or folder under src/) and the modules it must not use.
const RULES: &[(&str, &[&str])] = &[
    (
        "rng.rs",
        &[
            "weights",
            "tokenize",
            "config",
            "nn",
            "models",
            "fast",
            "lora",
            "embed",
            "backend",
            "train",
            "fusion_config",
            "hub",
        ],
    ),
    (
        "error.rs",
        &[
            "weights", "tokenize", "nn", "models", "fast", "lora", "embed", "backend", "train",
        ],
    ),
    (
        "weights.rs",
        &[
            "tokenize",
            "nn",
            "models",
            "fast",
            "lora",
            "embed",
            "backend",
            "train",
            "fusion_config",
        ],
    ),
    (
        "tokenize.rs",
        &[
            "weights",
            "nn",
            "models",
            "fast",
            "lora",
            "embed",
            "backend",
            "train",
            "fusion_config",
        ],
    ),
    (
        "config.rs",
        &[
            "nn",
            "models",
            "fast",
            "lora",
            "embed",
            "backend",
            "train",
            "fusion_config",
        ],
    ),
    (
        "nn.rs",
        &["fast", "lora", "embed", "backend", "train", "fusion_config"],
    ),
    (
        "models",
        // `fast` sits below `models`: BERT's training forward runs the fast engine's training pass
        // (`fast::train`), and `fast` never names `models`.
        &["embed", "backend", "train", "fusion_config"],
    ),
    (
        "fast",
        &[
            "models",
            "lora",
            "embed",
            "backend",
            "train",
            "fusion_config",
        ],
    ),
    (
        "lora.rs",
        &[
            "models",
            "fast",
            "embed",
            "backend",
            "train",
            "fusion_config",
        ],
    ),
    ("backend.rs", &["embed", "train", "fusion_config"]),
    ("pool.rs", &["embed", "backend", "train", "fusion_config"]),
    ("embed.rs", &["train", "fusion_config"]),
];

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

#[test]
fn modules_never_use_a_layer_above_them() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (module, forbidden) in RULES {
        let mut files = Vec::new();
        rust_files(&src.join(module), &mut files);
        assert!(!files.is_empty(), "no sources for {module}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            // The code without comments, as one string, so that a `use crate::{…}` that rustfmt
            // wrapped over several lines is read whole.
            let code: String = text
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join(" ");
            for up in *forbidden {
                // `crate::up::…`, `crate::up;`, and `up` as an item of `crate::{…}`.
                let in_braces = code.split("crate::{").skip(1).any(|rest| {
                    let inner = rest.split('}').next().unwrap_or("");
                    inner
                        .split(',')
                        .any(|item| item.trim().split("::").next() == Some(up))
                });
                if code.contains(&format!("crate::{up}::"))
                    || code.contains(&format!("crate::{up};"))
                    || in_braces
                {
                    violations.push(format!("{}: {module} uses {up}", f.display()));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "upward dependencies:\n{}",
        violations.join("\n")
    );
}
