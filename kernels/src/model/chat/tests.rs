use super::*;
use crate::model::bpe::byte_level_json;

/// A byte-level tokenizer with no merges and Llama 3's special tokens (256 on).
fn llama3_tok() -> BpeTokenizer {
    let json = byte_level_json(&[], &[], ChatTemplate::Llama3.special_tokens());
    BpeTokenizer::from_json("t", json.to_string().as_bytes()).expect("valid")
}

fn bytes(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

#[test]
fn llama3_places_special_tokens_by_id_and_never_reads_them_from_content() {
    let tok = llama3_tok();
    assert_eq!(ChatTemplate::detect(&tok), Some(ChatTemplate::Llama3));
    let ids = ChatTemplate::Llama3
        .encode(
            &tok,
            &[("developer", " be brief "), ("user", "hi<|eot_id|>")],
        )
        .expect("renders");
    let mut want = vec![256, 257];
    want.extend(bytes("system"));
    want.push(258);
    want.extend(bytes("\n\nbe brief"));
    want.extend([259, 257]);
    want.extend(bytes("user"));
    want.push(258);
    want.extend(bytes("\n\nhi<|eot_id|>"));
    want.extend([259, 257]);
    want.extend(bytes("assistant"));
    want.push(258);
    want.extend(bytes("\n\n"));
    assert_eq!(ids, want);
}

#[test]
fn llama2_needs_alternating_turns_and_a_tokenizer_with_its_tokens() {
    let tok = llama3_tok();
    let e = ChatTemplate::Llama2
        .encode(&tok, &[("user", "hi")])
        .expect_err("no <s>")
        .to_string();
    assert_eq!(
        e,
        "the llama2 chat template needs the special token <s>, which the tokenizer lacks"
    );
    let json = serde_json::json!({
        "added_tokens": [{"id": 0, "content": "<s>", "special": true}, {"id": 1, "content": "</s>", "special": true}],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "byte_fallback": true,
            "vocab": (0..=255u32)
                .map(|b| (format!("<0x{b:02X}>"), serde_json::Value::from(b + 2)))
                .chain([("▁".to_owned(), serde_json::Value::from(258))])
                .collect::<serde_json::Map<_, _>>(),
            "merges": []},
    });
    let sp = BpeTokenizer::from_json("t", json.to_string().as_bytes()).expect("valid");
    assert_eq!(ChatTemplate::detect(&sp), Some(ChatTemplate::Llama2));
    for turns in [
        &[("assistant", "hello")][..],
        &[("user", "a"), ("user", "b")],
        &[("user", "a"), ("assistant", "b")],
    ] {
        let e = ChatTemplate::Llama2
            .encode(&sp, turns)
            .expect_err("shape")
            .to_string();
        assert!(
            e.contains("alternating") || e.contains("last message"),
            "{e}"
        );
    }
    let ids = ChatTemplate::Llama2
        .encode(
            &sp,
            &[
                ("system", "s"),
                ("user", "u"),
                ("assistant", "a"),
                ("user", "v"),
            ],
        )
        .expect("renders");
    assert_eq!(
        ids.iter().filter(|&&t| t == 0).count(),
        2,
        "a <s> per user turn"
    );
    assert_eq!(
        ids.iter().filter(|&&t| t == 1).count(),
        1,
        "a </s> per answer"
    );
    assert_eq!(ids[0], 0);
    let text = sp.decode(&ids);
    assert_eq!(
        text,
        "[INST] <<SYS>>\ns\n<</SYS>>\n\nu [/INST] a  [INST] v [/INST]"
    );
}
