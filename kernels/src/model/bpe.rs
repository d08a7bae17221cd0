//! A BPE tokenizer read from a Hugging Face `tokenizer.json`, for
//! Llama-family checkpoints: the byte-level kind (GPT-2's, Llama 3's:
//! regex pre-tokenization, bytes mapped to printable characters) and the
//! `SentencePiece` kind (Llama 2's, Mistral's: spaces as `▁`, byte fallback).
//!
//! Encoding follows the `tokenizers` library's for those two kinds, and a
//! configuration outside them is refused by name rather than approximated.
//! One difference is deliberate: [`BpeTokenizer::encode`] never turns text
//! into a special token. A tenant's prompt that contains `<|eot_id|>` is
//! those characters, not the end of its turn; chat templates place special
//! tokens by id ([`BpeTokenizer::special`]).

use super::ModelConfig;
use fancy_regex::Regex;
use serde::Deserialize;
use serde_json::Value;
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    path::Path,
};

/// The file a checkpoint directory keeps its tokenizer in.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Why a `tokenizer.json` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a tokenizer of the kinds read here.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong or unsupported.
        detail: String,
    },
    /// Text that has no tokens (a character outside the vocabulary, no byte fallback, no unknown token).
    #[error("the text holds {what}, which this tokenizer has no token for")]
    Untokenizable {
        /// The character or byte.
        what: String,
    },
    /// The pre-tokenizer's regex gave up on the text (its backtracking limits).
    #[error("the tokenizer's pre-tokenizer regex could not split the text: {0}")]
    Split(String),
}

/// How text becomes pre-tokens and pre-token characters become symbols.
#[derive(Clone, Debug)]
enum Kind {
    /// Byte-level: pre-tokens split by regexes, each byte mapped to a printable character.
    ByteLevel {
        /// Splits applied in order, each to the pieces of the one before.
        splits: Vec<Regex>,
        /// Prepend a space to text that does not start with one.
        add_prefix_space: bool,
    },
    /// SentencePiece-style: spaces become `▁`, one pre-token for the whole text.
    Metaspace {
        /// When a piece of text gets a `▁` in front.
        prepend: Prepend,
        /// Drop one leading space when decoding (what the prepended `▁` became).
        strip_leading_space: bool,
    },
}

/// When `SentencePiece`-style text gets a `▁` in front (text between
/// special tokens comes in pieces).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prepend {
    /// Never.
    Never,
    /// The first piece, unless it starts with `▁` (`Metaspace`, scheme `first`).
    First,
    /// Every piece that does not start with `▁` (`Metaspace`, scheme `always`).
    Always,
    /// Every piece, always (the legacy `Prepend` normalizer).
    Legacy,
}

/// A BPE tokenizer.
#[derive(Clone, Debug)]
pub struct BpeTokenizer {
    kind: Kind,
    /// Token text (in the vocabulary's alphabet) → id.
    vocab: HashMap<String, u32>,
    /// Id → token text; `None` for ids with no text.
    pieces: Vec<Option<String>>,
    /// Decoded bytes per id (specials: none).
    bytes: Vec<Vec<u8>>,
    /// (left, right) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Take a whole pre-token that is in the vocabulary as it is.
    ignore_merges: bool,
    byte_fallback: bool,
    /// `<0xXX>` ids, when byte fallback is on.
    byte_tokens: Vec<Option<u32>>,
    unk: Option<u32>,
    /// Added tokens: content → id.
    added: HashMap<String, u32>,
    /// Which ids are special (never decoded to text).
    special: Vec<bool>,
    /// [`byte_char`] of every byte, for byte-level pre-tokens.
    byte_chars: [char; 256],
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
    #[serde(default)]
    normalizer: Option<Value>,
    #[serde(default)]
    pre_tokenizer: Option<Value>,
    #[serde(default)]
    decoder: Option<Value>,
    model: Model,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    special: bool,
}

#[derive(Deserialize)]
struct Model {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    dropout: Option<f64>,
    #[serde(default)]
    unk_token: Option<String>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    byte_fallback: bool,
    #[serde(default)]
    ignore_merges: bool,
    vocab: HashMap<String, u32>,
    merges: Vec<Value>,
}

/// GPT-2's pre-tokenization regex, used by a byte-level pre-tokenizer with `use_regex`.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// `SentencePiece`'s space.
const SPACE: char = '▁';

/// Whether GPT-2's byte map keeps `b` as the character of the same code.
const fn printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The printable character GPT-2's byte-level alphabet writes byte `b` as
/// (bytes that are not printable go to U+0100 on, in order): how a
/// byte-level `tokenizer.json` spells its tokens.
pub fn byte_char(b: u8) -> char {
    if printable(b) {
        return char::from(b);
    }
    let below = (0..b).filter(|&x| !printable(x)).count();
    char::from_u32(256 + u32::try_from(below).expect("under 256")).expect("below U+0200")
}

/// A byte-level `tokenizer.json` (GPT-2's pre-tokenizer and decoder) whose
/// ids 0-255 are the bytes, as the built-in model's are; then the token of
/// each of `merges` (raw text, in rank order), then `extra` tokens (raw
/// text), then `specials` as special added tokens. With
/// [`super::checkpoint::save`], a checkpoint of the built-in model's kind.
pub fn byte_level_json(
    merges: &[(&str, &str)],
    extra: &[&str],
    specials: &[&str],
) -> serde_json::Value {
    let spell = |text: &str| -> String { text.bytes().map(byte_char).collect() };
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), u32::from(b).into());
    }
    let tokens = merges
        .iter()
        .map(|(a, b)| format!("{a}{b}"))
        .chain(extra.iter().map(|e| (*e).to_owned()));
    for token in tokens {
        let next = vocab.len();
        vocab.entry(spell(&token)).or_insert_with(|| next.into());
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": vocab.len() + i, "content": t, "special": true}))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel"},
        "model": {
            "type": "BPE",
            "vocab": vocab,
            "merges": merges
                .iter()
                .map(|(a, b)| format!("{} {}", spell(a), spell(b)))
                .collect::<Vec<_>>(),
        },
    })
}

/// [`byte_char`] for every byte, and its inverse.
fn byte_alphabet() -> ([char; 256], HashMap<char, u8>) {
    let mut map = ['\0'; 256];
    for b in 0..=255u8 {
        map[usize::from(b)] = byte_char(b);
    }
    let inverse = map
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, u8::try_from(b).expect("256 entries")))
        .collect();
    (map, inverse)
}

fn invalid(path: &str, detail: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

fn type_of(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("(no type)")
}

/// The components of a `Sequence` (under `key`), or the one component.
fn flatten<'a>(v: &'a Value, key: &str) -> Vec<&'a Value> {
    if type_of(v) == "Sequence" {
        v.get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    } else {
        vec![v]
    }
}

/// The regex of a `Split` pre-tokenizer, checked to be the supported form.
fn split_regex(path: &str, v: &Value) -> Result<Regex, TokenizerError> {
    let behavior = v.get("behavior").and_then(Value::as_str).unwrap_or("");
    let invert = v.get("invert").and_then(Value::as_bool).unwrap_or(false);
    if behavior != "Isolated" || invert {
        return Err(invalid(
            path,
            format!(
                "a Split pre-tokenizer with behavior {behavior:?}, invert {invert} is not supported (Isolated, not inverted, is)"
            ),
        ));
    }
    let pattern = v.get("pattern");
    let source = pattern
        .and_then(|p| p.get("Regex"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            pattern
                .and_then(|p| p.get("String"))
                .and_then(Value::as_str)
                .map(fancy_regex::escape)
                .map(std::borrow::Cow::into_owned)
        })
        .ok_or_else(|| invalid(path, "a Split pre-tokenizer without a pattern"))?;
    Regex::new(&source).map_err(|e| invalid(path, format!("the Split regex does not compile: {e}")))
}

/// The [`Kind::ByteLevel`] of a byte-level pre-tokenizer (with any `Split`s before it).
fn byte_level_kind(
    path: &str,
    normalizers: &[&Value],
    pre: &[&Value],
    decoders: &[&Value],
) -> Result<Kind, TokenizerError> {
    if let Some(n) = normalizers.first() {
        return Err(invalid(
            path,
            format!(
                "a {} normalizer with a byte-level pre-tokenizer is not supported",
                type_of(n)
            ),
        ));
    }
    let mut splits = Vec::new();
    let mut add_prefix_space = false;
    for p in pre {
        match type_of(p) {
            "Split" => splits.push(split_regex(path, p)?),
            "ByteLevel" => {
                add_prefix_space = p
                    .get("add_prefix_space")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if p.get("use_regex").and_then(Value::as_bool).unwrap_or(true) {
                    splits.push(Regex::new(GPT2_SPLIT).expect("GPT-2's regex compiles"));
                }
            }
            other => {
                return Err(invalid(
                    path,
                    format!("a {other} pre-tokenizer is not supported"),
                ));
            }
        }
    }
    if !decoders.iter().any(|d| type_of(d) == "ByteLevel") {
        return Err(invalid(
            path,
            "a byte-level pre-tokenizer needs a ByteLevel decoder",
        ));
    }
    Ok(Kind::ByteLevel {
        splits,
        add_prefix_space,
    })
}

/// Reads the normalizer, pre-tokenizer and decoder into a [`Kind`].
fn kind_of(path: &str, file: &File) -> Result<Kind, TokenizerError> {
    let normalizers: Vec<&Value> = file
        .normalizer
        .as_ref()
        .filter(|v| !v.is_null())
        .map(|v| flatten(v, "normalizers"))
        .unwrap_or_default();
    let pre: Vec<&Value> = file
        .pre_tokenizer
        .as_ref()
        .filter(|v| !v.is_null())
        .map(|v| flatten(v, "pretokenizers"))
        .unwrap_or_default();
    let decoders: Vec<&Value> = file
        .decoder
        .as_ref()
        .filter(|v| !v.is_null())
        .map(|v| flatten(v, "decoders"))
        .unwrap_or_default();
    if pre.iter().any(|p| type_of(p) == "ByteLevel") {
        return byte_level_kind(path, &normalizers, &pre, &decoders);
    }
    // SentencePiece-style: a Metaspace pre-tokenizer, or the legacy
    // normalizers (Prepend `▁`, Replace ' ' → `▁`) with none.
    let prepend = match (pre.as_slice(), normalizers.as_slice()) {
        ([p], []) if type_of(p) == "Metaspace" => {
            if p.get("split").and_then(Value::as_bool).unwrap_or(true) {
                return Err(invalid(
                    path,
                    "a Metaspace pre-tokenizer with split = true is not supported",
                ));
            }
            match p.get("prepend_scheme").and_then(Value::as_str) {
                Some("never") => Prepend::Never,
                Some("first") => Prepend::First,
                Some("always") | None => Prepend::Always,
                Some(other) => {
                    return Err(invalid(
                        path,
                        format!("a Metaspace prepend_scheme {other:?} is not supported"),
                    ));
                }
            }
        }
        ([], [a, b])
            if type_of(a) == "Prepend"
                && a.get("prepend").and_then(Value::as_str) == Some("▁")
                && type_of(b) == "Replace"
                && b.pointer("/pattern/String").and_then(Value::as_str) == Some(" ")
                && b.get("content").and_then(Value::as_str) == Some("▁") =>
        {
            Prepend::Legacy
        }
        _ => {
            let names: Vec<&str> = normalizers.iter().chain(&pre).map(|v| type_of(v)).collect();
            return Err(invalid(
                path,
                format!(
                    "normalizer and pre-tokenizer {names:?} are neither byte-level nor SentencePiece-style (Metaspace, or Prepend + Replace)"
                ),
            ));
        }
    };
    let strip_leading_space = decoders.iter().any(|d| {
        (type_of(d) == "Strip" && d.get("start").and_then(Value::as_u64) == Some(1))
            || (type_of(d) == "Metaspace"
                && d.get("prepend_scheme").and_then(Value::as_str) != Some("never"))
    });
    Ok(Kind::Metaspace {
        prepend,
        strip_leading_space,
    })
}

/// A merge rule as written: `"a b"` or `["a", "b"]`.
fn merge_pair(v: &Value) -> Option<(String, String)> {
    match v {
        Value::String(s) => {
            let (a, b) = s.split_once(' ')?;
            Some((a.to_owned(), b.to_owned()))
        }
        Value::Array(a) if a.len() == 2 => {
            Some((a[0].as_str()?.to_owned(), a[1].as_str()?.to_owned()))
        }
        _ => None,
    }
}

/// The byte a `SentencePiece` byte token (`<0x0A>`) stands for.
fn byte_token(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl BpeTokenizer {
    /// Reads `path` (a `tokenizer.json`).
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| TokenizerError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_json(&shown, &text)
    }

    /// Reads a `tokenizer.json`'s contents; `path` names it in errors.
    #[allow(clippy::too_many_lines)] // one pass over the file's sections, in order
    pub fn from_json(path: &str, json: &[u8]) -> Result<Self, TokenizerError> {
        let file: File = serde_json::from_slice(json)
            .map_err(|e| invalid(path, format!("not a tokenizer.json: {e}")))?;
        let model = &file.model;
        if let Some(kind) = model.kind.as_deref().filter(|k| *k != "BPE") {
            return Err(invalid(
                path,
                format!("a {kind} model is not supported (BPE is)"),
            ));
        }
        if model.dropout.is_some_and(|d| d > 0.0) {
            return Err(invalid(path, "BPE dropout is not supported"));
        }
        if model.continuing_subword_prefix.is_some() || model.end_of_word_suffix.is_some() {
            return Err(invalid(
                path,
                "continuing_subword_prefix and end_of_word_suffix are not supported",
            ));
        }
        let kind = kind_of(path, &file)?;
        // Encoding reads the model's vocabulary only: added tokens are never
        // produced from text.
        let vocab = model.vocab.clone();
        let size = vocab
            .values()
            .chain(file.added_tokens.iter().map(|t| &t.id))
            .max()
            .map_or(0, |&m| m as usize + 1);
        // Ids past the largest vocabulary are refused before tables are sized by them.
        if size > ModelConfig::MAX_VOCAB {
            return Err(invalid(
                path,
                format!(
                    "token id {} is past the largest vocabulary accepted ({})",
                    size - 1,
                    ModelConfig::MAX_VOCAB
                ),
            ));
        }
        // Text never becomes a special token: no added token may share an id
        // with a vocabulary entry of other content.
        let by_id: HashMap<u32, &String> = vocab.iter().map(|(p, &id)| (id, p)).collect();
        if let Some((t, piece)) = file.added_tokens.iter().find_map(|t| {
            by_id
                .get(&t.id)
                .filter(|p| ***p != t.content)
                .map(|p| (t, p))
        }) {
            return Err(invalid(
                path,
                format!(
                    "added token {:?} has id {}, which the vocabulary gives to {piece:?}",
                    t.content, t.id
                ),
            ));
        }
        let mut pieces = vec![None; size];
        for (piece, &id) in &vocab {
            pieces[id as usize] = Some(piece.clone());
        }
        for t in &file.added_tokens {
            pieces[t.id as usize] = Some(t.content.clone());
        }
        let mut merges = HashMap::with_capacity(model.merges.len());
        for (rank, m) in model.merges.iter().enumerate() {
            let (a, b) = merge_pair(m)
                .ok_or_else(|| invalid(path, format!("merge {rank} is not a pair: {m}")))?;
            let id = |s: &str| {
                vocab.get(s).copied().ok_or_else(|| {
                    invalid(path, format!("merge {rank} ({a:?}, {b:?}) names {s:?}, which is not in the vocabulary"))
                })
            };
            let pair = (id(&a)?, id(&b)?);
            let joined = id(&format!("{a}{b}"))?;
            let rank = u32::try_from(rank).map_err(|_| invalid(path, "too many merges"))?;
            merges.entry(pair).or_insert((rank, joined));
        }
        let mut special = vec![false; size];
        let mut added = HashMap::new();
        for t in &file.added_tokens {
            special[t.id as usize] = t.special;
            added.insert(t.content.clone(), t.id);
        }
        let mut byte_tokens = vec![None; 256];
        if model.byte_fallback {
            for (piece, &id) in &model.vocab {
                if let Some(b) = byte_token(piece) {
                    byte_tokens[usize::from(b)] = Some(id);
                }
            }
        }
        let unk = match &model.unk_token {
            Some(u) => Some(*vocab.get(u).or_else(|| added.get(u)).ok_or_else(|| {
                invalid(path, format!("unk_token {u:?} is not in the vocabulary"))
            })?),
            None => None,
        };
        let (byte_chars, inverse) = byte_alphabet();
        let bytes = pieces
            .iter()
            .enumerate()
            .map(|(id, piece)| {
                let Some(piece) = piece else {
                    return Vec::new();
                };
                if special[id] {
                    return Vec::new();
                }
                if added.contains_key(piece) {
                    return piece.as_bytes().to_vec();
                }
                match &kind {
                    Kind::ByteLevel { .. } => piece
                        .chars()
                        .map(|c| inverse.get(&c).copied())
                        .collect::<Option<Vec<u8>>>()
                        .unwrap_or_else(|| piece.as_bytes().to_vec()),
                    Kind::Metaspace { .. } => match (model.byte_fallback, byte_token(piece)) {
                        (true, Some(b)) => vec![b],
                        _ => piece.replace(SPACE, " ").into_bytes(),
                    },
                }
            })
            .collect();
        Ok(Self {
            kind,
            vocab,
            pieces,
            bytes,
            merges,
            ignore_merges: model.ignore_merges,
            byte_fallback: model.byte_fallback,
            byte_tokens,
            unk,
            added,
            special,
            byte_chars,
        })
    }

    /// Ids in use: one more than the largest.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The id of an added token (`<|begin_of_text|>`, `</s>`, ...), for templates.
    pub fn special(&self, content: &str) -> Option<u32> {
        self.added.get(content).copied()
    }

    /// Whether `id` is a special token (decodes to nothing).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The token text of `id` in the vocabulary's alphabet.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize)?.as_deref()
    }

    /// `text`'s tokens, with no special tokens added and none recognized in it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_segment(text, true)
    }

    /// The tokens of a piece of text that sits between special tokens;
    /// `first` when nothing comes before it. As the `tokenizers` library
    /// encodes the text between added tokens: a `Metaspace` pre-tokenizer
    /// whose scheme is `first` prepends `▁` to the first piece only.
    pub fn encode_segment(&self, text: &str, first: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        match &self.kind {
            Kind::ByteLevel {
                splits,
                add_prefix_space,
            } => {
                let owned;
                let text = if *add_prefix_space && !text.starts_with(' ') {
                    owned = format!(" {text}");
                    owned.as_str()
                } else {
                    text
                };
                let mut word = String::new();
                for piece in split_all(splits, text)? {
                    word.clear();
                    word.extend(piece.bytes().map(|b| self.byte_chars[usize::from(b)]));
                    self.word(&word, &mut out)?;
                }
            }
            Kind::Metaspace { prepend, .. } => {
                if text.is_empty() {
                    return Ok(out);
                }
                let mut word = text.replace(' ', "▁");
                let add = match prepend {
                    Prepend::Never => false,
                    Prepend::First => first && !word.starts_with(SPACE),
                    Prepend::Always => !word.starts_with(SPACE),
                    Prepend::Legacy => true,
                };
                if add {
                    word.insert(0, SPACE);
                }
                self.word(&word, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Appends the tokens of one pre-token to `out`.
    fn word(&self, word: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        if word.is_empty() {
            return Ok(());
        }
        if self.ignore_merges
            && let Some(&id) = self.vocab.get(word)
        {
            out.push(id);
            return Ok(());
        }
        let mut symbols: Vec<u32> = Vec::with_capacity(word.len());
        let mut buf = [0u8; 4];
        for c in word.chars() {
            if let Some(&id) = self.vocab.get(c.encode_utf8(&mut buf) as &str) {
                symbols.push(id);
            } else if self.byte_fallback {
                for b in c.encode_utf8(&mut buf).bytes() {
                    match self.byte_tokens[usize::from(b)] {
                        Some(id) => symbols.push(id),
                        None => {
                            return Err(TokenizerError::Untokenizable {
                                what: format!("byte 0x{b:02X}"),
                            });
                        }
                    }
                }
            } else if let Some(unk) = self.unk {
                symbols.push(unk);
            } else {
                return Err(TokenizerError::Untokenizable {
                    what: format!("{c:?}"),
                });
            }
        }
        out.extend(self.merge(symbols));
        Ok(())
    }

    /// Applies merges, lowest rank first (leftmost among equals), in
    /// O(n log n): a heap of candidate pairs over a linked list of symbols.
    fn merge(&self, mut symbols: Vec<u32>) -> Vec<u32> {
        const GONE: u32 = u32::MAX;
        let n = symbols.len();
        if n < 2 {
            return symbols;
        }
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        // (rank, position, left id, right id): stale entries are skipped.
        let mut heap = BinaryHeap::with_capacity(n);
        let push = |heap: &mut BinaryHeap<Reverse<(u32, usize, u32, u32)>>,
                    symbols: &[u32],
                    i: usize,
                    j: usize| {
            if let Some(&(rank, _)) = self.merges.get(&(symbols[i], symbols[j])) {
                heap.push(Reverse((rank, i, symbols[i], symbols[j])));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, &symbols, i, i + 1);
        }
        while let Some(Reverse((_, i, left, right))) = heap.pop() {
            let j = next[i];
            if symbols[i] != left || j >= n || symbols[j] != right {
                continue;
            }
            let (_, merged) = self.merges[&(left, right)];
            symbols[i] = merged;
            symbols[j] = GONE;
            let after = next[j];
            next[i] = after;
            if after < n {
                prev[after] = i;
            }
            let before = prev[i];
            if before < n {
                push(&mut heap, &symbols, before, i);
            }
            if after < n {
                push(&mut heap, &symbols, i, after);
            }
        }
        symbols.retain(|&s| s != GONE);
        symbols
    }

    /// The bytes `id` decodes to (none for special tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Whether decoding drops one leading space of the output.
    pub const fn strips_leading_space(&self) -> bool {
        matches!(
            self.kind,
            Kind::Metaspace {
                strip_leading_space: true,
                ..
            }
        )
    }

    /// The bytes of `tokens`, special tokens dropped, as the `tokenizers`
    /// library decodes them with `skip_special_tokens`.
    pub fn decode_bytes(&self, tokens: &[u32]) -> Vec<u8> {
        self.decode_bytes_from(tokens, true)
    }

    /// [`Self::decode_bytes`] of tokens that continue an output when not
    /// `at_start` (the leading space a `SentencePiece` decoder strips is
    /// stripped at the start of an output only).
    pub fn decode_bytes_from(&self, tokens: &[u32], at_start: bool) -> Vec<u8> {
        let mut out: Vec<u8> = tokens
            .iter()
            .flat_map(|&t| self.token_bytes(t).iter().copied())
            .collect();
        if at_start && self.strips_leading_space() && out.first() == Some(&b' ') {
            out.remove(0);
        }
        out
    }

    /// Text of the tokens, invalid UTF-8 replaced by U+FFFD.
    pub fn decode(&self, tokens: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(tokens)).into_owned()
    }
}

/// Whitespace runs longer than this many characters are cut into pieces
/// of at most this many before the regexes run: a backtracking regex's
/// stack grows with a run (`\s+(?!\S)`), and a run of some 500,000 would
/// overflow it. Only such runs tokenize differently from the `tokenizers`
/// library (which takes a run as one piece).
const LONG_RUN: usize = 32_768;
/// Characters at the end of a long run left with the text after it, so
/// the regexes see how the run ends as they would without the cut.
const RUN_TAIL: usize = 1_024;

/// `text` with its whitespace runs of more than [`LONG_RUN`] characters
/// cut: each such run's head in pieces of [`LONG_RUN`] characters, its
/// last [`RUN_TAIL`] characters kept with what follows.
fn cut_long_runs(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut from = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if !c.is_whitespace() {
            continue;
        }
        // The run's character boundaries, after its first character.
        let mut bounds = vec![start];
        while let Some(&(i, c)) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            bounds.push(i);
            chars.next();
        }
        if bounds.len() <= LONG_RUN {
            continue;
        }
        if start > from {
            pieces.push(&text[from..start]);
        }
        let keep_from = bounds[bounds.len() - RUN_TAIL];
        let mut at = 0;
        while bounds[at] < keep_from {
            let end = bounds
                .get(at + LONG_RUN)
                .map_or(keep_from, |&e| e.min(keep_from));
            pieces.push(&text[bounds[at]..end]);
            at = (at + LONG_RUN).min(bounds.len() - RUN_TAIL);
        }
        from = keep_from;
    }
    if from < text.len() || pieces.is_empty() {
        pieces.push(&text[from..]);
    }
    pieces
}

/// The pieces of `text` after each regex in turn isolates its matches.
fn split_all<'t>(splits: &[Regex], text: &'t str) -> Result<Vec<&'t str>, TokenizerError> {
    let mut pieces = if splits.is_empty() {
        vec![text]
    } else {
        cut_long_runs(text)
    };
    for re in splits {
        let mut next = Vec::with_capacity(pieces.len() * 2);
        for piece in pieces {
            let mut last = 0;
            for m in re.find_iter(piece) {
                let m = m.map_err(|e| TokenizerError::Split(e.to_string()))?;
                if m.start() > last {
                    next.push(&piece[last..m.start()]);
                }
                if m.end() > m.start() {
                    next.push(m.as_str());
                }
                last = m.end();
            }
            if last < piece.len() {
                next.push(&piece[last..]);
            }
        }
        pieces = next;
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests;
