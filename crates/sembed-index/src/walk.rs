//! The files of a tree, the way `git` sees them: `.gitignore`, `.git/info/exclude` and the global
//! excludes respected (ripgrep's walker, the `ignore` crate), hidden files and `.git` left out, and
//! files that should not be embedded skipped with a reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A file to index.
#[derive(Debug, Clone)]
pub struct FileEntry {
    /// On disk.
    pub abs: PathBuf,
    /// As stored: relative to the index's base folder, `/`-separated.
    pub rel: String,
}

/// What the walk found.
#[derive(Debug, Default)]
pub struct Walk {
    pub files: Vec<FileEntry>,
    /// Reason → files skipped for it (binary, too large, not UTF-8, lock file, minified, unreadable).
    pub skipped: BTreeMap<&'static str, usize>,
}

/// Files above this many bytes are skipped (generated code, data dumps).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 20;

/// Lock files and other generated text that only adds noise to a code search.
const GENERATED: &[&str] = &[
    "Cargo.lock",
    "package-lock.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "poetry.lock",
    "Pipfile.lock",
    "composer.lock",
    "Gemfile.lock",
    "mix.lock",
    "go.sum",
    "uv.lock",
];

/// Walk `roots`, storing paths relative to `base`.
pub fn walk(roots: &[PathBuf], base: &Path, max_bytes: u64) -> std::io::Result<Walk> {
    let mut out = Walk::default();
    let base = base.canonicalize()?;
    for root in roots {
        let root = root
            .canonicalize()
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", root.display())))?;
        let walker = ignore::WalkBuilder::new(&root)
            .hidden(true)
            .git_ignore(true)
            .git_exclude(true)
            .git_global(true)
            // .gitignore applies even outside a git checkout (an unpacked tarball).
            .require_git(false)
            .filter_entry(|e| e.file_name() != ".sembed")
            .sort_by_file_name(|a, b| a.cmp(b))
            .build();
        for entry in walker {
            let entry = match entry {
                Ok(e) => e,
                Err(_) => {
                    *out.skipped.entry("unreadable").or_default() += 1;
                    continue;
                }
            };
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                continue;
            }
            let abs = entry.path().to_path_buf();
            let name = entry.file_name().to_string_lossy();
            if GENERATED.contains(&name.as_ref()) {
                *out.skipped.entry("lock file").or_default() += 1;
                continue;
            }
            if name.ends_with(".min.js") || name.ends_with(".min.css") || name.ends_with(".map") {
                *out.skipped.entry("minified").or_default() += 1;
                continue;
            }
            match entry.metadata() {
                Ok(m) if m.len() > max_bytes => {
                    *out.skipped.entry("too large").or_default() += 1;
                    continue;
                }
                Ok(_) => {}
                Err(_) => {
                    *out.skipped.entry("unreadable").or_default() += 1;
                    continue;
                }
            }
            let rel = match abs.strip_prefix(&base) {
                Ok(r) => r.to_string_lossy().replace('\\', "/"),
                Err(_) => abs.to_string_lossy().into_owned(),
            };
            out.files.push(FileEntry { abs, rel });
        }
    }
    out.files.sort_by(|a, b| a.rel.cmp(&b.rel));
    out.files.dedup_by(|a, b| a.rel == b.rel);
    Ok(out)
}

/// Why the content of a file is not indexed, if it is not: NUL bytes in its first 8 KiB (how git
/// decides a file is binary), or not UTF-8.
pub fn unindexable(bytes: &[u8]) -> Option<&'static str> {
    if bytes[..bytes.len().min(8192)].contains(&0) {
        return Some("binary");
    }
    if std::str::from_utf8(bytes).is_err() {
        return Some("not UTF-8");
    }
    None
}

/// `*` matches any run of characters (`/` included), `?` one character; everything else itself.
/// The same rule as SQL `LIKE` with `%` and `_`, so both stores filter alike.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) && p[pi] != '*' {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// [`glob_match`]'s pattern as SQL `LIKE` (escape character `\`).
pub fn glob_to_like(pattern: &str) -> String {
    let mut s = String::with_capacity(pattern.len() + 4);
    for c in pattern.chars() {
        match c {
            '*' => s.push('%'),
            '?' => s.push('_'),
            '%' | '_' | '\\' => {
                s.push('\\');
                s.push(c);
            }
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("src/*", "src/a/b.rs"));
        assert!(glob_match("*.rs", "src/a.rs"));
        assert!(!glob_match("*.rs", "src/a.rsx"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*", ""));
        assert!(glob_match("**/x.py", "a/b/x.py"));
        assert_eq!(glob_to_like("src/*_x?.rs"), "src/%\\_x_.rs");
    }
}
