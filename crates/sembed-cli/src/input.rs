//! Reading texts from a file or stdin. Every line is accounted for: a malformed line is an error
//! naming its number, never skipped.

use anyhow::{bail, Context, Result};
use std::io::Read;

pub fn read_texts(path: &str, plain_lines: bool) -> Result<Vec<String>> {
    let mut bytes = Vec::new();
    if path == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("reading stdin")?;
    } else {
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("reading {path}"))?;
    }
    let name = if path == "-" { "stdin" } else { path };
    parse_texts(&bytes, plain_lines, name)
}

/// Split into lines (`\n` or `\r\n`; a final newline does not start another line) and parse each.
/// With `plain_lines`, every line is a text, empty lines included; otherwise every line must be a JSON
/// object with a string field `text` (other fields are ignored).
pub fn parse_texts(bytes: &[u8], plain_lines: bool, name: &str) -> Result<Vec<String>> {
    let mut body = bytes;
    if body.last() == Some(&b'\n') {
        body = &body[..body.len() - 1];
    }
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let mut texts = Vec::new();
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|e| {
            anyhow::anyhow!(
                "{name}:{line_no}: not valid UTF-8 (byte {} of the line)",
                e.valid_up_to() + 1
            )
        })?;
        if plain_lines {
            texts.push(line.to_string());
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| {
            format!("{name}:{line_no}: not a JSON object (use --lines for plain text)")
        })?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => texts.push(s.clone()),
            Some(_) => bail!("{name}:{line_no}: field `text` is not a string"),
            None => bail!("{name}:{line_no}: no field `text`"),
        }
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use super::parse_texts;

    #[test]
    fn jsonl_keeps_every_line_in_order() {
        let t = parse_texts(
            b"{\"text\":\"a\",\"id\":1}\n{\"text\":\"\"}\r\n{\"text\":\"c\"}\n",
            false,
            "f",
        )
        .unwrap();
        assert_eq!(t, vec!["a", "", "c"]);
    }

    #[test]
    fn malformed_lines_name_their_number() {
        let e = parse_texts(b"{\"text\":\"a\"}\n\n{\"text\":\"c\"}", false, "f").unwrap_err();
        assert!(format!("{e:#}").contains("f:2:"), "{e:#}");
        let e = parse_texts(b"{\"text\":\"a\"}\n{\"txt\":\"b\"}", false, "f").unwrap_err();
        assert!(format!("{e:#}").contains("f:2: no field `text`"), "{e:#}");
        let e = parse_texts(b"{\"text\":3}", false, "f").unwrap_err();
        assert!(format!("{e:#}").contains("f:1: field `text` is not a string"));
        let e = parse_texts(b"ok\n\xff\xfe\n", true, "f").unwrap_err();
        assert!(format!("{e:#}").contains("f:2: not valid UTF-8"), "{e:#}");
    }

    #[test]
    fn plain_lines_keep_empty_lines() {
        assert_eq!(
            parse_texts(b"a\n\nb\n", true, "f").unwrap(),
            vec!["a", "", "b"]
        );
        assert!(parse_texts(b"", true, "f").unwrap().is_empty());
    }
}
