//! Helpers shared by the CLI's test files (each includes this with `mod common;`).
#![allow(dead_code)]

/// A missing tool or interpreter: the test fails when `SEMBED_REQUIRE_ALL` is set (`.ci/run` sets
/// it, so CI never passes a test that did not run) and says SKIPPED otherwise.
pub fn missing(what: &str) {
    assert!(
        std::env::var_os("SEMBED_REQUIRE_ALL").is_none(),
        "{what} (SEMBED_REQUIRE_ALL is set: nothing may be skipped)"
    );
    println!("SKIPPED: {what}");
}

/// The `embedding` of one JSONL line of `sembed embed`.
pub fn embedding(line: &str) -> Vec<f64> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    v["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}
