//! Print the chunks of files (kind, symbol, lines), with a character-count budget: a quick look at
//! how the chunker cuts a language. `cargo run --example chunks -- FILE...`
fn main() {
    let count = |s: &str| s.len() / 4 + 2;
    let budget = sembed_index::chunk::Budget {
        max_tokens: 512,
        count: &count,
        window_lines: 40,
        overlap_lines: 5,
        split_definitions: false,
    };
    for path in std::env::args().skip(1) {
        let src = std::fs::read_to_string(&path).expect("read");
        for c in sembed_index::chunk::chunk_file(&path, &src, &budget) {
            println!(
                "{path}:{}-{} {} {} [{}/{}]",
                c.start_line,
                c.end_line,
                c.kind,
                c.symbol.as_deref().unwrap_or("-"),
                c.part,
                c.parts
            );
        }
    }
}
