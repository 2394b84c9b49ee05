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

/// The repository's test fixtures.
pub fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The tiny BERT fixture, as a `-m` argument.
pub fn tiny() -> String {
    fixtures().join("bert-tiny").display().to_string()
}

/// `sembed ARGS` in `dir`.
pub fn sembed_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sembed"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// `sembed ARGS` here.
pub fn sembed(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sembed"))
        .args(args)
        .output()
        .unwrap()
}

/// Standard output of a run that must have succeeded (else the whole run in the panic).
pub fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}
