use super::*;
use safetensors::tensor::TensorView;

/// A scratch directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "bh-ckpt-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch dir");
        Self(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tensors of `w` under Hugging Face's names, owned (to edit).
fn hf_tensors(cfg: &ModelConfig, w: &Weights) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    super::hf_tensors(cfg, w)
        .into_iter()
        .map(|(n, s, v)| (n, s, v.to_vec()))
        .collect()
}

#[derive(Clone, Copy)]
enum Encoding {
    F32,
    Bf16,
    F16,
}

fn encode(values: &[f32], encoding: Encoding) -> (Dtype, Vec<u8>) {
    match encoding {
        Encoding::F32 => (
            Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Encoding::Bf16 => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        Encoding::F16 => (
            Dtype::F16,
            values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
    }
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], encoding: Encoding) {
    let encoded: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            let (dtype, bytes) = encode(v, encoding);
            (n.clone(), s.clone(), dtype, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = encoded
        .iter()
        .map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).expect("json")).expect("write json");
}

/// A checkpoint of the tiny model (seed 7), one file, in `encoding`.
fn tiny_checkpoint(dir: &Path, encoding: Encoding) -> (ModelConfig, Weights) {
    let cfg = ModelConfig::tiny();
    let w = Weights::from_seed(&cfg, 7);
    write_json(&dir.join(CONFIG_FILE), &hf_config(&cfg));
    write_safetensors(&dir.join(WEIGHTS_FILE), &hf_tensors(&cfg, &w), encoding);
    (cfg, w)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_same_weights(a: &Weights, b: &Weights) {
    assert_eq!(bits(&a.embed), bits(&b.embed));
    assert_eq!(bits(&a.final_norm), bits(&b.final_norm));
    assert_eq!(bits(&a.lm_head), bits(&b.lm_head));
    assert_eq!(a.layers.len(), b.layers.len());
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(bits(&x.attn_norm), bits(&y.attn_norm));
        assert_eq!(bits(&x.wqkv), bits(&y.wqkv));
        assert_eq!(bits(&x.wo), bits(&y.wo));
        assert_eq!(bits(&x.ffn_norm), bits(&y.ffn_norm));
        assert_eq!(bits(&x.w_gate_up), bits(&y.w_gate_up));
        assert_eq!(bits(&x.w_down), bits(&y.w_down));
    }
}

#[test]
fn an_f32_checkpoint_loads_to_the_same_bits_and_shapes() {
    let dir = Dir::new("f32");
    let (cfg, w) = tiny_checkpoint(&dir.0, Encoding::F32);
    let loaded = load(&dir.0, "tiny-from-disk", None).expect("loads");
    let want = ModelConfig {
        name: "tiny-from-disk".into(),
        ..cfg
    };
    assert_eq!(loaded.config, want);
    assert_same_weights(&loaded.weights, &w);
}

#[test]
fn bf16_and_f16_checkpoints_widen_to_the_rounded_values() {
    for (encoding, round) in [
        (
            Encoding::Bf16,
            (|v: f32| half::bf16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (Encoding::F16, |v: f32| half::f16::from_f32(v).to_f32()),
    ] {
        let dir = Dir::new("half");
        let (_, w) = tiny_checkpoint(&dir.0, encoding);
        let loaded = load(&dir.0, "t", None).expect("loads");
        let rounded: Vec<f32> = w.embed.iter().map(|&v| round(v)).collect();
        assert_eq!(bits(&loaded.weights.embed), bits(&rounded));
        let rounded: Vec<f32> = w.layers[3].w_down.iter().map(|&v| round(v)).collect();
        assert_eq!(bits(&loaded.weights.layers[3].w_down), bits(&rounded));
        // And it is not the unrounded weights: the widening really ran.
        assert_ne!(bits(&loaded.weights.embed), bits(&w.embed));
    }
}

#[test]
fn shards_listed_by_an_index_load_as_one_checkpoint() {
    let dir = Dir::new("shards");
    let cfg = ModelConfig::tiny();
    let w = Weights::from_seed(&cfg, 7);
    write_json(&dir.0.join(CONFIG_FILE), &hf_config(&cfg));
    let tensors = hf_tensors(&cfg, &w);
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        write_safetensors(&dir.0.join(file), part, Encoding::F32);
        for (name, _, _) in part {
            map.insert(name.clone(), file.into());
        }
    }
    write_json(
        &dir.0.join(INDEX_FILE),
        &serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}),
    );
    let loaded = load(&dir.0, "t", None).expect("loads");
    assert_same_weights(&loaded.weights, &w);
}

#[test]
fn a_tied_head_is_the_embedding_and_generation_config_adds_eos_tokens() {
    let dir = Dir::new("tied");
    let cfg = ModelConfig::tiny();
    let w = Weights::from_seed(&cfg, 7);
    let mut config = hf_config(&cfg);
    config["tie_word_embeddings"] = true.into();
    config["eos_token_id"] = serde_json::json!([257, 3]);
    write_json(&dir.0.join(CONFIG_FILE), &config);
    write_json(
        &dir.0.join(GENERATION_FILE),
        &serde_json::json!({"eos_token_id": [3, 4], "temperature": 0.6}),
    );
    let tensors: Vec<_> = hf_tensors(&cfg, &w)
        .into_iter()
        .filter(|(n, _, _)| n != "lm_head.weight")
        .collect();
    write_safetensors(&dir.0.join(WEIGHTS_FILE), &tensors, Encoding::F32);
    let loaded = load(&dir.0, "t", Some(512)).expect("loads");
    assert_eq!(bits(&loaded.weights.lm_head), bits(&w.embed));
    assert_eq!(loaded.config.eos, 257);
    assert_eq!(loaded.config.extra_eos, vec![3, 4]);
    assert!(loaded.config.is_eos(4) && !loaded.config.is_eos(5));
    assert_eq!(loaded.config.max_context, 512, "lowered by the caller");
}

/// Loads after `edit` changed the tiny checkpoint; the error's text.
fn refusal(
    edit: impl FnOnce(&Path, &mut serde_json::Value, &mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> String {
    let dir = Dir::new("refuse");
    let cfg = ModelConfig::tiny();
    let w = Weights::from_seed(&cfg, 7);
    let mut config = hf_config(&cfg);
    let mut tensors = hf_tensors(&cfg, &w);
    edit(&dir.0, &mut config, &mut tensors);
    write_json(&dir.0.join(CONFIG_FILE), &config);
    if !dir.0.join(WEIGHTS_FILE).exists() {
        write_safetensors(&dir.0.join(WEIGHTS_FILE), &tensors, Encoding::F32);
    }
    load(&dir.0, "t", None).expect_err("refused").to_string()
}

#[test]
fn what_the_model_cannot_run_is_refused_by_name() {
    let e = refusal(|_, _, t| t.retain(|(n, _, _)| n != "model.layers.2.mlp.up_proj.weight"));
    assert!(
        e.contains("tensor `model.layers.2.mlp.up_proj.weight` is missing"),
        "{e}"
    );

    let e = refusal(|_, _, t| {
        let v = t
            .iter_mut()
            .find(|(n, _, _)| n == "model.norm.weight")
            .expect("norm");
        v.1 = vec![128];
        v.2.truncate(128);
    });
    assert!(
        e.contains("tensor `model.norm.weight` has shape [128], expected [256]"),
        "{e}"
    );

    let e = refusal(|_, _, t| {
        t.push((
            "model.layers.0.self_attn.q_proj.bias".into(),
            vec![256],
            vec![0.0; 256],
        ));
    });
    assert!(
        e.contains("tensor `model.layers.0.self_attn.q_proj.bias` is not part of"),
        "{e}"
    );

    let e = refusal(|_, c, _| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    });
    assert!(
        e.contains("rope_scaling") && e.contains("config.json"),
        "{e}"
    );

    let e = refusal(|_, c, _| {
        c["model_type"] = "qwen2".into();
        c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    });
    assert!(e.contains("only Llama-architecture checkpoints"), "{e}");

    let e = refusal(|_, c, _| c["num_key_value_heads"] = 3.into());
    assert!(
        e.contains("heads (8) must be a multiple of kv_heads (3)"),
        "{e}"
    );

    let e = refusal(|_, c, _| {
        c.as_object_mut().expect("object").remove("eos_token_id");
    });
    assert!(e.contains("no eos_token_id"), "{e}");

    let e = refusal(|dir, _, _| {
        let view = TensorView::new(Dtype::I8, vec![4], &[1, 2, 3, 4]).expect("view");
        safetensors::serialize_to_file(
            [("model.norm.weight", view)],
            None,
            &dir.join(WEIGHTS_FILE),
        )
        .expect("write");
    });
    assert!(
        e.contains("tensor `model.norm.weight` is I8; F32, F16 and BF16 are read"),
        "{e}"
    );

    let e = refusal(|dir, _, _| {
        std::fs::write(
            dir.join(WEIGHTS_FILE),
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
        )
        .expect("write");
    });
    assert!(
        e.contains("model.safetensors: not a valid safetensors file"),
        "{e}"
    );

    let e = refusal(|dir, _, t| {
        write_safetensors(&dir.join(WEIGHTS_FILE), t, Encoding::F32);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(WEIGHTS_FILE))
            .expect("open");
        let len = file.metadata().expect("metadata").len();
        file.set_len(len - 100).expect("truncate");
    });
    assert!(
        e.contains("but its header describes") && e.contains("partial copy"),
        "{e}"
    );

    let dir = Dir::new("empty");
    let e = load(&dir.0, "t", None).expect_err("no config").to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn what_the_files_declare_is_bounded_before_anything_is_sized_by_it() {
    let e = refusal(|_, c, _| c["num_hidden_layers"] = 10_000_000_000u64.into());
    assert!(
        e.contains("layers (10000000000) is larger than 1024"),
        "{e}"
    );
    // heads x head_dim would overflow: refused by its bound first.
    let e = refusal(|_, c, _| {
        c["num_attention_heads"] = (1u64 << 62).into();
        c["num_key_value_heads"] = (1u64 << 62).into();
    });
    assert!(
        e.contains("heads (4611686018427387904) is larger than 1024"),
        "{e}"
    );
    let e = refusal(|_, c, _| c["rope_theta"] = 0.0.into());
    assert!(
        e.contains("rope_theta (0) must be a positive finite number"),
        "{e}"
    );

    // A tensor whose offsets do not span its shape's bytes, in a file
    // whose length the header accounts for.
    let e = refusal(|dir, _, _| {
        let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
        let mut file = u64::try_from(header.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[0; 8]);
        std::fs::write(dir.join(WEIGHTS_FILE), file).expect("write");
    });
    assert!(
        e.contains("tensor `model.norm.weight` of shape [4] (F32) has data offsets [0, 8]"),
        "{e}"
    );
    let e = refusal(|dir, _, _| {
        let header =
            br#"{"model.norm.weight":{"dtype":"F32","shape":[0],"data_offsets":[0,18446744073709551615]}}"#;
        let mut file = u64::try_from(header.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        file.extend_from_slice(header);
        std::fs::write(dir.join(WEIGHTS_FILE), file).expect("write");
    });
    assert!(e.contains("has data offsets"), "{e}");

    // A shard is a file of the checkpoint's directory.
    for outside in [
        "../model.safetensors",
        "/etc/passwd",
        "sub/model.safetensors",
    ] {
        let e = refusal(|dir, _, t| {
            let map: serde_json::Map<_, _> = t
                .iter()
                .map(|(n, _, _)| (n.clone(), outside.into()))
                .collect();
            write_json(
                &dir.join(INDEX_FILE),
                &serde_json::json!({"weight_map": map}),
            );
        });
        assert!(
            e.contains(&format!(
                "weight_map names `{outside}`, not a file of this directory"
            )),
            "{e}"
        );
    }
}

#[test]
fn save_writes_what_load_reads_back() {
    let dir = Dir::new("save");
    let cfg = ModelConfig {
        extra_eos: vec![3],
        ..ModelConfig::tiny()
    };
    let w = Weights::from_seed(&cfg, 11);
    save(&dir.0, &cfg, &w).expect("saves");
    let loaded = load(&dir.0, &cfg.name, None).expect("loads");
    assert_eq!(loaded.config, cfg);
    assert_same_weights(&loaded.weights, &w);
}

#[test]
fn check_reads_headers_only_and_agrees_with_load() {
    let dir = Dir::new("check");
    let (cfg, _) = tiny_checkpoint(&dir.0, Encoding::Bf16);
    let checked = check(&dir.0, "c", Some(100)).expect("valid");
    assert_eq!(checked.max_context, 100);
    assert_eq!(checked.vocab, cfg.vocab);
    let loaded = load(&dir.0, "c", Some(100)).expect("loads");
    assert_eq!(loaded.config, checked);
}
