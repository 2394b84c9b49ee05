//! Tokenisation through the `tokenizers` crate, with the settings sentence-transformers uses rather
//! than those stored in `tokenizer.json` (which may switch on fixed padding and its own truncation):
//! texts are encoded without special tokens, cut to `max_length` minus the special tokens on the
//! chosen side, then the post-processor adds the special tokens, so the closing token always survives.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationDirection};

pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    /// Special tokens the post-processor adds to a single sequence.
    added: usize,
}

impl TextTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path,
                message: "file not found (the model folder needs a tokenizer.json; slow tokenizers such as vocab.txt or sentencepiece.model alone are not supported)".into(),
            });
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let added = inner
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        Ok(TextTokenizer { inner, path, added })
    }

    /// Encode `texts` to ids with special tokens. Rows longer than `max_length` are cut on the given
    /// side when `truncate` is on, and are an error naming the input otherwise.
    pub fn encode(
        &self,
        texts: &[String],
        max_length: usize,
        truncate_left: bool,
        truncate: bool,
    ) -> Result<Vec<Vec<u32>>> {
        let err = |message: String| Error::Tokenizer {
            path: self.path.clone(),
            message,
        };
        if max_length <= self.added {
            return Err(Error::InvalidInput(format!(
                "max length {max_length} leaves no room for text next to {} special tokens",
                self.added
            )));
        }
        let budget = max_length - self.added;
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| err(e.to_string()))?;
        let direction = if truncate_left {
            TruncationDirection::Left
        } else {
            TruncationDirection::Right
        };
        encodings
            .into_iter()
            .enumerate()
            .map(|(i, mut enc)| {
                if enc.len() > budget {
                    if !truncate {
                        return Err(Error::InvalidInput(format!(
                            "input {i} has {} tokens, more than the maximum of {max_length} (truncation is off)",
                            enc.len() + self.added
                        )));
                    }
                    enc.truncate(budget, 0, direction);
                }
                let enc = self
                    .inner
                    .post_process(enc, None, true)
                    .map_err(|e| err(e.to_string()))?;
                Ok(enc.get_ids().to_vec())
            })
            .collect()
    }

    /// A token's string and whether it is a special (added) token.
    pub fn describe(&self, id: u32) -> Token {
        let special = self
            .inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special);
        Token {
            id,
            text: self.inner.id_to_token(id).unwrap_or_default(),
            special,
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// One token as `/tokenize` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub special: bool,
}
