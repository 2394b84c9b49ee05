//! `sembed mcp` as AI coding agents reach it: the official MCP Python SDK (PyPI `mcp`, installed by
//! .ci/run; the interpreter comes from $SEMBED_TEST_PYTHON) lists the tools and gets the hits `sembed
//! search` ranks, with the `initialize` handshake and with the stateless 2026-07-28 revision; raw
//! input that is not protocol gets JSON-RPC errors or is dropped, never a crash, and nothing but
//! protocol messages reaches stdout; `--watch` picks up an edit.

mod common;

use common::{ok, sembed, tiny};

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The code fixtures and two generated Python modules, indexed with the tiny model.
fn indexed_repo(dir: &Path) -> Value {
    for f in std::fs::read_dir(root().join("tests/fixtures/code")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    for m in 0..2 {
        let mut src = String::new();
        for i in 0..3 {
            src.push_str(&format!(
                "def f{m}_{i}(x):\n    \"\"\"Scale by {i} and shift by {m}.\"\"\"\n    return x * {i} + {m}\n\n\n"
            ));
        }
        std::fs::write(dir.join(format!("pkg/mod{m}.py")), src).unwrap();
    }
    let d = dir.to_str().unwrap();
    serde_json::from_str(ok(&sembed(&["index", d, "-m", &tiny(), "--json", "-q"])).trim()).unwrap()
}

/// (path, start line, score) of hits.
fn ranking(hits: &Value) -> Vec<(String, u64, f64)> {
    hits.as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["path"].as_str().unwrap().to_string(),
                h["start_line"].as_u64().unwrap(),
                h["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn same_ranking(a: &[(String, u64, f64)], b: &[(String, u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.0, x.1), (&y.0, y.1), "{what}: {a:?} vs {b:?}");
        assert!((x.2 - y.2).abs() < 1e-5, "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn official_python_client_lists_tools_and_gets_ranked_hits() {
    let Some(python) = std::env::var_os("SEMBED_TEST_PYTHON") else {
        common::missing("set SEMBED_TEST_PYTHON to a Python with the `mcp` package (.ci/run does)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let report = indexed_repo(dir);
    let d = dir.to_str().unwrap();
    let db = dir.join(".sembed/index.sqlite");
    let q = "a cache of strings";
    let cli = |extra: &[&str]| -> Value {
        let mut a = vec![
            "search",
            q,
            "-k",
            "5",
            "--json",
            "--db",
            db.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        serde_json::from_str(ok(&sembed(&a)).trim()).unwrap()
    };
    let (hybrid, lexical) = (cli(&[]), cli(&["--mode", "lexical"]));
    let filtered = cli(&["--lang", "python", "--path", "pkg/*"]);
    for (mode, version) in [
        ("legacy", "2025-11-25"),
        ("2026-07-28", "2026-07-28"),
        ("auto", "2026-07-28"),
    ] {
        let o = Command::new(&python)
            .arg(root().join("tools/mcp/client_check.py"))
            .args([env!("CARGO_BIN_EXE_sembed"), d, q, "f1_2", mode])
            .output()
            .unwrap();
        let out: Value = serde_json::from_str(ok(&o).trim()).unwrap();
        assert_eq!(out["protocol_version"], version, "{mode}");
        // Stateless from the start, the client never asks who the server is.
        if mode != "2026-07-28" {
            assert_eq!(out["server_name"], "sembed", "{mode}");
        }
        let tools = &out["tools"];
        let names: Vec<&String> = tools.as_object().unwrap().keys().collect();
        assert_eq!(
            names,
            ["index_status", "lookup_symbol", "refresh_index", "search"]
        );
        assert_eq!(tools["search"]["required"], json!(["query"]));
        assert_eq!(
            tools["search"]["properties"],
            json!(["k", "language", "mode", "path", "query"])
        );
        assert_eq!(tools["lookup_symbol"]["required"], json!(["name"]));
        // The refresh found nothing to do: the index is current.
        let refresh = &out["refresh"]["content"];
        assert_eq!(refresh["chunks"], report["chunks"], "{mode}");
        assert_eq!(refresh["embedded"], 0, "{mode}");
        // The hits `sembed search` ranks, by every mode and filter.
        for (key, cli) in [
            ("search", &hybrid),
            ("search_lexical", &lexical),
            ("search_filtered", &filtered),
        ] {
            let got = &out[key];
            assert_eq!(got["is_error"], false, "{mode} {key}: {got}");
            same_ranking(
                &ranking(&got["content"]["hits"]),
                &ranking(&cli["hits"]),
                &format!("{mode} {key}"),
            );
        }
        assert_eq!(out["search"]["content"]["mode"], "hybrid");
        assert_eq!(out["search_lexical"]["content"]["mode"], "lexical");
        assert!(!ranking(&filtered["hits"]).is_empty());
        // The definition of f1_2, and only it.
        let defs = out["lookup"]["content"]["definitions"].as_array().unwrap();
        assert_eq!(defs.len(), 1, "{defs:?}");
        assert_eq!(defs[0]["path"], "pkg/mod1.py");
        assert_eq!(defs[0]["symbol"], "f1_2");
        assert!(defs[0]["text"].as_str().unwrap().starts_with("def f1_2("));
        let status = &out["status"]["content"];
        assert_eq!(status["chunks"], report["chunks"]);
        assert_eq!(status["files"], report["files"]);
        assert_eq!(status["status"]["stale_seconds"], 0.0);
        // Arguments off the schema and unknown tools: JSON-RPC "invalid params".
        for (case, e) in out["errors"].as_object().unwrap() {
            assert_eq!(e["code"], -32602, "{mode} {case}: {e}");
        }
        assert_eq!(out["errors"].as_object().unwrap().len(), 7);
        assert_eq!(out["after_errors"]["is_error"], false);
    }
}

/// A running `sembed mcp` with its stdout read line by line on a thread.
struct Server {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sembed"))
            .arg("mcp")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Server { child, lines }
    }

    fn send(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// The next stdout line, which must be a JSON-RPC message.
    fn next(&mut self) -> Value {
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .expect("a reply within 60 s");
        let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert_eq!(v["jsonrpc"], "2.0", "{l}");
        v
    }

    /// The reply to request `id` (replies to other ids, and notifications, are kept in `others`).
    fn reply(&mut self, id: &Value, others: &mut Vec<Value>) -> Value {
        loop {
            let v = self.next();
            if &v["id"] == id {
                return v;
            }
            others.push(v);
        }
    }

    fn call(&mut self, id: u64, tool: &str, args: Value) -> Value {
        self.send(
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                   "params": {"name": tool, "arguments": args}})
            .to_string()
            .as_bytes(),
        );
        let r = self.reply(&json!(id), &mut Vec::new());
        assert!(r.get("error").is_none(), "{tool}: {r}");
        r["result"]["structuredContent"].clone()
    }

    fn initialize(&mut self) {
        self.send(
            json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"}}})
            .to_string()
            .as_bytes(),
        );
        let r = self.reply(&json!(0), &mut Vec::new());
        assert_eq!(r["result"]["serverInfo"]["name"], "sembed", "{r}");
        self.send(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    }

    /// Close stdin: the server must leave, cleanly, soon.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status:?}");
                // Nothing more was written after the session.
                while let Ok(l) = self.lines.try_recv() {
                    let _: Value = serde_json::from_str(&l).unwrap();
                }
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no exit on EOF");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn raw_input_gets_errors_never_a_crash_and_stdout_is_protocol_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    indexed_repo(dir);
    let mut s = Server::start(&[dir.to_str().unwrap(), "--no-refresh"]);
    // Not JSON at all (text, a cut message, bytes that are not UTF-8): dropped, as the official SDKs
    // do (answering unparsable input can start an error storm with a peer that echoes it), and the
    // session goes on.
    s.send(b"this is not json");
    s.send(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list""#);
    s.send(&[0xff, 0xfe, b'{', 0x80]);
    // JSON that is not a JSON-RPC message: "invalid request".
    s.send(b"[1, 2, 3]");
    assert_eq!(s.next()["error"]["code"], -32600);
    s.send(br#"{"jsonrpc":"2.0","id":"x","method":7}"#);
    assert_eq!(s.next()["error"]["code"], -32600);
    s.initialize();
    let mut others = Vec::new();
    // An unknown method, an unknown tool, arguments of the wrong type or not an object.
    for (id, body, code) in [
        (10, json!({"method": "no/such/method"}), -32601),
        (
            11,
            json!({"method": "tools/call", "params": {"name": "rm_rf", "arguments": {}}}),
            -32602,
        ),
        (
            12,
            json!({"method": "tools/call", "params": {"name": "search", "arguments": {"query": 5}}}),
            -32602,
        ),
        (
            13,
            json!({"method": "tools/call", "params": {"name": "lookup_symbol", "arguments": {"name": "x", "limit": -1}}}),
            -32602,
        ),
        (
            14,
            json!({"method": "tools/call", "params": {"name": "search", "arguments": "cache"}}),
            -32601,
        ),
    ] {
        let mut msg = body;
        msg["jsonrpc"] = json!("2.0");
        msg["id"] = json!(id);
        s.send(msg.to_string().as_bytes());
        let r = s.reply(&json!(id), &mut others);
        let got = r["error"]["code"].as_i64();
        assert!(
            got == Some(code) || (got.is_some() && code == -32601),
            "{id}: {r}"
        );
    }
    // A huge query is answered, not a crash.
    let big = "cache ".repeat(20_000);
    let r = s.call(20, "search", json!({"query": big, "k": 3}));
    assert_eq!(r["hits"].as_array().unwrap().len(), 3);
    // Still serving.
    let r = s.call(21, "lookup_symbol", json!({"name": "Cache::get"}));
    assert_eq!(r["definitions"][0]["path"], "sample.rs");
    for o in &others {
        assert!(o.get("id").is_none() || o["id"].is_null(), "{o}");
    }
    s.finish();
}

#[test]
fn a_client_that_leaves_before_a_session_is_a_clean_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    indexed_repo(dir);
    // Nothing at all, then a ping and a request without the stateless revision's metadata (answered
    // with an error): neither begins a session, and closing stdin after them ends the server with
    // success, as it does after a session.
    Server::start(&[dir.to_str().unwrap(), "--no-refresh"]).finish();
    let mut s = Server::start(&[dir.to_str().unwrap(), "--no-refresh"]);
    s.send(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#);
    let r = s.next();
    assert_eq!((&r["id"], &r["result"]), (&json!(1), &json!({})), "{r}");
    s.send(br#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#);
    let r = s.next();
    assert_eq!(
        (&r["id"], &r["error"]["code"]),
        (&json!(2), &json!(-32602)),
        "{r}"
    );
    s.finish();
}

#[test]
fn watch_mode_picks_up_an_edit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    indexed_repo(dir);
    let mut s = Server::start(&[dir.to_str().unwrap(), "--watch", "--debounce-ms", "200"]);
    s.initialize();
    // The start-up refresh, then the watcher.
    let t = Instant::now();
    let mut id = 100;
    loop {
        id += 1;
        let st = s.call(id, "index_status", json!({}));
        if st["status"]["watching"] == true && st["status"]["runs"].as_u64() >= Some(1) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(
        dir.join("pkg/added.py"),
        "def freshly_written(x):\n    return x - 1\n",
    )
    .unwrap();
    let t = Instant::now();
    loop {
        id += 1;
        let r = s.call(id, "lookup_symbol", json!({"name": "freshly_written"}));
        if r["definitions"].as_array().is_some_and(|d| !d.is_empty()) {
            assert_eq!(r["definitions"][0]["path"], "pkg/added.py");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the edit was never indexed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the index says it is current again.
    let t = Instant::now();
    loop {
        id += 1;
        let st = s.call(id, "index_status", json!({}));
        if st["status"]["pending_changes"] == 0 && st["status"]["stale_seconds"] == 0.0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.finish();
}
