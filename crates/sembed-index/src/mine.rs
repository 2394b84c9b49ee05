//! Mining (documentation → code) pairs for fine-tuning, with the same parser and rules that cut code
//! for the index ([`crate::chunk`]): one notion of "a definition and its docs" for both.
//!
//! Per language, the documentation of a function or method is:
//! - Rust: the `///` (or `/** */`) comments above it (attributes may sit between);
//! - Python: its docstring (the first statement of its body);
//! - Elixir: the `@doc` above a `def`/`defp`/`defmacro`, and a module's `@moduledoc` for the
//!   `defmodule` itself;
//! - JavaScript/TypeScript and Java: the `/** … */` block (JSDoc, Javadoc) above it, tags (`@param`…)
//!   left out;
//! - Go: the `//` comment lines above it.
//!
//! The anchor is the documentation's first paragraph (at least three words); the positive is the
//! definition without its documentation, dedented, at most [`MAX_LINES`] lines. Definitions without a
//! body (trait and interface signatures) give no pair.

use crate::chunk::{
    attached, definition, doc_anchor, later_clauses, parse, qualified, text_of, Lang,
};
use crate::walk::{unindexable, walk};
use sembed::train::data::Example;
use sembed::train::mine::Mined;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tree_sitter::Node;

/// Definitions longer than this are cut (the models truncate anyway).
pub const MAX_LINES: usize = 60;

/// Pairs of one file (its language by extension; none for other files).
pub fn mine_file(path: &str, src: &str) -> Vec<Example> {
    mine_file_symbols(path, src)
        .into_iter()
        .map(|(_, ex)| ex)
        .collect()
}

/// [`mine_file`] with each pair's qualified symbol, the one the index gives the chunk of that
/// definition (`Parser.parse`, `MyApp.Repo.get`).
pub fn mine_file_symbols(path: &str, src: &str) -> Vec<(Option<String>, Example)> {
    let Some(lang) = Lang::of_path(path) else {
        return Vec::new();
    };
    let Some(tree) = parse(lang, src) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    visit(lang, src, tree.root_node(), &mut Vec::new(), &mut out);
    out
}

fn visit(
    lang: Lang,
    src: &str,
    node: Node,
    scope: &mut Vec<String>,
    out: &mut Vec<(Option<String>, Example)>,
) {
    let mut cursor = node.walk();
    for child in node.named_children(&mut cursor) {
        let mut named = false;
        // A decorated Python definition is mined from the definition inside it.
        if child.kind() != "decorated_definition" {
            if let Some((kind, name)) = definition(lang, src, child) {
                if let Some(n) = name {
                    scope.push(n);
                    named = true;
                }
                if let Some(ex) = pair(lang, src, child, kind) {
                    out.push((named.then(|| qualified(lang, scope)), ex));
                }
            }
        }
        visit(lang, src, child, scope, out);
        if named {
            scope.pop();
        }
    }
}

fn pair(lang: Lang, src: &str, node: Node, kind: &str) -> Option<Example> {
    let module = lang == Lang::Elixir && kind == "module";
    if !(matches!(kind, "function" | "method") || module) {
        return None;
    }
    let anchor_node = doc_anchor(node);
    // The documentation and the byte ranges to leave out of the positive.
    let (doc, cut): (String, Option<std::ops::Range<usize>>) = match lang {
        Lang::Python => {
            let (d, r) = python_docstring(src, node)?;
            (d, Some(r))
        }
        Lang::Elixir if module => {
            let (d, r) = elixir_moduledoc(src, node)?;
            (d, Some(r))
        }
        _ => (outer_doc(lang, src, anchor_node)?, None),
    };
    let anchor = first_paragraph(&doc)?;
    // An Elixir function is all its clauses, as the index cuts it (a documented head without a
    // body, `def get(repo, id, opts \\ [])`, has its code in the clauses below).
    let later = if lang == Lang::Elixir && !module {
        later_clauses(src, node)
    } else {
        Vec::new()
    };
    if !has_body(lang, node) && !later.iter().any(|n| has_body(lang, *n)) {
        return None;
    }
    let mut range = anchor_node.byte_range();
    if let Some(last) = later.last() {
        range.end = last.end_byte();
    }
    let mut text = String::new();
    match cut {
        Some(c) => {
            // Whole lines of the docstring go, indentation and newline included.
            let a = src[..c.start]
                .rfind('\n')
                .map_or(0, |i| i + 1)
                .max(range.start);
            let b = src[c.end..]
                .find('\n')
                .map_or(src.len(), |i| c.end + i + 1)
                .min(range.end);
            text.push_str(&src[range.start..a]);
            text.push_str(&src[b..range.end]);
        }
        None => text.push_str(&src[range.clone()]),
    }
    let col = anchor_node.start_position().column;
    let mut lines: Vec<&str> = text.lines().collect();
    lines.truncate(MAX_LINES);
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    let positive = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                return *l;
            }
            let ws = l.len() - l.trim_start().len();
            &l[ws.min(col)..]
        })
        .collect::<Vec<_>>()
        .join("\n");
    Some(Example {
        anchor,
        positive,
        negatives: vec![],
    })
}

/// Whether a definition has code to find (not a bare signature, not only a docstring).
fn has_body(lang: Lang, node: Node) -> bool {
    match lang {
        Lang::Python => node.child_by_field_name("body").is_some_and(|b| {
            let mut c = b.walk();
            b.named_children(&mut c)
                .filter(|n| n.kind() != "comment")
                .count()
                > 1
        }),
        Lang::Elixir => {
            // `def f(x), do: …` or a do-block.
            let mut c = node.walk();
            node.named_children(&mut c).any(|n| n.kind() == "do_block")
                || node.named_children(&mut node.walk()).any(|n| {
                    n.kind() == "arguments"
                        && n.named_children(&mut n.walk())
                            .any(|a| a.kind() == "keywords")
                })
        }
        _ => node.child_by_field_name("body").is_some(),
    }
}

/// The documentation comments above a definition, cleaned of comment markers.
fn outer_doc(lang: Lang, src: &str, anchor: Node) -> Option<String> {
    let nodes = attached(lang, src, anchor);
    let mut lines: Vec<String> = Vec::new();
    match lang {
        Lang::Rust => {
            for n in nodes {
                let t = text_of(src, n);
                if let Some(rest) = t.strip_prefix("///") {
                    if !rest.starts_with('/') {
                        lines.push(rest.trim().to_string());
                    }
                } else if t.starts_with("/**") && !t.starts_with("/***") {
                    lines.extend(block_doc(t));
                }
            }
        }
        Lang::Go => {
            for n in nodes {
                let t = text_of(src, n);
                if let Some(rest) = t.strip_prefix("//") {
                    lines.push(rest.trim().to_string());
                }
            }
        }
        Lang::JavaScript | Lang::TypeScript | Lang::Tsx | Lang::Java => {
            // The JSDoc/Javadoc block nearest the definition.
            let t = nodes
                .iter()
                .rev()
                .map(|n| text_of(src, *n))
                .find(|t| t.starts_with("/**"))?;
            lines.extend(block_doc(t));
        }
        Lang::Elixir => {
            let t = nodes
                .iter()
                .map(|n| text_of(src, *n))
                .rfind(|t| t.starts_with("@doc") && !t.starts_with("@doc false"))?;
            lines.extend(elixir_string(t.trim_start_matches("@doc")));
        }
        Lang::Python => return None,
    }
    if lines.iter().all(|l| l.is_empty()) {
        return None;
    }
    Some(lines.join("\n"))
}

/// `/** … */` → its lines without the markers and leading `*`, tags (`@param` …) left out.
fn block_doc(t: &str) -> Vec<String> {
    let inner = t.trim_start_matches("/**").trim_end_matches("*/");
    let mut out = Vec::new();
    for l in inner.lines() {
        let l = l.trim();
        let l = l.strip_prefix('*').unwrap_or(l).trim();
        if l.starts_with('@') {
            break;
        }
        out.push(l.to_string());
    }
    out
}

/// The text of an Elixir string literal: `"…"`, `"""…"""`, `~S"""…"""`, `~s(…)`.
fn elixir_string(t: &str) -> Vec<String> {
    let t = t.trim();
    let t = t
        .strip_prefix("~S")
        .or_else(|| t.strip_prefix("~s"))
        .unwrap_or(t);
    let body = if let Some(r) = t.strip_prefix("\"\"\"") {
        r.rsplit_once("\"\"\"").map_or(r, |(a, _)| a)
    } else if let Some(r) = t.strip_prefix('"') {
        r.rsplit_once('"').map_or(r, |(a, _)| a)
    } else {
        return Vec::new();
    };
    body.lines().map(|l| l.trim().to_string()).collect()
}

/// A Python function's docstring and its byte range.
fn python_docstring(src: &str, node: Node) -> Option<(String, std::ops::Range<usize>)> {
    let body = node.child_by_field_name("body")?;
    let mut c = body.walk();
    let first = body
        .named_children(&mut c)
        .find(|n| n.kind() != "comment")?;
    if first.kind() != "expression_statement" {
        return None;
    }
    let s = first.named_child(0)?;
    if s.kind() != "string" {
        return None;
    }
    let t = text_of(src, s);
    let t = t.trim_start_matches(['r', 'R', 'u', 'U']);
    let inner = ["\"\"\"", "'''", "\"", "'"]
        .iter()
        .find_map(|q| t.strip_prefix(q).and_then(|r| r.strip_suffix(q)))?;
    let doc = inner.lines().map(str::trim).collect::<Vec<_>>().join("\n");
    Some((doc, first.byte_range()))
}

/// A `defmodule`'s `@moduledoc` and its byte range.
fn elixir_moduledoc(src: &str, node: Node) -> Option<(String, std::ops::Range<usize>)> {
    let mut c = node.walk();
    let block = node
        .named_children(&mut c)
        .find(|n| n.kind() == "do_block")?;
    let mut c = block.walk();
    let attr = block
        .named_children(&mut c)
        .find(|n| n.kind() == "unary_operator" && text_of(src, *n).starts_with("@moduledoc"))?;
    let t = text_of(src, attr).trim_start_matches("@moduledoc");
    if t.trim() == "false" {
        return None;
    }
    Some((elixir_string(t).join("\n"), attr.byte_range()))
}

/// The first paragraph on one line, when it has at least three words.
fn first_paragraph(doc: &str) -> Option<String> {
    let para = doc
        .split("\n\n")
        .map(|p| {
            p.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .find(|p| !p.is_empty())?;
    (para.split_whitespace().count() >= 3).then_some(para)
}

/// Mine every file of `roots` the way the index walks them (`.gitignore` respected), in path order;
/// the same anchor or the same code twice keeps the first. `progress(files done, files in all)`.
pub fn mine_tree(
    roots: &[PathBuf],
    progress: &mut dyn FnMut(usize, usize),
) -> crate::Result<Vec<Mined>> {
    let base = roots.first().cloned().unwrap_or_else(|| PathBuf::from("."));
    let found =
        walk(roots, &base, crate::walk::DEFAULT_MAX_FILE_BYTES).map_err(|e| crate::Error::Io {
            path: base.display().to_string(),
            source: e,
        })?;
    let files: Vec<_> = found
        .files
        .into_iter()
        .filter(|f| Lang::of_path(&f.rel).is_some())
        .collect();
    let mut seen_anchor = HashSet::new();
    let mut seen_code = HashSet::new();
    let mut out = Vec::new();
    let total = files.len();
    for (n, f) in files.iter().enumerate() {
        progress(n, total);
        let Ok(bytes) = std::fs::read(&f.abs) else {
            continue;
        };
        if unindexable(&bytes).is_some() {
            continue;
        }
        let src = std::str::from_utf8(&bytes).expect("checked UTF-8");
        for (symbol, ex) in mine_file_symbols(&f.rel, src) {
            if seen_anchor.insert(ex.anchor.clone()) && seen_code.insert(ex.positive.clone()) {
                out.push(Mined {
                    file: f.abs.clone(),
                    symbol,
                    example: ex,
                });
            }
        }
    }
    progress(total, total);
    Ok(out)
}

/// A pair whose positive is written the way the index embeds that definition's chunk: after a
/// first line with the file's name and the symbol ([`crate::index::embedded_text`]) when `header`,
/// as `sembed index` does by default. Its negatives are left as they are.
pub fn as_indexed(mut m: Mined, header: bool) -> Mined {
    let path = m.file.to_string_lossy().replace('\\', "/");
    m.example.positive =
        crate::index::embedded_text(&path, m.symbol.as_deref(), &m.example.positive, header);
    m
}

/// [`mine_tree`] of one folder.
pub fn mine_dir(root: &Path) -> crate::Result<Vec<Mined>> {
    mine_tree(&[root.to_path_buf()], &mut |_, _| {})
}
