//! The built-in model's byte-level tokenizer.

use super::ModelConfig;

/// Byte-level tokenizer: token `b` is byte `b` (0–255); BOS and EOS follow.
#[derive(Clone, Copy, Debug)]
pub struct ByteTokenizer {
    bos: u32,
    eos: u32,
}

impl ByteTokenizer {
    /// The tokenizer of a byte-level model.
    pub const fn new(cfg: &ModelConfig) -> Self {
        Self {
            bos: cfg.bos,
            eos: cfg.eos,
        }
    }

    /// BOS, then the text's UTF-8 bytes.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        std::iter::once(self.bos)
            .chain(text.bytes().map(u32::from))
            .collect()
    }

    /// The bytes of byte tokens (special tokens dropped); may split a UTF-8
    /// character, so streaming callers decode with [`Self::decode_bytes`].
    pub fn decode_bytes(&self, tokens: &[u32]) -> Vec<u8> {
        tokens
            .iter()
            .filter_map(|&t| u8::try_from(t).ok())
            .collect()
    }

    /// Text of the tokens, invalid UTF-8 replaced by U+FFFD.
    pub fn decode(&self, tokens: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(tokens)).into_owned()
    }

    /// The end-of-sequence token.
    pub const fn eos(&self) -> u32 {
        self.eos
    }
}
