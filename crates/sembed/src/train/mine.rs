//! Mining (docstring → function) pairs from a source tree, so users can make training data from their
//! own repository. Rust: a `///` doc block followed by a `fn` item; Python: a `def` whose first
//! statement is a docstring. The anchor is the documentation, the positive the function without it.
//! Pairs are deduplicated, and the held-out split is by file: no file contributes to both.

use super::data::{Example, SplitMix64};
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Functions longer than this are cut (the models truncate anyway).
const MAX_LINES: usize = 60;

#[derive(Debug, Clone)]
pub struct Mined {
    pub file: PathBuf,
    pub example: Example,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Pairs from one Rust file.
pub fn mine_rust(text: &str) -> Vec<Example> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].trim_start().starts_with("///") {
            i += 1;
            continue;
        }
        let mut doc = Vec::new();
        while i < lines.len() && lines[i].trim_start().starts_with("///") {
            doc.push(lines[i].trim_start().trim_start_matches("///").trim());
            i += 1;
        }
        // Attributes between the docs and the item.
        while i < lines.len() && lines[i].trim_start().starts_with("#[") {
            i += 1;
        }
        let Some(first) = lines.get(i) else { break };
        let head = first.trim_start();
        let is_fn = head.split_whitespace().take(6).any(|w| w == "fn")
            && !head.starts_with("//")
            && head.split("fn ").next().is_some_and(|pre| {
                pre.split_whitespace().all(|w| {
                    matches!(
                        w,
                        "pub"
                            | "pub(crate)"
                            | "pub(super)"
                            | "async"
                            | "const"
                            | "unsafe"
                            | "extern"
                            | "\"C\""
                    )
                })
            });
        if !is_fn {
            continue;
        }
        let mut body = Vec::new();
        let mut depth = 0i32;
        let mut opened = false;
        while i < lines.len() && body.len() < MAX_LINES {
            let l = lines[i];
            body.push(l);
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            i += 1;
            if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                break;
            }
        }
        // The first paragraph: the summary, not the examples that follow.
        let anchor = doc
            .split(|l| l.is_empty())
            .find(|p| !p.is_empty())
            .map(|p| p.join(" "))
            .unwrap_or_default();
        let base = indent(first);
        let positive = body
            .iter()
            .map(|l| l.get(base.min(indent(l))..).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        if anchor.split_whitespace().count() >= 3 && opened {
            out.push(Example {
                anchor,
                positive,
                negatives: vec![],
            });
        }
    }
    out
}

/// Pairs from one Python file.
pub fn mine_python(text: &str) -> Vec<Example> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let head = lines[i].trim_start();
        if !(head.starts_with("def ") || head.starts_with("async def ")) {
            i += 1;
            continue;
        }
        let base = indent(lines[i]);
        let start = i;
        // The signature may span lines up to the one ending with ':'.
        let mut j = i;
        while j < lines.len() && !lines[j].trim_end().ends_with(':') {
            j += 1;
        }
        let sig_end = j;
        let mut k = sig_end + 1;
        while k < lines.len() && lines[k].trim().is_empty() {
            k += 1;
        }
        let Some(doc_line) = lines.get(k) else { break };
        let d = doc_line.trim_start();
        let quote = if d.starts_with("\"\"\"") || d.starts_with("r\"\"\"") {
            "\"\"\""
        } else if d.starts_with("'''") || d.starts_with("r'''") {
            "'''"
        } else {
            i = sig_end + 1;
            continue;
        };
        let after = &d[d.find(quote).expect("starts with it") + 3..];
        let mut doc = Vec::new();
        let mut m = k;
        if let Some(end) = after.find(quote) {
            doc.push(after[..end].trim().to_string());
        } else {
            doc.push(after.trim().to_string());
            m += 1;
            while m < lines.len() {
                if let Some(end) = lines[m].find(quote) {
                    doc.push(lines[m][..end].trim().to_string());
                    break;
                }
                doc.push(lines[m].trim().to_string());
                m += 1;
            }
        }
        // The body: lines after the docstring indented deeper than the def (blank lines kept).
        let mut body: Vec<&str> = lines[start..=sig_end.min(lines.len() - 1)].to_vec();
        let mut n = m + 1;
        while n < lines.len() && body.len() < MAX_LINES {
            let l = lines[n];
            if !l.trim().is_empty() && indent(l) <= base {
                break;
            }
            body.push(l);
            n += 1;
        }
        while body.last().is_some_and(|l| l.trim().is_empty()) {
            body.pop();
        }
        // First paragraph of the docstring.
        let anchor = doc
            .split(|l| l.is_empty())
            .find(|p| !p.is_empty())
            .map(|p| p.join(" "))
            .unwrap_or_default();
        let has_code = body.len() > sig_end - start + 1;
        if anchor.split_whitespace().count() >= 3 && has_code {
            let positive = body
                .iter()
                .map(|l| l.get(base.min(indent(l))..).unwrap_or(l))
                .collect::<Vec<_>>()
                .join("\n");
            out.push(Example {
                anchor: anchor.trim().to_string(),
                positive,
                negatives: vec![],
            });
        }
        i = n.max(i + 1);
    }
    out
}

/// Walk `root` (skipping hidden folders and `target`), mine every `.rs` and `.py` file, deduplicate
/// (same anchor or same function keeps the first), in path order.
pub fn mine_tree(root: &Path) -> Result<Vec<Mined>> {
    mine_tree_with(root, &mut |_, _| {})
}

/// [`mine_tree`], calling `progress(files read, files in all)` after each file.
pub fn mine_tree_with(root: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<Mined>> {
    if !root.is_dir() {
        return Err(Error::InvalidInput(format!(
            "{}: not a folder",
            root.display()
        )));
    }
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))?;
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                if !name.starts_with('.')
                    && name != "target"
                    && name != "__pycache__"
                    && name != "node_modules"
                {
                    stack.push(p);
                }
            } else if name.ends_with(".rs") || name.ends_with(".py") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut seen_anchor = HashSet::new();
    let mut seen_code = HashSet::new();
    let mut out = Vec::new();
    let total = files.len();
    for (n, f) in files.into_iter().enumerate() {
        progress(n, total);
        // Files that are not UTF-8 are skipped: they hold no minable text (counted in the report).
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let pairs = if f.extension().is_some_and(|e| e == "rs") {
            mine_rust(&text)
        } else {
            mine_python(&text)
        };
        for ex in pairs {
            if seen_anchor.insert(ex.anchor.clone()) && seen_code.insert(ex.positive.clone()) {
                out.push(Mined {
                    file: f.clone(),
                    example: ex,
                });
            }
        }
    }
    progress(total, total);
    Ok(out)
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
    fn rust_doc_and_function() {
        let src = "/// Adds two numbers together.\n#[inline]\npub fn add(a: u32, b: u32) -> u32 {\n    a + b\n}\n\n/// short\nfn x() {}\n/// A struct, not a function.\nstruct S;\n";
        let pairs = mine_rust(src);
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].anchor, "Adds two numbers together.");
        assert_eq!(
            pairs[0].positive,
            "pub fn add(a: u32, b: u32) -> u32 {\n    a + b\n}"
        );
    }

    #[test]
    fn python_docstring_and_body() {
        let src = "class A:\n    def area(self, w, h):\n        \"\"\"Return the area of a rectangle.\n\n        More text.\n        \"\"\"\n        return w * h\n\n    def nodoc(self):\n        return 1\n\ndef f():\n    '''One line doc here.'''\n    pass\n";
        let pairs = mine_python(src);
        assert_eq!(pairs.len(), 2, "{pairs:?}");
        assert_eq!(pairs[0].anchor, "Return the area of a rectangle.");
        assert_eq!(pairs[0].positive, "def area(self, w, h):\n    return w * h");
        assert_eq!(pairs[1].anchor, "One line doc here.");
    }

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
