//! Writing vectors as JSONL (`{"index": i, "embedding": [...]}` per input, in input order) or `.npy`.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

pub fn write(vectors: &[Vec<f32>], path: Option<&Path>, npy: bool) -> Result<()> {
    let mut out: Box<dyn Write> = match path {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => {
            if npy && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                bail!("refusing to write binary .npy to a terminal: use --output FILE");
            }
            Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
        }
    };
    if npy {
        write_npy(&mut out, vectors)?;
    } else {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            index: usize,
            embedding: &'a [f32],
        }
        for (index, v) in vectors.iter().enumerate() {
            serde_json::to_writer(
                &mut out,
                &Row {
                    index,
                    embedding: v,
                },
            )?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// NPY format version 1.0, little-endian f32, C order, shape (n, d). The format is a 10-byte preamble
/// plus a Python-dict header; writing it directly avoids pulling in an array library for one call.
pub fn write_npy(out: &mut dyn Write, vectors: &[Vec<f32>]) -> Result<()> {
    let d = vectors.first().map_or(0, |v| v.len());
    if vectors.iter().any(|v| v.len() != d) {
        bail!("vectors of different lengths cannot form an .npy matrix");
    }
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        vectors.len(),
        d
    );
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&(header.len() as u16).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    for v in vectors {
        for x in v {
            out.write_all(&x.to_le_bytes())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn npy_header_is_aligned_and_well_formed() {
        let mut buf = Vec::new();
        super::write_npy(&mut buf, &[vec![1.0, 2.0], vec![3.0, 4.0]]).unwrap();
        let hl = u16::from_le_bytes([buf[8], buf[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0);
        let h = std::str::from_utf8(&buf[10..10 + hl]).unwrap();
        assert!(h.contains("'shape': (2, 2)") && h.ends_with('\n'));
        assert_eq!(buf.len(), 10 + hl + 16);
        assert_eq!(
            f32::from_le_bytes(buf[10 + hl + 12..].try_into().unwrap()),
            4.0
        );
    }
}
