//! A Llama-family checkpoint from a local directory, as Hugging Face
//! writes one: `config.json`, the weights in `model.safetensors` (or shards
//! listed by `model.safetensors.index.json`), and optionally
//! `generation_config.json` (further end-of-sequence tokens).
//!
//! Everything is checked before it is used: the architecture, every shape,
//! every dtype, and that no tensor is left over (a bias or a scale this
//! model would silently ignore is refused, naming it). Weights in F32, F16
//! or BF16 are widened to f32, the backends' format.

use super::{LayerWeights, ModelConfig, ModelConfigError, Weights};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The config file of a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// The weights of a single-file checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Optional: generation defaults, of which only the end-of-sequence tokens are read.
pub const GENERATION_FILE: &str = "generation_config.json";

/// Why a checkpoint cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A JSON file does not parse as what it should hold.
    #[error("{}: {detail}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its line and column.
        detail: String,
    },
    /// The checkpoint is of an architecture or a feature this model does not implement.
    #[error("{}: {detail}", path.display())]
    Unsupported {
        /// The file that says so.
        path: PathBuf,
        /// What is not supported.
        detail: String,
    },
    /// The shapes `config.json` gives are not a valid model.
    #[error("{}: {source}", path.display())]
    Config {
        /// `config.json`.
        path: PathBuf,
        /// What is wrong.
        source: ModelConfigError,
    },
    /// A safetensors file is malformed.
    #[error("{}: not a valid safetensors file: {detail}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's words.
        detail: String,
    },
    /// A tensor the model needs is in no file.
    #[error("{}: tensor `{name}` is missing", dir.display())]
    Missing {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The tensor.
        name: String,
    },
    /// A tensor has another shape than `config.json` implies.
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?}", path.display())]
    Shape {
        /// The file holding it.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its shape.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor is in a dtype that is not read.
    #[error("{}: tensor `{name}` is {dtype}; F32, F16 and BF16 are read", path.display())]
    Dtype {
        /// The file holding it.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A tensor the model would not use (a bias, a quantization scale, ...).
    #[error(
        "{}: tensor `{name}` is not part of a Llama-architecture model (biases, quantization scales and other extras are not supported)",
        path.display()
    )]
    Unused {
        /// The file holding it.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
}

/// A loaded checkpoint: its shapes and its weights, ready for a backend.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The shapes, named as requests name the model.
    pub config: ModelConfig,
    /// The weights in the backends' layout (Q, K, V fused; gate and up fused).
    pub weights: Weights,
}

/// A token id or a list of them, as `config.json` writes `eos_token_id`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn ids(self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![id],
            Self::Many(ids) => ids,
        }
    }
}

/// The fields of `config.json` that are read; the rest is ignored.
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    intermediate_size: usize,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    rope_theta: Option<f32>,
    #[serde(default)]
    rms_norm_eps: Option<f32>,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    sliding_window: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct GenerationConfig {
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// Architectures whose checkpoints are this model exactly (no biases, RMSNorm, SwiGLU, rotate-half RoPE).
const ARCHITECTURES: [&str; 2] = ["LlamaForCausalLM", "MistralForCausalLM"];
/// The context assumed when `config.json` gives none.
const DEFAULT_CONTEXT: usize = 2048;

fn read(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CheckpointError> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Json {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// The model's shapes from `dir`'s `config.json` (and end-of-sequence
/// tokens from `generation_config.json` when present; `name` is what
/// requests call it), and whether the LM head is tied to the embedding.
fn parse_config(dir: &Path, name: &str) -> Result<(ModelConfig, bool), CheckpointError> {
    let path = dir.join(CONFIG_FILE);
    let hf: HfConfig = parse_json(&path)?;
    let unsupported = |detail: String| CheckpointError::Unsupported {
        path: path.clone(),
        detail,
    };
    let llama_type = matches!(hf.model_type.as_deref(), Some("llama" | "mistral"));
    let llama_arch = hf
        .architectures
        .iter()
        .any(|a| ARCHITECTURES.contains(&a.as_str()));
    if !(llama_type || llama_arch) {
        return Err(unsupported(format!(
            "model_type {:?}, architectures {:?}: only Llama-architecture checkpoints ({}) are supported",
            hf.model_type.as_deref().unwrap_or("(none)"),
            hf.architectures,
            ARCHITECTURES.join(", ")
        )));
    }
    if hf.attention_bias || hf.mlp_bias {
        return Err(unsupported(
            "attention_bias or mlp_bias is set: projections with biases are not supported".into(),
        ));
    }
    if let Some(scaling) = hf.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        return Err(unsupported(format!(
            "rope_scaling {scaling} is set: only plain rotary embeddings are supported"
        )));
    }
    if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(unsupported(format!(
            "hidden_act `{act}`: only silu (SwiGLU) is supported"
        )));
    }
    if let Some(window) = hf.sliding_window.as_ref().filter(|v| !v.is_null()) {
        return Err(unsupported(format!(
            "sliding_window {window} is set: only full attention is supported"
        )));
    }
    let heads = hf.num_attention_heads;
    let head_dim = hf
        .head_dim
        .unwrap_or_else(|| hf.hidden_size.checked_div(heads).unwrap_or(0));
    let mut eos = hf.eos_token_id.map(OneOrMany::ids).unwrap_or_default();
    let generation = dir.join(GENERATION_FILE);
    if generation.is_file() {
        let g: GenerationConfig = parse_json(&generation)?;
        for id in g.eos_token_id.map(OneOrMany::ids).unwrap_or_default() {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let Some((&first_eos, extra_eos)) = eos.split_first() else {
        return Err(unsupported(
            "no eos_token_id in config.json or generation_config.json: generation could not stop"
                .into(),
        ));
    };
    let config = ModelConfig {
        name: name.to_owned(),
        vocab: hf.vocab_size,
        hidden: hf.hidden_size,
        layers: hf.num_hidden_layers,
        heads,
        kv_heads: hf.num_key_value_heads.unwrap_or(heads),
        head_dim,
        ffn: hf.intermediate_size,
        max_context: hf.max_position_embeddings.unwrap_or(DEFAULT_CONTEXT),
        rope_theta: hf.rope_theta.unwrap_or(10_000.0),
        rms_eps: hf.rms_norm_eps.unwrap_or(1e-5),
        bos: hf.bos_token_id.unwrap_or(first_eos),
        eos: first_eos,
        extra_eos: extra_eos.to_vec(),
    };
    config
        .validate()
        .map_err(|source| CheckpointError::Config { path, source })?;
    Ok((config, hf.tie_word_embeddings))
}

/// The weight files of `dir`: the shards its index names, or the one file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let parsed: ShardIndex = parse_json(&index)?;
        let files: BTreeSet<&String> = parsed.weight_map.values().collect();
        // A shard is a file of this directory: no path that leads out of it.
        if let Some(outside) = files.iter().find(|f| {
            let mut parts = Path::new(f.as_str()).components();
            !matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            )
        }) {
            return Err(CheckpointError::Json {
                path: index,
                detail: format!("weight_map names `{outside}`, not a file of this directory"),
            });
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    Ok(vec![dir.join(WEIGHTS_FILE)])
}

fn widen(path: &Path, name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, CheckpointError> {
    let pairs = || {
        data.chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => pairs().map(|b| half::f16::from_bits(b).to_f32()).collect(),
        Dtype::BF16 => pairs().map(|b| half::bf16::from_bits(b).to_f32()).collect(),
        other => {
            return Err(CheckpointError::Dtype {
                path: path.to_owned(),
                name: name.to_owned(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

/// Whether a tensor is a buffer some writers save that the model recomputes.
fn recomputed(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// A tensor as its file's header describes it.
struct Entry {
    path: PathBuf,
    dtype: String,
    shape: Vec<usize>,
}

/// Largest safetensors header read (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// The tensors a safetensors file's header lists, read without its data;
/// a file whose length is not what its header implies (a truncated
/// download) is refused.
fn header(path: &Path, into: &mut BTreeMap<String, Entry>) -> Result<(), CheckpointError> {
    use std::io::Read as _;
    let invalid = |detail: String| CheckpointError::Safetensors {
        path: path.to_owned(),
        detail,
    };
    let read_error = |source| CheckpointError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let len = file.metadata().map_err(read_error)?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|_| invalid(format!("{len} bytes, shorter than a header")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > len {
        return Err(invalid(format!("a header of {n} bytes in a file of {len}")));
    }
    let mut text = vec![0u8; usize::try_from(n).expect("at most MAX_HEADER")];
    file.read_exact(&mut text).map_err(read_error)?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| invalid(format!("its header is not JSON: {e}")))?;
    let mut end = 0u64;
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(serde_json::Value::as_str);
        let shape: Option<Vec<usize>> = info
            .get("shape")
            .and_then(serde_json::Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect()
            });
        let offsets = info
            .get("data_offsets")
            .and_then(serde_json::Value::as_array)
            .and_then(|a| match a.as_slice() {
                [start, stop] => Some((start.as_u64()?, stop.as_u64()?)),
                _ => None,
            });
        let (Some(dtype), Some(shape), Some((start, stop))) = (dtype, shape, offsets) else {
            return Err(invalid(format!(
                "tensor `{name}` lacks a dtype, a shape or data offsets"
            )));
        };
        // As the loader will read it: its bytes are its shape's elements (a
        // dtype safetensors does not know is refused by name below).
        let bits = serde_json::from_value::<Dtype>(dtype.into())
            .ok()
            .and_then(|d| {
                shape
                    .iter()
                    .try_fold(u64::try_from(d.bitsize()).ok()?, |n, &x| {
                        n.checked_mul(u64::try_from(x).ok()?)
                    })
            });
        if let Some(bits) = bits
            && (start > stop || (stop - start).checked_mul(8) != Some(bits))
        {
            return Err(invalid(format!(
                "tensor `{name}` of shape {shape:?} ({dtype}) has data offsets [{start}, {stop}]"
            )));
        }
        end = end.max(stop);
        into.insert(
            name,
            Entry {
                path: path.to_owned(),
                dtype: dtype.to_owned(),
                shape,
            },
        );
    }
    let described = (8 + n).checked_add(end);
    if described != Some(len) {
        return Err(invalid(match described {
            Some(d) => {
                format!("the file is {len} bytes but its header describes {d} (a partial copy?)")
            }
            None => format!("the file is {len} bytes but its header describes more than 2^64"),
        }));
    }
    Ok(())
}

/// Every tensor the model reads, with its shape, in load order.
fn expected(cfg: &ModelConfig, head: bool) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, ffn) = (
        cfg.hidden,
        cfg.heads * cfg.head_dim,
        cfg.kv_heads * cfg.head_dim,
        cfg.ffn,
    );
    let mut out = vec![("model.embed_tokens.weight".to_owned(), vec![cfg.vocab, h])];
    for i in 0..cfg.layers {
        let p = format!("model.layers.{i}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![ffn, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, ffn]),
        ]);
    }
    out.push(("model.norm.weight".to_owned(), vec![h]));
    if head {
        out.push(("lm_head.weight".to_owned(), vec![cfg.vocab, h]));
    }
    out
}

/// Checks the checkpoint in `dir` as [`load`] would, reading its config
/// and its weight files' headers but no weights: every tensor present, in
/// its shape and a dtype that is read, none left over, no file cut short.
/// Returns the model's shapes (`name`, the context lowered to `max_context`).
pub fn check(
    dir: &Path,
    name: &str,
    max_context: Option<usize>,
) -> Result<ModelConfig, CheckpointError> {
    checked(dir, name, max_context).map(|(config, _)| config)
}

/// [`check`], and whether the checkpoint has its own LM head (else the
/// head is tied to the embedding).
fn checked(
    dir: &Path,
    name: &str,
    max_context: Option<usize>,
) -> Result<(ModelConfig, bool), CheckpointError> {
    let (mut config, tie) = parse_config(dir, name)?;
    if let Some(limit) = max_context {
        config.max_context = config.max_context.min(limit.max(1));
    }
    let mut entries = BTreeMap::new();
    for path in weight_files(dir)? {
        header(&path, &mut entries)?;
    }
    entries.retain(|name, _| !recomputed(name));
    if let Some((name, e)) = entries
        .iter()
        .find(|(_, e)| !matches!(e.dtype.as_str(), "F32" | "F16" | "BF16"))
    {
        return Err(CheckpointError::Dtype {
            path: e.path.clone(),
            name: name.clone(),
            dtype: e.dtype.clone(),
        });
    }
    let head = !tie || entries.contains_key("lm_head.weight");
    for (name, shape) in expected(&config, head) {
        let e = entries
            .remove(&name)
            .ok_or_else(|| CheckpointError::Missing {
                dir: dir.to_owned(),
                name: name.clone(),
            })?;
        if e.shape != shape {
            return Err(CheckpointError::Shape {
                path: e.path,
                name,
                found: e.shape,
                expected: shape,
            });
        }
    }
    if let Some((name, e)) = entries.into_iter().next() {
        return Err(CheckpointError::Unused { path: e.path, name });
    }
    Ok((config, head))
}

/// Loads the checkpoint in `dir`; `name` is what requests call the model.
/// `max_context`, when given, lowers the context the config allows. It is
/// [`check`]ed first, so a bad checkpoint is refused before gigabytes of
/// weights are read.
pub fn load(
    dir: &Path,
    name: &str,
    max_context: Option<usize>,
) -> Result<Checkpoint, CheckpointError> {
    let (config, head) = checked(dir, name, max_context)?;
    let mut found = BTreeMap::new();
    for path in weight_files(dir)? {
        let bytes = read(&path)?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| CheckpointError::Safetensors {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        for (tensor_name, view) in file.tensors() {
            if recomputed(&tensor_name) {
                continue;
            }
            let data = widen(&path, &tensor_name, view.dtype(), view.data())?;
            found.insert(tensor_name, (path.clone(), view.shape().to_vec(), data));
        }
    }
    // In `expected`'s order; checked above, and again here in case a file
    // changed since.
    let mut tensors = Vec::new();
    for (name, shape) in expected(&config, head) {
        let (path, found_shape, data) =
            found
                .remove(&name)
                .ok_or_else(|| CheckpointError::Missing {
                    dir: dir.to_owned(),
                    name: name.clone(),
                })?;
        if found_shape != shape {
            return Err(CheckpointError::Shape {
                path,
                name,
                found: found_shape,
                expected: shape,
            });
        }
        tensors.push(data);
    }
    let weights = assemble(&config, tensors.into_iter());
    Ok(Checkpoint { config, weights })
}

/// The weights from the tensors of [`expected`], in its order (without an
/// LM head when it is tied to the embedding): Q, K, V and gate, up fused.
fn assemble(cfg: &ModelConfig, mut tensors: impl Iterator<Item = Vec<f32>>) -> Weights {
    let mut next = || tensors.next().expect("one tensor per expected name");
    let embed = next();
    let layers = (0..cfg.layers)
        .map(|_| {
            let attn_norm = next();
            let mut wqkv = next();
            wqkv.extend(next());
            wqkv.extend(next());
            let wo = next();
            let ffn_norm = next();
            let mut w_gate_up = next();
            w_gate_up.extend(next());
            let w_down = next();
            LayerWeights {
                attn_norm,
                wqkv,
                wo,
                ffn_norm,
                w_gate_up,
                w_down,
            }
        })
        .collect();
    let final_norm = next();
    let lm_head = tensors.next().unwrap_or_else(|| embed.clone());
    Weights {
        embed,
        layers,
        final_norm,
        lm_head,
    }
}

/// `weights` as Hugging Face names and shapes them (Q, K, V and gate, up
/// apart), in [`save`]'s order.
pub(crate) fn hf_tensors<'w>(
    cfg: &ModelConfig,
    weights: &'w Weights,
) -> Vec<(String, Vec<usize>, &'w [f32])> {
    let (h, q, kv, ffn) = (
        cfg.hidden,
        cfg.heads * cfg.head_dim,
        cfg.kv_heads * cfg.head_dim,
        cfg.ffn,
    );
    let mut slices: Vec<&[f32]> = vec![&weights.embed];
    for l in &weights.layers {
        let (wq, rest) = l.wqkv.split_at(q * h);
        let (wk, wv) = rest.split_at(kv * h);
        let (gate, up) = l.w_gate_up.split_at(ffn * h);
        slices.extend([
            &l.attn_norm[..],
            wq,
            wk,
            wv,
            &l.wo,
            &l.ffn_norm,
            gate,
            up,
            &l.w_down,
        ]);
    }
    slices.extend([&weights.final_norm[..], &weights.lm_head]);
    expected(cfg, true)
        .into_iter()
        .zip(slices)
        .map(|((name, shape), data)| (name, shape, data))
        .collect()
}

/// `cfg` as Hugging Face writes a Llama `config.json` ([`save`]'s).
pub(crate) fn hf_config(cfg: &ModelConfig) -> serde_json::Value {
    let mut eos = vec![cfg.eos];
    eos.extend(&cfg.extra_eos);
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn,
        "max_position_embeddings": cfg.max_context,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps,
        "bos_token_id": cfg.bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
    })
}

/// Writes `weights` as a checkpoint [`load`] reads back bit for bit
/// (`config.json`, F32 `model.safetensors`, Hugging Face's tensor names):
/// the built-in model, say, for a host to serve as a checkpoint.
pub fn save(dir: &Path, cfg: &ModelConfig, weights: &Weights) -> Result<(), CheckpointError> {
    let write_error =
        |path: PathBuf| move |source: std::io::Error| CheckpointError::Write { path, source };
    std::fs::create_dir_all(dir).map_err(write_error(dir.to_owned()))?;
    let config = hf_config(cfg);
    let path = dir.join(CONFIG_FILE);
    let text = serde_json::to_vec_pretty(&config).expect("a JSON value serializes");
    std::fs::write(&path, text).map_err(write_error(path.clone()))?;
    let tensors = hf_tensors(cfg, weights);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, shape, v)| (n, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let path = dir.join(WEIGHTS_FILE);
    let views = bytes
        .iter()
        .map(|(n, shape, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CheckpointError::Safetensors {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    safetensors::serialize_to_file(views, None, &path).map_err(|e| CheckpointError::Safetensors {
        path: path.clone(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
