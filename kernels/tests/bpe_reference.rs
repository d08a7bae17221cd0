//! The BPE tokenizer against Hugging Face's `tokenizers` library: four small
//! tokenizers of the kinds it reads are trained by the library
//! (`tests/py/bpe_reference.py`, in the venv `cargo xtask setup` makes),
//! and every text the library tokenized must give the same ids here, and
//! those ids the same decoded text; and conversations the model families'
//! own chat templates rendered (Jinja) and the library tokenized must give
//! the same ids from [`ChatTemplate`].

use bulkhead_kernels::model::{bpe::BpeTokenizer, chat::ChatTemplate};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    let py = root().join("target/pyenv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `cargo xtask setup` (it makes the venv with tokenizers)",
        py.display()
    );
    py
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[derive(serde::Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(serde::Deserialize)]
struct Chat {
    messages: Vec<Message>,
    ids: Vec<u32>,
}

/// A scratch directory, removed when the test ends, failing or not.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_kind_matches_the_tokenizers_library_on_every_text() {
    let scratch = Scratch(std::env::temp_dir().join(format!("bh-bpe-ref-{}", std::process::id())));
    let out = &scratch.0;
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out).expect("scratch dir");
    let mut corpus: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    corpus.sort();
    corpus.push(root().join("README.md"));
    let status = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/bpe_reference.py"))
        .arg(out)
        .args(&corpus)
        .status()
        .expect("running the reference script");
    assert!(status.success(), "bpe_reference.py failed: {status}");
    let mut failures = Vec::new();
    let mut checked = 0;
    for kind in ["gpt2", "llama3", "llama2", "llama2-legacy"] {
        let tok = BpeTokenizer::from_file(&out.join(format!("{kind}.json")))
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let cases: Vec<Case> = serde_json::from_slice(
            &std::fs::read(out.join(format!("{kind}.cases.json"))).expect("cases"),
        )
        .expect("cases parse");
        assert!(cases.len() > 400, "{kind}: only {} cases", cases.len());
        for case in &cases {
            checked += 1;
            match tok.encode(&case.text) {
                Ok(ids) if ids == case.ids => {}
                Ok(ids) => failures.push(format!(
                    "{kind}: {:?}\n  library {:?}\n  ours    {:?}",
                    case.text, case.ids, ids
                )),
                Err(e) => failures.push(format!("{kind}: {:?}: {e}", case.text)),
            }
            let decoded = tok.decode(&case.ids);
            if decoded != case.decoded {
                failures.push(format!(
                    "{kind}: decode of {:?}\n  library {:?}\n  ours    {:?}",
                    case.ids, case.decoded, decoded
                ));
            }
        }
    }
    for (kind, template) in [
        ("llama3", ChatTemplate::Llama3),
        ("llama2", ChatTemplate::Llama2),
        ("llama2-legacy", ChatTemplate::Llama2),
    ] {
        let tok = BpeTokenizer::from_file(&out.join(format!("{kind}.json")))
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(ChatTemplate::detect(&tok), Some(template), "{kind}");
        let chats: Vec<Chat> = serde_json::from_slice(
            &std::fs::read(out.join(format!("{kind}.chat.json"))).expect("chats"),
        )
        .expect("chats parse");
        assert!(chats.len() > 50, "{kind}: only {} chats", chats.len());
        for chat in &chats {
            checked += 1;
            let turns: Vec<(&str, &str)> = chat
                .messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str()))
                .collect();
            match template.encode(&tok, &turns) {
                Ok(ids) if ids == chat.ids => {}
                Ok(ids) => failures.push(format!(
                    "{kind} chat: {turns:?}\n  library {:?}\n  ours    {ids:?}",
                    chat.ids
                )),
                Err(e) => failures.push(format!("{kind} chat: {turns:?}: {e}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} differ; the first:\n{}",
        failures.len(),
        failures
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
