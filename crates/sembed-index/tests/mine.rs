//! Mining (documentation → code) pairs per language on small real files (tests/fixtures/mine): the
//! exact pairs, with the rules each language's documentation follows.

use sembed_index::mine::mine_file;

fn pairs(name: &str) -> Vec<(String, String)> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/mine")
        .join(name);
    let src = std::fs::read_to_string(&p).unwrap();
    mine_file(name, &src)
        .into_iter()
        .map(|e| (e.anchor, e.positive))
        .collect()
}

fn expect(name: &str, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, p)| (a.to_string(), p.to_string()))
        .collect();
    assert_eq!(pairs(name), want, "{name}");
}

#[test]
fn rust_doc_comments() {
    expect(
        "lib.rs",
        &[
            // The first paragraph; attributes are not code to find; a trait's bare signature and a
            // two-word doc give nothing.
            (
                "Parse a duration such as `3s` or `250ms`.",
                "pub fn parse_duration(s: &str) -> Option<u64> {\n    s.strip_suffix(\"ms\").and_then(|n| n.parse().ok())\n}",
            ),
            (
                "Start the timer from zero again.",
                "pub fn reset(&mut self) {\n    self.start = 0;\n}",
            ),
        ],
    );
}

#[test]
fn python_docstrings() {
    expect(
        "util.py",
        &[
            (
                "Turn a title into a URL slug.",
                "def slugify(text):\n    return \"-\".join(text.lower().split())",
            ),
            // Decorated method: the definition without its decorator or docstring.
            (
                "Find a key in the cache.",
                "def lookup(self, key):\n    return self.data.get(key)",
            ),
        ],
    );
}

#[test]
fn elixir_doc_and_moduledoc() {
    expect(
        "repo.ex",
        &[
            (
                "A shopping cart held in memory.",
                "defmodule Shop.Cart do\n\n  @doc \"Add an item to the cart.\"\n  @spec add(map, term) :: map\n  def add(cart, item) do\n    Map.update(cart, item, 1, &(&1 + 1))\n  end\n\n  @doc false\n  def internal(x), do: x\n\n  @doc \"\"\"\n  Count the items in the cart.\n  \"\"\"\n  def count(cart), do: cart |> Map.values() |> Enum.sum()\nend",
            ),
            (
                "Add an item to the cart.",
                "def add(cart, item) do\n  Map.update(cart, item, 1, &(&1 + 1))\nend",
            ),
            // `@doc false` gives nothing; a keyword body counts.
            (
                "Count the items in the cart.",
                "def count(cart), do: cart |> Map.values() |> Enum.sum()",
            ),
        ],
    );
}

#[test]
fn jsdoc() {
    expect(
        "api.js",
        &[
            (
                "Fetch a user by their id.",
                "export async function fetchUser(id) {\n  return fetch(`/users/${id}`);\n}",
            ),
            (
                "Save the record to disk.",
                "save(record) {\n  this.records.push(record);\n}",
            ),
        ],
    );
    expect(
        "types.ts",
        &[(
            "Merge two option objects, right wins.",
            "export function merge<T>(a: T, b: Partial<T>): T {\n  return { ...a, ...b };\n}",
        )],
    );
}

#[test]
fn go_comments() {
    expect(
        "server.go",
        &[(
            "Handle serves one HTTP request and writes the reply.",
            "func (s *Server) Handle(w Writer, r *Request) {\n\tw.Write(s.reply(r))\n}",
        )],
    );
}

#[test]
fn javadoc() {
    expect(
        "Queue.java",
        &[(
            "Remove and return the oldest element.",
            "public Object poll() {\n    return items.remove(0);\n}",
        )],
    );
}

/// A tree: every language, gitignored files left out, duplicates kept once.
#[test]
fn tree_of_every_language() {
    let tmp = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mine");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir(tmp.path().join("vendor")).unwrap();
    std::fs::copy(src.join("util.py"), tmp.path().join("vendor/copy.py")).unwrap();
    std::fs::create_dir(tmp.path().join("ignored")).unwrap();
    std::fs::copy(src.join("lib.rs"), tmp.path().join("ignored/lib.rs")).unwrap();
    std::fs::write(tmp.path().join(".gitignore"), "ignored/\n").unwrap();
    let mined = sembed_index::mine::mine_dir(tmp.path()).unwrap();
    assert_eq!(mined.len(), 2 + 2 + 3 + 2 + 1 + 1 + 1, "{mined:#?}");
    assert!(mined
        .iter()
        .all(|m| !m.file.starts_with(tmp.path().join("ignored"))));
    assert!(
        mined
            .iter()
            .all(|m| !m.file.starts_with(tmp.path().join("vendor"))),
        "duplicates keep the first"
    );
}

/// Each pair's symbol is the one the index gives the chunk holding that definition, so a training
/// positive can carry the same header line as the indexed chunk (`sembed adapt`).
#[test]
fn symbols_are_the_index_chunks_symbols() {
    use sembed_index::chunk::{chunk_file, Budget};
    use sembed_index::mine::mine_file_symbols;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mine");
    let words = |s: &str| s.split_whitespace().count();
    let budget = Budget {
        max_tokens: 100_000,
        count: &words,
        window_lines: 40,
        overlap_lines: 0,
        split_definitions: false,
    };
    let mut all = Vec::new();
    for f in std::fs::read_dir(&dir).unwrap() {
        let path = f.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let src = std::fs::read_to_string(&path).unwrap();
        let chunks = chunk_file(&name, &src, &budget);
        for (symbol, ex) in mine_file_symbols(&name, &src) {
            let first = ex.positive.lines().next().unwrap();
            let chunk = chunks
                .iter()
                .filter(|c| c.text.contains(first))
                .min_by_key(|c| c.text.len())
                .unwrap_or_else(|| panic!("{name}: no chunk holds {first:?}"));
            assert_eq!(symbol, chunk.symbol, "{name}: {first:?}");
            all.push((name.clone(), symbol));
        }
    }
    // Written out for two files: methods are qualified by their class or module.
    let of = |file: &str| -> Vec<Option<String>> {
        all.iter()
            .filter(|(n, _)| n == file)
            .map(|(_, s)| s.clone())
            .collect()
    };
    assert_eq!(
        of("util.py"),
        [
            Some("slugify".to_string()),
            Some("Cache.lookup".to_string())
        ]
    );
    assert_eq!(of("repo.ex")[0].as_deref(), Some("Shop.Cart"));
    assert!(of("repo.ex")[1..]
        .iter()
        .all(|s| s.as_deref().is_some_and(|s| s.starts_with("Shop.Cart."))));
}

/// An Elixir function's positive is all its clauses, as the index cuts it: a documented head
/// without a body gives the clauses below it, and the next function is not part of it.
#[test]
fn elixir_clauses_of_one_function_are_one_positive() {
    let src = "defmodule M do\n  @doc \"Fetch a record by id with options.\"\n  def get(repo, id, opts \\\\ [])\n  def get(repo, nil, _opts), do: {:error, repo}\n\n  # By id.\n  def get(repo, id, opts) do\n    repo.get(id, opts)\n  end\n\n  def get(repo, id, opts, extra), do: {repo, id, opts, extra}\n\n  @doc \"Only a head and nothing below it.\"\n  def lonely(a)\nend\n";
    let pairs = sembed_index::mine::mine_file("m.ex", src);
    let got: Vec<(&str, &str)> = pairs
        .iter()
        .map(|e| (e.anchor.as_str(), e.positive.as_str()))
        .collect();
    assert_eq!(
        got,
        [(
            "Fetch a record by id with options.",
            "def get(repo, id, opts \\\\ [])\ndef get(repo, nil, _opts), do: {:error, repo}\n\n# By id.\ndef get(repo, id, opts) do\n  repo.get(id, opts)\nend"
        )]
    );
}
