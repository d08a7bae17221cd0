//! Shapes of a Llama-architecture model.

/// The shapes and constants of a Llama-architecture decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The name requests use for it.
    pub name: String,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads per layer.
    pub heads: usize,
    /// Key/value heads per layer (grouped-query attention: `heads` is a multiple).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Inner width of the SwiGLU feed-forward.
    pub ffn: usize,
    /// Longest sequence (prompt + output) in tokens.
    pub max_context: usize,
    /// Rotary embedding base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Beginning-of-sequence token.
    pub bos: u32,
    /// End-of-sequence token: generating it ends a request.
    pub eos: u32,
    /// Further tokens that end a request as [`Self::eos`] does (an instruct
    /// model's end-of-turn token, say); empty for the built-in model.
    pub extra_eos: Vec<u32>,
}

/// Why a [`ModelConfig`] cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelConfigError {
    /// A dimension that must be positive is zero.
    #[error("model `{model}`: {field} must be greater than zero")]
    Zero {
        /// The model.
        model: String,
        /// The field.
        field: &'static str,
    },
    /// Query heads are not a multiple of key/value heads.
    #[error("model `{model}`: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")]
    Grouping {
        /// The model.
        model: String,
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
    },
    /// Rotary embeddings rotate pairs of elements.
    #[error("model `{model}`: head_dim ({head_dim}) must be even and at most 256")]
    HeadDim {
        /// The model.
        model: String,
        /// Elements per head.
        head_dim: usize,
    },
    /// A dimension past what any model here has (and past what fits in memory).
    #[error("model `{model}`: {field} ({value}) is larger than {max}")]
    TooLarge {
        /// The model.
        model: String,
        /// The field.
        field: &'static str,
        /// Its value.
        value: usize,
        /// The largest accepted.
        max: usize,
    },
    /// A float that must be a positive number is not.
    #[error("model `{model}`: {field} ({value}) must be a positive finite number")]
    NotPositive {
        /// The model.
        model: String,
        /// The field.
        field: &'static str,
        /// Its value, as written.
        value: String,
    },
    /// A special token is outside the vocabulary.
    #[error("model `{model}`: token {token} is outside the vocabulary of {vocab}")]
    Token {
        /// The model.
        model: String,
        /// The token.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
}

impl ModelConfig {
    /// The largest vocabulary accepted (a tokenizer's ids are held to it too).
    pub const MAX_VOCAB: usize = 1 << 22;

    /// The built-in model: byte-level vocabulary, 4 layers of width 256, GQA 8:2.
    pub fn tiny() -> Self {
        Self {
            name: "bulkhead-tiny".to_owned(),
            vocab: 258,
            hidden: 256,
            layers: 4,
            heads: 8,
            kv_heads: 2,
            head_dim: 32,
            ffn: 768,
            max_context: 2048,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            bos: 256,
            eos: 257,
            extra_eos: Vec::new(),
        }
    }

    /// Checks the shapes; every backend relies on them.
    pub fn validate(&self) -> Result<(), ModelConfigError> {
        let model = || self.name.clone();
        for (field, value) in [
            ("vocab", self.vocab),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
            ("max_context", self.max_context),
        ] {
            if value == 0 {
                return Err(ModelConfigError::Zero {
                    model: model(),
                    field,
                });
            }
        }
        // Bounds far past any Llama-family model, so that shapes built from
        // a config file (heads x head_dim, one name per layer) stay small.
        for (field, value, max) in [
            ("vocab", self.vocab, Self::MAX_VOCAB),
            ("hidden", self.hidden, 1 << 16),
            ("layers", self.layers, 1 << 10),
            ("heads", self.heads, 1 << 10),
            ("kv_heads", self.kv_heads, 1 << 10),
            ("ffn", self.ffn, 1 << 20),
            ("max_context", self.max_context, 1 << 24),
        ] {
            if value > max {
                return Err(ModelConfigError::TooLarge {
                    model: model(),
                    field,
                    value,
                    max,
                });
            }
        }
        for (field, value) in [("rope_theta", self.rope_theta), ("rms_eps", self.rms_eps)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ModelConfigError::NotPositive {
                    model: model(),
                    field,
                    value: value.to_string(),
                });
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(ModelConfigError::Grouping {
                model: model(),
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim > 256 {
            return Err(ModelConfigError::HeadDim {
                model: model(),
                head_dim: self.head_dim,
            });
        }
        for &token in [self.bos, self.eos].iter().chain(&self.extra_eos) {
            if token as usize >= self.vocab {
                return Err(ModelConfigError::Token {
                    model: model(),
                    token,
                    vocab: self.vocab,
                });
            }
        }
        Ok(())
    }

    /// Whether generating `token` ends a request.
    pub fn is_eos(&self, token: u32) -> bool {
        token == self.eos || self.extra_eos.contains(&token)
    }

    /// Width of the fused Q, K, V projection's output.
    pub const fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Query heads sharing one key/value head.
    pub const fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The attention scale, `1 / sqrt(head_dim)`.
    #[allow(clippy::cast_precision_loss)] // head_dim <= 256
    pub fn attn_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}
