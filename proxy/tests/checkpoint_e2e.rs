//! A Llama-family checkpoint served end to end: `serve` with a `[[models]]`
//! table whose `path` is a checkpoint directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`, written here), a CPU worker
//! loading it, and a tenant's chat and text completions over TLS/TCP. The
//! answers must be what a `bulkhead worker --model-dir` called directly
//! gives for the tokens the family's chat template makes; a stop string is
//! cut where it starts, even inside a token; a checkpoint the host cannot
//! serve stops `serve` with an error that names it.

use bulkhead::worker::WorkerLink;
use bulkhead_core::{
    TenantId,
    wire::{FinishReason, ProxyToWorker, RequestId, Sampling, Submit, WorkerToProxy},
};
use bulkhead_kernels::model::{
    ModelConfig, Weights,
    bpe::{BpeTokenizer, byte_level_json},
    chat::ChatTemplate,
    checkpoint,
};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

mod common;

const KEY: &str = "sk-acme-ckpt";
/// Pairs the test tokenizer merges (ids 256-263), so BPE really runs.
const MERGES: [(&str, &str); 8] = [
    ("t", "h"),
    ("th", "e"),
    ("i", "n"),
    ("e", "r"),
    (" ", "t"),
    (" ", "the"),
    ("o", "n"),
    ("l", "l"),
];

/// The model the checkpoint holds: the built-in shapes with the merged
/// tokens (256-263) and Llama 3's special tokens (264-267) in its vocabulary.
fn model() -> ModelConfig {
    ModelConfig {
        name: "ckpt".into(),
        vocab: 272,
        bos: 264,
        eos: 267,
        max_context: 1024,
        ..ModelConfig::tiny()
    }
}

/// Writes the checkpoint into `dir`.
fn write_checkpoint(dir: &Path) {
    let cfg = model();
    // Seed 6: greedy answers of 40 tokens without an end of turn (checked below).
    checkpoint::save(dir, &cfg, &Weights::from_seed(&cfg, 6)).unwrap();
    let tokenizer = byte_level_json(&MERGES, &[], ChatTemplate::Llama3.special_tokens());
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}

/// The host config with the checkpoint as model `ckpt` beside `tiny`.
fn with_checkpoint(dir: &Path) -> impl Fn(String) -> String {
    let path = dir.join("ckpt");
    move |text: String| {
        text.replace(
            "allowed_models = [\"tiny\"]",
            "allowed_models = [\"tiny\", \"ckpt\"]",
        ) + &format!(
            "[[models]]\nname = \"ckpt\"\nbackend = \"cpu\"\nmax_context_tokens = 512\npath = \"{}\"\n",
            path.display()
        )
    }
}

/// What a worker loading the checkpoint gives, called directly: the
/// output tokens and how it finished.
fn direct(ckpt: &Path, prompt: Vec<u32>, max_tokens: u32) -> (Vec<u32>, FinishReason) {
    let socket = ckpt.with_file_name("direct.sock");
    let _ = std::fs::remove_file(&socket);
    let worker = Command::new(common::BIN)
        .args([
            "worker",
            "--backend",
            "cpu",
            "--model-name",
            "ckpt",
            "--model-dir",
        ])
        .arg(ckpt)
        .arg("--listen")
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _worker = KillOnDrop(worker);
    let deadline = std::time::Instant::now() + Duration::from_mins(1);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the direct worker never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut link = WorkerLink::connect(&socket, 0, Duration::from_mins(1)).unwrap();
    link.send(&ProxyToWorker::Submit(Submit {
        request_id: RequestId(1),
        tenant: TenantId::new("acme").unwrap(),
        model: "ckpt".to_owned(),
        prompt_tokens: prompt,
        max_tokens,
        sampling: Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop: vec![],
        },
        kv_block_quota: 256,
    }))
    .unwrap();
    let mut out = Vec::new();
    let reason = loop {
        match link.recv_timeout(Duration::from_mins(1)).unwrap() {
            WorkerToProxy::Tokens { tokens, .. } => out.extend(tokens),
            WorkerToProxy::Finished(f) => break f.reason,
            _ => {}
        }
    };
    (out, reason)
}

/// A child process killed when the test is done with it, or panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn post(host: &common::Host, path: &str, body: &Value) -> (u16, String) {
    let mut send = common::connect(host, "acme").await;
    let r = send
        .send_request(common::request("POST", path, KEY, Some(body)))
        .await
        .unwrap();
    let status = r.status().as_u16();
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

/// The content of an SSE answer, and its last finish reason.
fn sse(body: &str) -> (String, Option<String>) {
    let mut text = String::new();
    let mut reason = None;
    for event in body.split("\n\n") {
        let Some(data) = event.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            if let Some(r) = c["finish_reason"].as_str() {
                reason = Some(r.to_owned());
            }
        }
    }
    (text, reason)
}

#[test]
fn a_checkpoint_answers_as_its_worker_does_under_its_chat_template() {
    let dir = common::host_dir("ckpt");
    let ckpt = dir.join("ckpt");
    write_checkpoint(&ckpt);
    let host = common::start_in(
        dir.clone(),
        &common::tenant("acme", KEY, 100.0),
        &with_checkpoint(&dir),
    );
    let tok = BpeTokenizer::from_file(&ckpt.join("tokenizer.json")).unwrap();
    let content = "tell me the thing in there";
    let prompt = ChatTemplate::Llama3
        .encode(&tok, &[("user", content)])
        .unwrap();
    let (tokens, reason) = direct(&ckpt, prompt.clone(), 40);
    assert_eq!(
        reason,
        FinishReason::Length,
        "40 tokens without an end of turn"
    );
    let expected = tok.decode(&tokens);
    assert!(expected.chars().count() >= 10, "{expected:?}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let chat = |extra: Value| {
        let mut body = json!({
            "model": "ckpt",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 40,
            "temperature": 0,
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, body) = rt.block_on(post(&host, "/v1/chat/completions", &chat(json!({}))));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], 40);

    // Streamed, with a stop string taken from the middle of the answer: the
    // text ends where it first starts, the request ends as a stop.
    let chars: Vec<char> = expected.chars().collect();
    let stop: String = chars[6..8].iter().collect();
    let cut = expected.find(&stop).unwrap();
    let (status, body) = rt.block_on(post(
        &host,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "stop": [stop]})),
    ));
    assert_eq!(status, 200, "{body}");
    let (text, reason) = sse(&body);
    assert_eq!(text, &expected[..cut], "stop {stop:?}");
    assert_eq!(reason.as_deref(), Some("stop"));

    // The same stop string when max_tokens ends the request with the very
    // token that completes it: still cut, still a stop (not a length).
    let last = (1..=tokens.len())
        .find(|&k| tok.decode(&tokens[..k]).contains(&stop))
        .unwrap();
    let (status, body) = rt.block_on(post(
        &host,
        "/v1/chat/completions",
        &chat(json!({"stream": true, "stop": [stop], "max_tokens": last})),
    ));
    assert_eq!(status, 200, "{body}");
    let (text, reason) = sse(&body);
    assert_eq!(text, &expected[..cut]);
    assert_eq!(reason.as_deref(), Some("stop"), "max_tokens {last}");

    // A text completion: BOS, then the prompt's tokens.
    let mut prompt = vec![264];
    prompt.extend(tok.encode("the other thing").unwrap());
    let (tokens, _) = direct(&ckpt, prompt, 12);
    let (status, body) = rt.block_on(post(
        &host,
        "/v1/completions",
        &json!({"model": "ckpt", "prompt": "the other thing", "max_tokens": 12, "temperature": 0}),
    ));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], tok.decode(&tokens).as_str());

    // The built-in model is served beside it, as before.
    let (status, body) = rt.block_on(post(
        &host,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ));
    assert_eq!(status, 200, "{body}");
}

/// `serve` on a config whose checkpoint `edit` broke: its exit and stderr.
fn refused(name: &str, edit: impl Fn(&Path)) -> String {
    let dir = common::host_dir(name);
    let ckpt = dir.join("ckpt");
    write_checkpoint(&ckpt);
    edit(&ckpt);
    let status = Command::new(common::BIN)
        .args([
            "certs",
            "--trust-domain",
            "bulkhead.test",
            "--tenants",
            "acme",
            "--out",
        ])
        .arg(dir.join("pki"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = with_checkpoint(&dir)(common::config(
        &dir,
        &common::tenant("acme", KEY, 1.0),
        1024,
    ));
    std::fs::write(dir.join("host.toml"), text).unwrap();
    let out = Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(dir.join("host.toml"))
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "serve started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_checkpoint_the_host_cannot_serve_stops_serve_by_name() {
    let e = refused("ckpt-cut", |d| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("model.safetensors"))
            .unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len / 2).unwrap();
    });
    assert!(
        e.contains("model `ckpt`: checking its checkpoint") && e.contains("partial copy"),
        "{e}"
    );

    let e = refused("ckpt-no-tok", |d| {
        std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    });
    assert!(
        e.contains("model `ckpt`: reading its tokenizer") && e.contains("tokenizer.json"),
        "{e}"
    );

    let e = refused("ckpt-rope", |d| {
        let path = d.join("config.json");
        let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        std::fs::write(&path, v.to_string()).unwrap();
    });
    assert!(
        e.contains("rope_scaling") && e.contains("model `ckpt`"),
        "{e}"
    );

    let e = refused("ckpt-short", |d| {
        let path = d.join("config.json");
        let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["max_position_embeddings"] = json!(256);
        std::fs::write(&path, v.to_string()).unwrap();
    });
    assert!(
        e.contains("max_context_tokens 512 exceeds the checkpoint's max_position_embeddings 256"),
        "{e}"
    );
}
