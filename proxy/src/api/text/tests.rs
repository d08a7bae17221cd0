use super::*;
use crate::api::openai::{Role, Turn};
use bulkhead_core::wire::FinishReason;
use bulkhead_kernels::model::bpe::byte_level_json;

/// A byte-level checkpoint text side: a token per byte, then the tokens
/// `extra` (256 on), then Llama 3's special tokens.
fn byte_level(extra: &[&str]) -> ModelText {
    let json = byte_level_json(&[], extra, ChatTemplate::Llama3.special_tokens());
    let tok = BpeTokenizer::from_json("t", json.to_string().as_bytes()).expect("valid");
    let bos = tok.special("<|begin_of_text|>").expect("added");
    ModelText::Checkpoint(Box::new(CheckpointText {
        name: "m".into(),
        template: ChatTemplate::detect(&tok),
        tok,
        bos,
    }))
}

fn out(model: ModelText, stops: &[&str]) -> OutputText {
    let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
    OutputText::new(Arc::new(model), &stops)
}

#[test]
fn a_stop_string_across_tokens_cuts_the_text_where_it_starts() {
    // Tokens 256.. are "Hel", "lo\n", "\nWor": the stop "\n\n" spans two.
    let mut o = out(byte_level(&["Hel", "lo\n", "\nWor"]), &["\n\n"]);
    assert_eq!(o.push(&[256]), "Hel");
    assert_eq!(
        o.push(&[257]),
        "lo",
        "the newline is held: it may start the stop"
    );
    assert!(!o.stopped());
    assert_eq!(o.push(&[258]), "");
    assert!(o.stopped());
    assert!(o.stop_request(), "the worker is told once");
    assert!(!o.stop_request());
    assert_eq!(o.finish_reason(FinishReason::Length), FinishReason::Stop);
    assert_eq!(o.finish_reason(FinishReason::Cancelled), FinishReason::Stop);
    assert_eq!(o.finish_reason(FinishReason::Error), FinishReason::Error);
    assert_eq!(o.push(&[256]), "", "nothing after a stop");
    assert_eq!(o.finish(), "");
}

#[test]
fn held_text_that_never_becomes_a_stop_is_released() {
    let mut o = out(byte_level(&[]), &["END", "xy"]);
    assert_eq!(o.push(&bytes("abcE")), "abc");
    assert_eq!(o.push(&bytes("N")), "");
    assert_eq!(
        o.push(&bytes("x")),
        "EN",
        "ENx cannot become END; x may start xy"
    );
    assert_eq!(o.finish(), "x");
    assert!(!o.stopped());
    // The earliest stop in the text wins, whichever is listed first.
    let mut o = out(byte_level(&[]), &["END", "xy"]);
    assert_eq!(o.push(&bytes("a xy b END")), "a ");
    assert!(o.stopped());
}

#[test]
fn a_character_split_across_tokens_is_whole_before_it_is_scanned() {
    let mut o = out(byte_level(&[]), &["é!"]);
    let e_acute = "é".as_bytes();
    assert_eq!(o.push(&[u32::from(e_acute[0])]), "");
    assert_eq!(o.push(&[u32::from(e_acute[1])]), "", "é may start the stop");
    assert_eq!(o.push(&bytes("!")), "");
    assert!(o.stopped());
}

#[test]
fn the_built_in_model_leaves_stops_to_its_workers() {
    let builtin = ModelText::builtin();
    assert!(builtin.worker_stops());
    let mut o = out(builtin, &["\n"]);
    assert_eq!(o.push(&bytes("a\nb")), "a\nb");
    assert!(!o.stopped() && !o.stop_request());
    assert_eq!(o.finish_reason(FinishReason::Length), FinishReason::Length);
    assert!(!byte_level(&[]).worker_stops());
}

#[test]
fn prompts_become_the_templates_tokens() {
    let m = byte_level(&[]);
    let text = m.encode(&Prompt::Text("hi".into())).expect("encodes");
    assert_eq!(
        text,
        vec![256, u32::from(b'h'), u32::from(b'i')],
        "BOS, then the text"
    );
    let chat = m
        .encode(&Prompt::Chat(vec![Turn {
            role: Role::User,
            content: "hi".into(),
        }]))
        .expect("encodes");
    assert_eq!(&chat[..2], &[256, 257]);
    assert_eq!(
        chat.iter().filter(|&&t| t == 259).count(),
        1,
        "one <|eot_id|>"
    );
    let builtin = ModelText::builtin();
    let chat = builtin
        .encode(&Prompt::Chat(vec![Turn {
            role: Role::User,
            content: "hi".into(),
        }]))
        .expect("encodes");
    assert_eq!(chat[0], 256, "the built-in BOS");
    assert_eq!(
        &chat[1..],
        "<|user|>\nhi\n<|assistant|>\n"
            .as_bytes()
            .iter()
            .map(|&b| u32::from(b))
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_checkpoint_without_a_template_refuses_chat_by_name() {
    let ModelText::Checkpoint(mut c) = byte_level(&[]) else {
        unreachable!()
    };
    c.template = None;
    let m = ModelText::Checkpoint(c);
    let e = m
        .encode(&Prompt::Chat(vec![Turn {
            role: Role::User,
            content: "hi".into(),
        }]))
        .expect_err("no template");
    assert_eq!(
        e,
        "model m has no chat template on this host; use /v1/completions"
    );
}

fn bytes(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}
