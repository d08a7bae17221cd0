//! Chat templates of Llama-family checkpoints, rendered straight to tokens.
//!
//! Each template is the one its model family's `tokenizer_config.json`
//! carries (Jinja there, written out here), with one deliberate change:
//! special tokens are placed by id, and message content is encoded as text
//! with [`BpeTokenizer::encode_segment`], so a message that contains the
//! text `<|eot_id|>` cannot end its turn or open another.

use super::bpe::{BpeTokenizer, TokenizerError};

/// A chat template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatTemplate {
    /// Llama 3: `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
    Llama3,
    /// Llama 2: `<s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] assistant </s>`.
    Llama2,
}

/// Why a conversation cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template needs a special token the tokenizer lacks.
    #[error(
        "the {template} chat template needs the special token {token}, which the tokenizer lacks"
    )]
    MissingToken {
        /// The template.
        template: &'static str,
        /// The token.
        token: &'static str,
    },
    /// The conversation's shape is one the template cannot express.
    #[error("{0}")]
    Shape(String),
    /// The text has no tokens.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

impl ChatTemplate {
    /// The template's name in config files.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Llama3 => "llama3",
            Self::Llama2 => "llama2",
        }
    }

    /// The special tokens the template places.
    pub const fn special_tokens(self) -> &'static [&'static str] {
        match self {
            Self::Llama3 => &[
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            Self::Llama2 => &["<s>", "</s>"],
        }
    }

    /// The template a tokenizer's special tokens imply, if any.
    pub fn detect(tok: &BpeTokenizer) -> Option<Self> {
        let has = |t| tok.special(t).is_some();
        if has("<|start_header_id|>") && has("<|end_header_id|>") && has("<|eot_id|>") {
            Some(Self::Llama3)
        } else if has("<s>") && has("</s>") && tok.strips_leading_space() {
            Some(Self::Llama2)
        } else {
            None
        }
    }

    fn special(self, tok: &BpeTokenizer, token: &'static str) -> Result<u32, ChatError> {
        tok.special(token).ok_or(ChatError::MissingToken {
            template: self.name(),
            token,
        })
    }

    /// The tokens of `turns` (role name, content) followed by the
    /// assistant's turn, ready for the model to continue.
    pub fn encode(self, tok: &BpeTokenizer, turns: &[(&str, &str)]) -> Result<Vec<u32>, ChatError> {
        match self {
            Self::Llama3 => self.llama3(tok, turns),
            Self::Llama2 => self.llama2(tok, turns),
        }
    }

    fn llama3(self, tok: &BpeTokenizer, turns: &[(&str, &str)]) -> Result<Vec<u32>, ChatError> {
        let start = self.special(tok, "<|start_header_id|>")?;
        let end = self.special(tok, "<|end_header_id|>")?;
        let eot = self.special(tok, "<|eot_id|>")?;
        let mut out = Pieces::new(tok);
        out.special(self.special(tok, "<|begin_of_text|>")?)?;
        for &(role, content) in turns {
            let role = match role {
                "developer" => "system",
                "tool" => "ipython",
                other => other,
            };
            out.special(start)?;
            out.text(role);
            out.special(end)?;
            out.text("\n\n");
            out.text(content.trim());
            out.special(eot)?;
        }
        out.special(start)?;
        out.text("assistant");
        out.special(end)?;
        out.text("\n\n");
        out.finish()
    }

    fn llama2(self, tok: &BpeTokenizer, turns: &[(&str, &str)]) -> Result<Vec<u32>, ChatError> {
        let bos = self.special(tok, "<s>")?;
        let eos = self.special(tok, "</s>")?;
        let (system, rest) = match turns.split_first() {
            Some((&(role, content), rest)) if role == "system" || role == "developer" => {
                (Some(content), rest)
            }
            _ => (None, turns),
        };
        let mut out = Pieces::new(tok);
        for (i, &(role, content)) in rest.iter().enumerate() {
            let want = if i % 2 == 0 { "user" } else { "assistant" };
            if role != want {
                return Err(ChatError::Shape(format!(
                    "the llama2 chat template needs an optional system message, then user and assistant messages alternating, starting and ending with user; message {} is {role}",
                    i + usize::from(system.is_some())
                )));
            }
            if role == "user" {
                let content = match (i, system) {
                    (0, Some(s)) => format!("<<SYS>>\n{s}\n<</SYS>>\n\n{content}"),
                    _ => content.to_owned(),
                };
                out.special(bos)?;
                out.text("[INST] ");
                out.text(content.trim());
                out.text(" [/INST]");
            } else {
                out.text(" ");
                out.text(content.trim());
                out.text(" ");
                out.special(eos)?;
            }
        }
        if rest.len() % 2 == 0 {
            return Err(ChatError::Shape(
                "the llama2 chat template needs the last message to be the user's".into(),
            ));
        }
        out.finish()
    }
}

/// A rendered conversation as it is built: text between special tokens is
/// gathered, then encoded as one piece, as the `tokenizers` library
/// encodes a rendered template.
struct Pieces<'t> {
    tok: &'t BpeTokenizer,
    tokens: Vec<u32>,
    text: String,
}

impl<'t> Pieces<'t> {
    const fn new(tok: &'t BpeTokenizer) -> Self {
        Self {
            tok,
            tokens: Vec::new(),
            text: String::new(),
        }
    }

    fn text(&mut self, text: &str) {
        self.text.push_str(text);
    }

    fn flush(&mut self) -> Result<(), ChatError> {
        if !self.text.is_empty() {
            let first = self.tokens.is_empty();
            let tokens = self.tok.encode_segment(&self.text, first)?;
            self.tokens.extend(tokens);
            self.text.clear();
        }
        Ok(())
    }

    fn special(&mut self, id: u32) -> Result<(), ChatError> {
        self.flush()?;
        self.tokens.push(id);
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<u32>, ChatError> {
        self.flush()?;
        Ok(self.tokens)
    }
}

#[cfg(test)]
mod tests;
