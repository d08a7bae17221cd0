//! What each model reads and writes: a request's prompt as tokens, and
//! output tokens as text, with stop strings found in that text.
//!
//! The built-in model reads bytes (its chat template is a `<|role|>` line
//! per turn) and its workers find stop strings themselves, as byte tokens.
//! A checkpoint reads its `tokenizer.json` and its family's chat template;
//! its stop strings are found here, in the decoded text, because a string
//! can end inside a token: the text is cut where the string starts, and the
//! request is stopped on its worker.

use super::openai::{Prompt, Utf8Stream};
use anyhow::Context as _;
use bulkhead_core::config::{ChatTemplateName, ModelSpec};
use bulkhead_kernels::model::{
    ByteTokenizer, ModelConfig,
    bpe::{BpeTokenizer, TOKENIZER_FILE},
    chat::ChatTemplate,
    checkpoint,
};
use std::sync::Arc;

/// A model's text side.
#[derive(Debug)]
pub enum ModelText {
    /// The built-in model: bytes.
    Builtin(ByteTokenizer),
    /// A checkpoint: its tokenizer and chat template.
    Checkpoint(Box<CheckpointText>),
}

/// A checkpoint's tokenizer, template and special tokens.
#[derive(Debug)]
pub struct CheckpointText {
    name: String,
    tok: BpeTokenizer,
    template: Option<ChatTemplate>,
    bos: u32,
}

impl ModelText {
    /// The built-in model's.
    pub fn builtin() -> Self {
        Self::Builtin(ByteTokenizer::new(&ModelConfig::tiny()))
    }

    /// The text side of `spec`: for a checkpoint, its `tokenizer.json` and
    /// `config.json` are read and checked against the config (the weights
    /// are the workers' to read).
    pub fn load(spec: &ModelSpec) -> anyhow::Result<Self> {
        let Some(dir) = &spec.path else {
            return Ok(Self::builtin());
        };
        let name = &spec.name;
        // Config and weight headers: a checkpoint the workers could not load
        // is refused before any starts.
        let model = checkpoint::check(dir, name, None)
            .with_context(|| format!("model `{name}`: checking its checkpoint"))?;
        let tok = BpeTokenizer::from_file(&dir.join(TOKENIZER_FILE))
            .with_context(|| format!("model `{name}`: reading its tokenizer"))?;
        check_fit(name, &model, &tok, spec.max_context_tokens)?;
        let template = match spec.chat_template {
            Some(ChatTemplateName::Llama3) => Some(ChatTemplate::Llama3),
            Some(ChatTemplateName::Llama2) => Some(ChatTemplate::Llama2),
            Some(ChatTemplateName::None) => None,
            None => Some(ChatTemplate::detect(&tok).with_context(|| {
                format!(
                    "model `{name}`: its tokenizer's special tokens name no chat template this host knows; set chat_template = \"llama3\", \"llama2\" or \"none\" (completions only) in its [[models]] table"
                )
            })?),
        };
        Ok(Self::Checkpoint(Box::new(CheckpointText {
            name: name.clone(),
            tok,
            template,
            bos: model.bos,
        })))
    }

    /// The text side of every model of `config`, by name.
    pub fn load_all(
        config: &bulkhead_core::config::Config,
    ) -> anyhow::Result<std::collections::HashMap<String, Arc<Self>>> {
        config
            .models
            .iter()
            .map(|m| Ok((m.name.clone(), Arc::new(Self::load(m)?))))
            .collect()
    }

    /// The tokens of `prompt`; `Err` is a 400's message.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, String> {
        match self {
            Self::Builtin(bytes) => Ok(bytes.encode(&prompt.render_builtin())),
            Self::Checkpoint(c) => match prompt {
                Prompt::Text(text) => {
                    let mut tokens = vec![c.bos];
                    tokens.extend(c.tok.encode(text).map_err(|e| e.to_string())?);
                    Ok(tokens)
                }
                Prompt::Chat(turns) => {
                    let template = c.template.ok_or_else(|| {
                        format!(
                            "model {} has no chat template on this host; use /v1/completions",
                            c.name
                        )
                    })?;
                    let turns: Vec<(&str, &str)> = turns
                        .iter()
                        .map(|t| (t.role.name(), t.content.as_str()))
                        .collect();
                    template.encode(&c.tok, &turns).map_err(|e| e.to_string())
                }
            },
        }
    }

    /// Whether the model's workers find stop strings (as byte tokens);
    /// otherwise [`OutputText`] finds them.
    pub const fn worker_stops(&self) -> bool {
        matches!(self, Self::Builtin(_))
    }

    /// The bytes `tokens` decode to; `first` for the output's first tokens.
    fn bytes(&self, tokens: &[u32], first: bool) -> Vec<u8> {
        match self {
            Self::Builtin(bytes) => bytes.decode_bytes(tokens),
            Self::Checkpoint(c) => c.tok.decode_bytes_from(tokens, first),
        }
    }
}

/// Refuses a tokenizer or a context the checkpoint cannot serve.
fn check_fit(
    name: &str,
    model: &ModelConfig,
    tok: &BpeTokenizer,
    context: u32,
) -> anyhow::Result<()> {
    if tok.vocab_size() > model.vocab {
        anyhow::bail!(
            "model `{name}`: the tokenizer has {} tokens but the model's vocabulary holds {}",
            tok.vocab_size(),
            model.vocab
        );
    }
    if context as usize > model.max_context {
        anyhow::bail!(
            "model `{name}`: max_context_tokens {context} exceeds the checkpoint's max_position_embeddings {}",
            model.max_context
        );
    }
    Ok(())
}

/// One request's output as text: tokens in, whole characters out, cut at
/// the first stop string when the proxy finds them.
#[derive(Debug)]
pub struct OutputText {
    model: Arc<ModelText>,
    utf8: Utf8Stream,
    first: bool,
    /// Stop strings found here (none when the worker finds them).
    stops: Vec<String>,
    /// Text held back: it may be the start of a stop string.
    held: String,
    stopped: bool,
    /// Whether [`Self::stop_request`] said so already.
    stop_told: bool,
}

impl OutputText {
    /// The output of a request for `model` with `stops`.
    pub fn new(model: Arc<ModelText>, stops: &[String]) -> Self {
        let stops = if model.worker_stops() {
            Vec::new()
        } else {
            stops.to_vec()
        };
        Self {
            model,
            utf8: Utf8Stream::default(),
            first: true,
            stops,
            held: String::new(),
            stopped: false,
            stop_told: false,
        }
    }

    /// The text `tokens` complete (possibly empty). After a stop string,
    /// nothing more.
    pub fn push(&mut self, tokens: &[u32]) -> String {
        if self.stopped {
            return String::new();
        }
        let bytes = self.model.bytes(tokens, self.first);
        self.first &= bytes.is_empty();
        let text = self.utf8.push(&bytes);
        self.scan(text, false)
    }

    /// What is left at the end (held-back text, an unfinished character).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let text = self.utf8.finish();
        self.scan(text, true)
    }

    /// Whether a stop string ended the output.
    pub const fn stopped(&self) -> bool {
        self.stopped
    }

    /// True once, after a stop string: the request should be stopped on its worker.
    pub const fn stop_request(&mut self) -> bool {
        let tell = self.stopped && !self.stop_told;
        self.stop_told |= tell;
        tell
    }

    /// How a request whose worker finished with `reason` ended: a stop,
    /// whatever the worker saw, once a stop string cut the text (the
    /// worker may have been cancelled for it, or reached its length or end
    /// of sequence before the cancel came); an error stays an error.
    pub fn finish_reason(
        &self,
        reason: bulkhead_core::wire::FinishReason,
    ) -> bulkhead_core::wire::FinishReason {
        use bulkhead_core::wire::FinishReason;
        match reason {
            FinishReason::Cancelled | FinishReason::Length if self.stopped => FinishReason::Stop,
            other => other,
        }
    }

    fn scan(&mut self, text: String, end: bool) -> String {
        if self.stops.is_empty() {
            return text;
        }
        self.held.push_str(&text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            self.held.truncate(at);
            return std::mem::take(&mut self.held);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let keep = if end {
            0
        } else {
            self.held
                .char_indices()
                .map(|(i, _)| i)
                .find(|&i| {
                    let tail = &self.held[i..];
                    self.stops.iter().any(|s| s.starts_with(tail))
                })
                .map_or(0, |i| self.held.len() - i)
        };
        let emit = self.held.len() - keep;
        let rest = self.held.split_off(emit);
        std::mem::replace(&mut self.held, rest)
    }
}

#[cfg(test)]
mod tests;
