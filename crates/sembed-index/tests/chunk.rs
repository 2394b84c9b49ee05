//! Chunk boundaries per language on small real files (tests/fixtures/code), and splitting of chunks
//! over the token budget.

use sembed_index::chunk::{chunk_file, Budget, Chunk};

fn fixture(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/code")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A budget measured in characters (4 per token, 2 special tokens), roomy enough for every fixture.
fn count(s: &str) -> usize {
    s.len().div_ceil(4) + 2
}

/// 40-line windows of text, `overlap` lines shared.
fn budget(max_tokens: usize, overlap: usize, split_definitions: bool) -> Budget<'static> {
    Budget {
        max_tokens,
        count: &count,
        window_lines: 40,
        overlap_lines: overlap,
        split_definitions,
    }
}

fn cut(name: &str, src: &str) -> Vec<(String, String, usize, usize)> {
    let budget = budget(512, 5, true);
    chunk_file(name, src, &budget)
        .into_iter()
        .map(|c| {
            assert_eq!((c.part, c.parts), (1, 1), "{name}: nothing is split");
            (
                c.kind.to_string(),
                c.symbol.unwrap_or_default(),
                c.start_line,
                c.end_line,
            )
        })
        .collect()
}

/// The chunks of a fixture file.
fn expect(name: &str, want: &[(&str, &str, usize, usize)]) {
    expect_src(name, &fixture(name), want);
}

/// The chunks of a source given here, cut as if named `name`.
fn expect_src(name: &str, src: &str, want: &[(&str, &str, usize, usize)]) {
    let got = cut(name, src);
    let want: Vec<(String, String, usize, usize)> = want
        .iter()
        .map(|(k, s, a, b)| (k.to_string(), s.to_string(), *a, *b))
        .collect();
    assert_eq!(got, want, "{name}");
}

#[test]
fn rust() {
    expect(
        "sample.rs",
        &[
            ("code", "", 1, 3),
            // The trait's header (its doc comment and signature), then its member.
            ("trait", "Cacheable", 5, 6),
            ("method", "Cacheable::key", 7, 8),
            // Doc comment and attribute belong to the struct.
            ("struct", "Cache", 11, 15),
            ("method", "Cache::put", 18, 21),
            ("method", "Cache::get", 23, 25),
            ("method", "<Cache as Display>::fmt", 29, 31),
            // A module's header is kept even when it is only its first line.
            ("module", "tests", 34, 34),
            ("function", "tests::put_get", 35, 40),
        ],
    );
}

#[test]
fn python() {
    expect(
        "sample.py",
        &[
            ("code", "", 1, 4),
            ("function", "top", 7, 9),
            // The comment and decorator above the class, its docstring and fields.
            ("class", "Box", 12, 17),
            ("method", "Box.grow", 19, 21),
            ("method", "Box.area", 23, 25),
            ("code", "", 28, 29),
        ],
    );
}

/// Functions defined under an `if`, a `try` or a `with`, at the top or in a class, are functions;
/// the statements around them stay code, and a function's own body is never searched for more.
#[test]
fn python_definitions_under_a_condition() {
    let src = "import os\n\
               \n\
               if os.name == 'nt':\n\
               \x20   def proxy_bypass(host):\n\
               \x20       return True\n\
               elif os.name == 'posix':\n\
               \x20   def proxy_bypass(host):\n\
               \x20       if host:\n\
               \x20           def inner():\n\
               \x20               return 1\n\
               \x20       return False\n\
               else:\n\
               \x20   proxy_bypass = None\n\
               \n\
               try:\n\
               \x20   from _json import scanstring\n\
               except ImportError:\n\
               \x20   def scanstring(s):\n\
               \x20       return s\n\
               finally:\n\
               \x20   pass\n\
               \n\
               class Server:\n\
               \x20   if hasattr(os, 'fork'):\n\
               \x20       def fork_child(self):\n\
               \x20           return os.fork()\n";
    expect_src(
        "cond.py",
        src,
        &[
            ("code", "", 1, 3),
            ("function", "proxy_bypass", 4, 5),
            ("code", "", 6, 6),
            ("function", "proxy_bypass", 7, 11),
            ("code", "", 12, 17),
            ("function", "scanstring", 18, 19),
            ("code", "", 20, 21),
            ("class", "Server", 23, 24),
            ("method", "Server.fork_child", 25, 26),
        ],
    );
}

#[test]
fn elixir() {
    expect(
        "sample.ex",
        &[
            // defmodule with its @moduledoc and `use`.
            ("module", "MyApp.Repo", 1, 5),
            // @doc and @spec belong to the def; the guard is not part of the name.
            ("function", "MyApp.Repo.get", 7, 11),
            ("function", "MyApp.Repo.helper", 13, 13),
            ("module", "MyApp.Repo.Inner", 15, 15),
            ("function", "MyApp.Repo.Inner.run", 16, 16),
        ],
    );
}

/// An Elixir function's clauses (same name and arity, one after another) are one chunk, from the
/// first clause's docs to the last clause's end; another arity, or a clause after another
/// function, is another definition.
#[test]
fn elixir_clauses_of_one_function_are_one_chunk() {
    let src = "defmodule M do\n\
               \x20 @doc \"Counts.\"\n\
               \x20 def count([]), do: 0\n\
               \x20 def count([_ | t]), do: 1 + count(t)\n\
               \n\
               \x20 # The last clause.\n\
               \x20 def count(x) when is_map(x) do\n\
               \x20   map_size(x)\n\
               \x20 end\n\
               \n\
               \x20 def count(x, acc), do: acc + count(x)\n\
               \x20 defp go, do: :ok\n\
               \x20 defp go, do: :again\n\
               \x20 def count(nil), do: 0\n\
               end\n";
    expect_src(
        "m.ex",
        src,
        &[
            ("module", "M", 1, 1),
            ("function", "M.count", 2, 9),
            ("function", "M.count", 11, 11),
            ("function", "M.go", 12, 13),
            ("function", "M.count", 14, 14),
        ],
    );
}

#[test]
fn javascript() {
    expect(
        "sample.js",
        &[
            ("code", "", 1, 1),
            // JSDoc above `export function`.
            ("function", "add", 3, 9),
            // An arrow function bound to a name.
            ("function", "mul", 11, 11),
            ("class", "Shape", 13, 14),
            ("method", "Shape.area", 15, 18),
        ],
    );
}

#[test]
fn typescript() {
    expect(
        "sample.ts",
        &[
            ("interface", "Options", 1, 4),
            ("type", "Id", 6, 6),
            ("function", "walk", 8, 11),
            // The class header holds a field: kept.
            ("class", "Walker", 13, 14),
            ("method", "Walker.step", 15, 18),
        ],
    );
}

#[test]
fn go() {
    expect(
        "sample.go",
        &[
            ("code", "", 1, 3),
            ("type", "Store", 5, 8),
            ("method", "Store.Add", 10, 13),
            ("function", "New", 15, 18),
        ],
    );
}

#[test]
fn java() {
    expect(
        "Sample.java",
        &[
            ("code", "", 1, 1),
            ("class", "Counter", 3, 5),
            ("method", "Counter.inc", 7, 10),
            // The annotation is inside the method's modifiers.
            ("method", "Counter.toString", 12, 15),
        ],
    );
}

#[test]
fn text_windows_overlap() {
    let src: String = (1..=100).map(|i| format!("line {i}\n")).collect();
    let budget = budget(10_000, 5, true);
    let chunks = chunk_file("notes.txt", &src, &budget);
    let spans: Vec<(usize, usize)> = chunks.iter().map(|c| (c.start_line, c.end_line)).collect();
    assert_eq!(spans, vec![(1, 40), (36, 75), (71, 100)]);
    assert!(chunks
        .iter()
        .all(|c| c.kind == "text" && c.symbol.is_none()));
}

/// A definition over the budget is split into windows that each fit, overlap, cover it all, and
/// record their part numbers.
#[test]
fn long_definition_is_split_and_recorded() {
    let body: String = (0..200)
        .map(|i| format!("    let v{i} = compute({i}, \"some text\");\n"))
        .collect();
    let src = format!("/// Long.\nfn long() {{\n{body}}}\n\nfn short() {{}}\n");
    let budget = budget(128, 3, true);
    let chunks: Vec<Chunk> = chunk_file("x.rs", &src, &budget);
    let parts: Vec<&Chunk> = chunks
        .iter()
        .filter(|c| c.symbol.as_deref() == Some("long"))
        .collect();
    assert!(parts.len() > 5, "{} parts", parts.len());
    let n = parts.len();
    for (i, c) in parts.iter().enumerate() {
        assert_eq!((c.part, c.parts), (i + 1, n));
        assert!(
            count(&c.text) <= 128,
            "part {} has {} tokens",
            i + 1,
            count(&c.text)
        );
        assert_eq!(&src[c.start_byte..c.end_byte], c.text);
    }
    // Together they cover the definition, docs to closing brace, and neighbours overlap.
    assert_eq!(parts[0].start_line, 1);
    assert_eq!(parts[n - 1].end_line, 203);
    for w in parts.windows(2) {
        assert!(
            w[1].start_line <= w[0].end_line,
            "{:?} then {:?}",
            (w[0].start_line, w[0].end_line),
            (w[1].start_line, w[1].end_line)
        );
        assert!(w[1].start_line > w[0].start_line);
    }
    let short = chunks
        .iter()
        .find(|c| c.symbol.as_deref() == Some("short"))
        .unwrap();
    assert_eq!((short.part, short.parts, short.start_line), (1, 1, 205));
}

/// Unless told to split definitions, a definition is one chunk however long, while code outside
/// every definition is still cut to the budget.
#[test]
fn long_definition_stays_whole_and_long_code_is_cut() {
    let body: String = (0..200)
        .map(|i| format!("    v{i} = compute({i}, \"some text\")\n"))
        .collect();
    let top: String = (0..200)
        .map(|i| format!("SETTING_{i} = load({i}, \"some text\")\n"))
        .collect();
    let src = format!("def long():\n{body}    return 1\n\n{top}");
    let budget = budget(128, 3, false);
    let chunks = chunk_file("x.py", &src, &budget);
    let long: Vec<&Chunk> = chunks
        .iter()
        .filter(|c| c.symbol.as_deref() == Some("long"))
        .collect();
    assert_eq!(long.len(), 1);
    assert_eq!(
        (
            long[0].part,
            long[0].parts,
            long[0].start_line,
            long[0].end_line
        ),
        (1, 1, 1, 202)
    );
    assert!(count(&long[0].text) > 128);
    let code: Vec<&Chunk> = chunks.iter().filter(|c| c.kind == "code").collect();
    assert!(code.len() > 5, "{} pieces", code.len());
    for c in &code {
        assert!(count(&c.text) <= 128, "{} tokens", count(&c.text));
        assert_eq!(c.parts, code.len());
    }
    assert_eq!(code[0].start_line, 204);
    assert_eq!(code[code.len() - 1].end_line, 403);
}

/// A single line longer than the budget (minified code) is cut into pieces, never left over-long.
#[test]
fn over_long_line_is_cut() {
    let line = "x".repeat(5000);
    let budget = budget(100, 2, true);
    let chunks = chunk_file("blob.txt", &line, &budget);
    assert!(chunks.len() >= 5000 / 4 / 100, "{} pieces", chunks.len());
    for c in &chunks {
        assert!(count(&c.text) <= 100);
    }
    let joined: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(joined, line);
}

/// Every name a chunk is stored with is one a search filter accepts (`Filter::new` checks against
/// `LANGUAGES`): a language added to the chunker and not to the list could never be searched alone.
#[test]
fn every_stored_language_is_a_filter_language() {
    use sembed_index::chunk::{lang_name, LANGUAGES};
    use sembed_index::store::Filter;
    let exts = [
        "rs", "py", "pyi", "ex", "exs", "js", "mjs", "cjs", "jsx", "ts", "mts", "cts", "tsx", "go",
        "java", "md", "toml",
    ];
    for ext in exts {
        let name = lang_name(&format!("a.{ext}"));
        assert!(LANGUAGES.contains(&name), "{ext}: {name}");
        assert!(
            Filter::new(Some(name.to_uppercase()), None).is_ok(),
            "{name}"
        );
    }
    let e = Filter::new(Some("cobol".into()), None).unwrap_err();
    assert!(
        e.contains("`cobol`") && e.contains("typescript, go, java, text"),
        "{e}"
    );
}
