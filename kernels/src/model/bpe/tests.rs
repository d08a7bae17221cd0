use super::*;

/// A byte-level tokenizer over a vocabulary of printable ASCII letters and
/// `extra` tokens, with `merges`, and `<|eot_id|>` as a special added token.
fn byte_level(extra: &[&str], merges: &[(&str, &str)], ignore_merges: bool) -> BpeTokenizer {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    let (alphabet, _) = byte_alphabet();
    for c in alphabet {
        let id = u32::try_from(vocab.len()).expect("small");
        vocab.insert(c.to_string(), id);
    }
    for e in extra {
        let id = u32::try_from(vocab.len()).expect("small");
        vocab.insert((*e).to_owned(), id);
    }
    let eot = vocab.len();
    let json = serde_json::json!({
        "added_tokens": [{"id": eot, "content": "<|eot_id|>", "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
        "decoder": {"type": "ByteLevel"},
        "model": {
            "type": "BPE",
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        },
    });
    BpeTokenizer::from_json("test.json", json.to_string().as_bytes()).expect("valid")
}

fn id(tok: &BpeTokenizer, piece: &str) -> u32 {
    tok.vocab[piece]
}

#[test]
fn merges_apply_lowest_rank_first_and_ignore_merges_takes_whole_words() {
    // "abc": merges rank b+c first, so a + bc; "abc" is in the vocabulary too.
    let merges = [("b", "c"), ("a", "b")];
    let tok = byte_level(&["bc", "ab", "abc"], &merges, false);
    assert_eq!(
        tok.encode("abc").expect("encodes"),
        vec![id(&tok, "a"), id(&tok, "bc")]
    );
    let whole = byte_level(&["bc", "ab", "abc"], &merges, true);
    assert_eq!(
        whole.encode("abc").expect("encodes"),
        vec![id(&whole, "abc")]
    );
    // Equal ranks never happen; the leftmost of a repeated pair merges first.
    let tok = byte_level(&["aa"], &[("a", "a")], false);
    assert_eq!(
        tok.encode("aaa").expect("encodes"),
        vec![id(&tok, "aa"), id(&tok, "a")]
    );
}

#[test]
fn text_never_becomes_a_special_token() {
    let tok = byte_level(&[], &[], false);
    let eot = tok.special("<|eot_id|>").expect("added");
    assert!(tok.is_special(eot));
    let ids = tok.encode("say <|eot_id|> now").expect("encodes");
    assert!(!ids.contains(&eot), "{ids:?}");
    assert_eq!(tok.decode(&ids), "say <|eot_id|> now");
    // Special tokens decode to nothing.
    let mut with = ids.clone();
    with.push(eot);
    assert_eq!(tok.decode(&with), "say <|eot_id|> now");
}

#[test]
fn byte_level_round_trips_any_text() {
    let tok = byte_level(&[], &[], false);
    for text in ["", " ", "naïve 日本 🚀\n\t\r\0", "  two  spaces  ", "x"] {
        let ids = tok.encode(text).expect("encodes");
        assert_eq!(ids.len(), text.len(), "one token per byte without merges");
        assert_eq!(tok.decode(&ids), text);
    }
}

#[test]
fn the_merge_of_a_long_word_is_not_quadratic_in_its_length() {
    // One Metaspace word of 200k characters: each merge is O(log n).
    let json = serde_json::json!({
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "model": {"type": "BPE", "vocab": {"▁": 0, "a": 1, "aa": 2, "aaaa": 3}, "merges": ["a a", "aa aa"]},
    });
    let tok = BpeTokenizer::from_json("t", json.to_string().as_bytes()).expect("valid");
    let text = "a".repeat(200_000);
    let ids = tok.encode(&text).expect("encodes");
    assert_eq!(ids.len(), 1 + 50_000);
    assert_eq!(tok.decode(&ids), text, "the prepended space is stripped");
}

fn refused(json: &serde_json::Value) -> String {
    BpeTokenizer::from_json("tok.json", json.to_string().as_bytes())
        .expect_err("refused")
        .to_string()
}

#[test]
fn what_is_not_read_is_refused_by_name() {
    let model =
        serde_json::json!({"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]});
    let level = serde_json::json!({"type": "ByteLevel"});
    let e = refused(
        &serde_json::json!({"pre_tokenizer": level, "decoder": level,
        "model": {"type": "Unigram", "vocab": {}, "merges": []}}),
    );
    assert!(
        e.starts_with("tok.json: a Unigram model is not supported"),
        "{e}"
    );
    let e = refused(&serde_json::json!({"pre_tokenizer": {"type": "Whitespace"}, "model": model}));
    assert!(
        e.contains("neither byte-level nor SentencePiece-style"),
        "{e}"
    );
    let e = refused(
        &serde_json::json!({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed", "invert": false}, level]},
        "decoder": level, "model": model}),
    );
    assert!(e.contains("behavior \"Removed\""), "{e}");
    let e = refused(
        &serde_json::json!({"pre_tokenizer": level, "decoder": level,
        "model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}),
    );
    assert!(
        e.contains("merge 0 (\"a\", \"b\") names \"b\", which is not in the vocabulary"),
        "{e}"
    );
    let e = refused(
        &serde_json::json!({"pre_tokenizer": level, "decoder": level,
        "model": {"type": "BPE", "dropout": 0.1, "vocab": {}, "merges": []}}),
    );
    assert!(e.contains("dropout"), "{e}");
    let e = refused(&serde_json::json!({"pre_tokenizer": level, "model": model}));
    assert!(e.contains("needs a ByteLevel decoder"), "{e}");
    let e = refused(
        &serde_json::json!({"pre_tokenizer": level, "decoder": level, "model": model,
        "added_tokens": [{"id": 4_294_967_295u32, "content": "<|x|>", "special": true}]}),
    );
    assert!(
        e.contains("token id 4294967295 is past the largest vocabulary accepted"),
        "{e}"
    );
    let e = refused(
        &serde_json::json!({"pre_tokenizer": level, "decoder": level, "model": model,
        "added_tokens": [{"id": 2, "content": "<|eot_id|>", "special": true}]}),
    );
    assert!(
        e.contains("added token \"<|eot_id|>\" has id 2, which the vocabulary gives to \"ab\""),
        "{e}"
    );
    let e = BpeTokenizer::from_json("tok.json", b"{")
        .expect_err("refused")
        .to_string();
    assert!(e.starts_with("tok.json: not a tokenizer.json"), "{e}");
}

#[test]
fn a_character_with_no_token_is_named() {
    let json = serde_json::json!({
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "model": {"type": "BPE", "vocab": {"▁": 0, "a": 1}, "merges": []},
    });
    let tok = BpeTokenizer::from_json("t", json.to_string().as_bytes()).expect("valid");
    assert_eq!(tok.encode("a a").expect("encodes"), vec![0, 1, 0, 1]);
    let e = tok.encode("ab").expect_err("no b").to_string();
    assert!(e.contains("'b'"), "{e}");
}

#[test]
fn a_whitespace_run_too_long_for_the_regex_is_cut_and_everything_else_kept() {
    let tok = byte_level(&[], &[], false);
    // 600,000 spaces overflow the backtracking stack of `\s+(?!\S)` uncut.
    for text in [
        " ".repeat(600_000),
        format!("a{}b", " \n".repeat(300_000)),
        format!("{}x", "\t".repeat(LONG_RUN + 1)),
    ] {
        let ids = tok.encode(&text).expect("encodes");
        assert_eq!(tok.decode(&ids), text, "nothing lost or added");
    }
    let text = format!("ab{}cd", " ".repeat(LONG_RUN * 2 + 5));
    let pieces = cut_long_runs(&text);
    assert_eq!(pieces.concat(), text);
    assert_eq!(pieces[0], "ab");
    assert!(
        pieces[1..pieces.len() - 1]
            .iter()
            .all(|p| p.len() <= LONG_RUN && p.trim().is_empty())
    );
    assert_eq!(
        pieces.last().copied(),
        Some(&format!("{}cd", " ".repeat(RUN_TAIL))[..])
    );
    // Runs up to the limit are left whole.
    let short = format!("a{}b", " ".repeat(LONG_RUN));
    assert_eq!(cut_long_runs(&short), vec![short.as_str()]);
}
