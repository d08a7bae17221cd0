//! OpenAI-compatible request bodies, checked, and the prompt they render to.

use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;

/// A request parsed from JSON, common to chat and text completions.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    /// `chat` (messages) or text (prompt).
    pub kind: Kind,
    /// The model name.
    pub model: String,
    /// The prompt: text, or chat turns (the model's template renders them).
    pub prompt: Prompt,
    /// `max_tokens` (or `max_completion_tokens`), when given.
    pub max_tokens: Option<u32>,
    /// Sampling temperature (default 1).
    pub temperature: f32,
    /// Nucleus mass (default 1).
    pub top_p: f32,
    /// Seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream as server-sent events.
    pub stream: bool,
    /// The end user, for the tenant's own records (hashed into the audit, never logged).
    pub user: Option<String>,
}

/// What a request asks the model to continue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// `/v1/completions`: the text itself.
    Text(String),
    /// `/v1/chat/completions`: the turns, in order (at least one).
    Chat(Vec<Turn>),
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    /// Its role.
    pub role: Role,
    /// Its text (text parts joined; empty for an assistant turn without content).
    pub content: String,
}

/// The roles a chat message may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `system`.
    System,
    /// `developer` (OpenAI's newer name for system instructions).
    Developer,
    /// `user`.
    User,
    /// `assistant`.
    Assistant,
    /// `tool`.
    Tool,
}

impl Role {
    fn parse(role: &str) -> Option<Self> {
        Some(match role {
            "system" => Self::System,
            "developer" => Self::Developer,
            "user" => Self::User,
            "assistant" => Self::Assistant,
            "tool" => Self::Tool,
            _ => return None,
        })
    }

    /// The name a request uses.
    pub const fn name(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::Developer => "developer",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

impl Prompt {
    /// The prompt's own bytes (its text, or every turn's content): what
    /// the tenant's `max_prompt_bytes` caps.
    pub fn content_bytes(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Chat(turns) => turns.iter().map(|t| t.content.len()).sum(),
        }
    }

    /// The text the built-in model reads: the prompt itself, or one
    /// `<|role|>` line per turn, each followed by its content, then the
    /// assistant's turn.
    pub fn render_builtin(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Self::Text(t) => std::borrow::Cow::Borrowed(t),
            Self::Chat(turns) => {
                let mut out = String::with_capacity(
                    self.content_bytes() + 16 * turns.len() + "<|assistant|>\n".len(),
                );
                for t in turns {
                    push_turn(&mut out, t.role.name(), &t.content);
                }
                out.push_str("<|assistant|>\n");
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

/// Which endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Text,
}

/// A 400: what is wrong and with which parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRequest {
    /// What is wrong.
    pub message: String,
    /// The parameter, when one is to blame.
    pub param: Option<&'static str>,
}

fn bad(message: impl Into<String>, param: Option<&'static str>) -> BadRequest {
    BadRequest {
        message: message.into(),
        param,
    }
}

/// The body's fields, each as JSON (so a wrong type gets its own message),
/// with `messages` as `M`.
#[derive(Deserialize)]
struct Raw<M> {
    model: Option<Value>,
    messages: Option<M>,
    prompt: Option<Value>,
    max_tokens: Option<Value>,
    max_completion_tokens: Option<Value>,
    temperature: Option<Value>,
    top_p: Option<Value>,
    seed: Option<Value>,
    stop: Option<Value>,
    stream: Option<Value>,
    user: Option<Value>,
    n: Option<Value>,
}

/// A chat message of the common shape: a role and text content, read
/// without building a JSON tree (borrowed from the body where it can be).
#[derive(Deserialize)]
struct PlainMessage<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

/// Parses and checks a body. Unknown fields are ignored, as OpenAI's API does;
/// known ones must have the right type and range.
///
/// Chat messages of the common shape (a known role, text content) take a
/// fast path that reads them straight into their types; anything else,
/// any error included, is parsed as JSON values, which [`parse_values`]
/// alone decides: the fast path gives the same answer or none
/// (`fast_path_answers_as_the_values_do`).
pub fn parse(kind: Kind, body: &[u8]) -> Result<CompletionRequest, BadRequest> {
    if kind == Kind::Chat
        && let Ok(raw) = serde_json::from_slice::<Raw<Vec<PlainMessage<'_>>>>(body)
        && let Some(prompt) = raw.messages.as_deref().and_then(plain_turns)
    {
        let model = checked_model(raw.model.as_ref())?.to_owned();
        return checked(kind, raw, model, prompt);
    }
    parse_values(kind, body)
}

/// [`parse`] by way of JSON values: every body, every error message.
fn parse_values(kind: Kind, body: &[u8]) -> Result<CompletionRequest, BadRequest> {
    let raw: Raw<Value> = serde_json::from_slice(body).map_err(|e| {
        bad(
            format!("We could not parse the JSON body of your request: {e}"),
            None,
        )
    })?;
    // The model's error comes before the prompt's.
    let model = checked_model(raw.model.as_ref())?.to_owned();
    let prompt = match kind {
        Kind::Chat => Prompt::Chat(chat_turns(raw.messages.as_ref())?),
        Kind::Text => match &raw.prompt {
            Some(Value::String(p)) => Prompt::Text(p.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                Prompt::Text(a[0].as_str().unwrap_or_default().to_owned())
            }
            Some(_) => {
                return Err(bad(
                    "'prompt' must be a string (one prompt per request)",
                    Some("prompt"),
                ));
            }
            None => return Err(bad("you must provide a prompt", Some("prompt"))),
        },
    };
    checked(kind, raw, model, prompt)
}

/// The model's error, if it is not a non-empty string.
fn checked_model(model: Option<&Value>) -> Result<&str, BadRequest> {
    match model {
        Some(Value::String(m)) if !m.is_empty() => Ok(m),
        Some(_) => Err(bad("'model' must be a non-empty string", Some("model"))),
        None => Err(bad("you must provide a model parameter", Some("model"))),
    }
}

/// The turns of messages of the common shape; `None` for anything
/// [`chat_turns`] would refuse (left to it, for its message).
fn plain_turns(messages: &[PlainMessage<'_>]) -> Option<Prompt> {
    if messages.is_empty() {
        return None;
    }
    let mut turns = Vec::with_capacity(messages.len());
    for m in messages {
        let role = Role::parse(&m.role)?;
        let content = match &m.content {
            Some(c) => c.as_ref().to_owned(),
            None if role == Role::Assistant => String::new(),
            None => return None,
        };
        turns.push(Turn { role, content });
    }
    Some(Prompt::Chat(turns))
}

/// One turn of the built-in model's chat template.
fn push_turn(out: &mut String, role: &str, content: &str) {
    out.push_str("<|");
    out.push_str(role);
    out.push_str("|>\n");
    out.push_str(content);
    out.push('\n');
}

/// Checks the fields besides the model and the prompt (both checked
/// already, the model first).
fn checked<M>(
    kind: Kind,
    raw: Raw<M>,
    model: String,
    prompt: Prompt,
) -> Result<CompletionRequest, BadRequest> {
    if let Some(n) = raw.n
        && n != 1
    {
        return Err(bad("only n = 1 is supported", Some("n")));
    }
    let max_tokens = match raw.max_completion_tokens.or(raw.max_tokens) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    bad(
                        "'max_tokens' must be a non-negative integer",
                        Some("max_tokens"),
                    )
                })?,
        ),
    };
    let temperature = number(raw.temperature, "temperature", 1.0, 0.0..=2.0)?;
    let top_p = number(raw.top_p, "top_p", 1.0, 0.0..=1.0)?;
    if top_p == 0.0 {
        return Err(bad("'top_p' must be greater than 0", Some("top_p")));
    }
    let seed = match raw.seed {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(i64::cast_unsigned))
                .ok_or_else(|| bad("'seed' must be an integer", Some("seed")))?,
        ),
    };
    let stop = match raw.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if !s.is_empty() => vec![s],
        Some(Value::String(_)) => {
            return Err(bad("'stop' must not be an empty string", Some("stop")));
        }
        Some(Value::Array(items)) if items.len() <= 4 => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() => Ok(s),
                _ => Err(bad(
                    "'stop' entries must be non-empty strings",
                    Some("stop"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(bad(
                "'stop' must be a string or an array of up to 4 strings",
                Some("stop"),
            ));
        }
    };
    let stream = match raw.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(bad("'stream' must be a boolean", Some("stream"))),
    };
    let user = match raw.user {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => Some(u),
        Some(_) => return Err(bad("'user' must be a string", Some("user"))),
    };
    Ok(CompletionRequest {
        kind,
        model,
        prompt,
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
        stream,
        user,
    })
}

#[allow(clippy::cast_possible_truncation)] // ranges are checked
fn number(
    v: Option<Value>,
    name: &'static str,
    default: f32,
    range: std::ops::RangeInclusive<f64>,
) -> Result<f32, BadRequest> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if range.contains(&x) => Ok(x as f32),
            _ => Err(BadRequest {
                message: format!(
                    "'{name}' must be a number between {} and {}",
                    range.start(),
                    range.end()
                ),
                param: Some(name),
            }),
        },
    }
}

/// The turns of `messages`, each checked.
fn chat_turns(messages: Option<&Value>) -> Result<Vec<Turn>, BadRequest> {
    let Some(Value::Array(messages)) = messages else {
        return Err(bad(
            "'messages' must be a non-empty array",
            Some("messages"),
        ));
    };
    if messages.is_empty() {
        return Err(bad(
            "'messages' must be a non-empty array",
            Some("messages"),
        ));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            bad(
                format!("messages[{i}].role must be a string"),
                Some("messages"),
            )
        })?;
        let Some(role) = Role::parse(role) else {
            return Err(bad(
                format!(
                    "messages[{i}].role '{role}' is not one of system, developer, user, assistant, tool"
                ),
                Some("messages"),
            ));
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (
                        part.get("type").and_then(Value::as_str),
                        part.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(bad(
                                format!("messages[{i}].content: only text parts are supported"),
                                Some("messages"),
                            ));
                        }
                    }
                }
                text
            }
            Some(Value::Null) | None if role == Role::Assistant => String::new(),
            _ => {
                return Err(bad(
                    format!("messages[{i}].content must be a string or an array of text parts"),
                    Some("messages"),
                ));
            }
        };
        turns.push(Turn { role, content });
    }
    Ok(turns)
}

/// Turns output bytes into text for streaming: whole UTF-8 characters only,
/// holding back a character split across tokens.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Text completed by `bytes`.
    /// Invalid bytes become U+FFFD as `String::from_utf8_lossy` would make
    /// them of the whole output; a character still unfinished at the end
    /// waits for its next bytes, even behind invalid ones.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut text = String::new();
        let mut rest: &[u8] = &self.pending;
        while !rest.is_empty() {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).expect("valid up to here"));
                    // None: the start of a character whose rest has not come.
                    let Some(invalid) = e.error_len() else {
                        rest = after;
                        break;
                    };
                    // Invalid bytes, not a split character: replaced now.
                    text.push(char::REPLACEMENT_CHARACTER);
                    rest = &after[invalid..];
                }
            }
        }
        let taken = self.pending.len() - rest.len();
        self.pending.drain(..taken);
        text
    }

    /// Whatever is left at the end (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chat_bodies_parse_and_render() {
        let r = parse(
            Kind::Chat,
            br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream":true,"stop":"\n\n","seed":7,"max_tokens":5,"x":1}"#,
        )
        .unwrap();
        assert_eq!(
            r.prompt.render_builtin(),
            "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
        );
        assert_eq!(r.prompt.content_bytes(), "be brief".len() + "hi".len());
        assert!(r.stream);
        assert_eq!((r.seed, r.max_tokens, r.stop.len()), (Some(7), Some(5), 1));
    }

    #[test]
    fn bad_bodies_name_the_problem() {
        let cases: [(&[u8], &str); 8] = [
            (b"{not json", "could not parse"),
            (br#"{"messages":[]}"#, "model parameter"),
            (br#"{"model":"m","messages":[]}"#, "non-empty array"),
            (
                br#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
                "not one of",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                "between 0 and 2",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                "non-negative",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":[1]}"#,
                "non-empty strings",
            ),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#,
                "n = 1",
            ),
        ];
        for (body, want) in cases {
            let err = parse(Kind::Chat, body).unwrap_err();
            assert!(
                err.message.contains(want),
                "{:?}: {}",
                String::from_utf8_lossy(body),
                err.message
            );
        }
    }

    #[test]
    fn the_common_chat_body_takes_the_fast_path() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi \u00e9"},{"role":"assistant"}],"max_tokens":1,"temperature":0}"#;
        let raw: Raw<Vec<PlainMessage<'_>>> = serde_json::from_slice(body).unwrap();
        let prompt = raw.messages.as_deref().and_then(plain_turns).unwrap();
        assert_eq!(
            prompt.render_builtin(),
            "<|system|>\nbe brief\n<|user|>\nhi \u{e9}\n<|assistant|>\n\n<|assistant|>\n"
        );
        assert_eq!(parse(Kind::Chat, body), parse_values(Kind::Chat, body));
    }

    /// One JSON value of `choices`, or the field left out (`None`).
    fn one_of(choices: &'static [Option<&'static str>]) -> impl Strategy<Value = Option<String>> {
        proptest::sample::select(choices).prop_map(|c| c.map(str::to_owned))
    }

    /// An object of `fields` (each left out when `None`), in order.
    fn object(fields: &[(&str, Option<String>)]) -> String {
        let fields: Vec<String> = fields
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!(r#""{k}":{v}"#)))
            .collect();
        format!("{{{}}}", fields.join(","))
    }

    /// A chat message, often malformed: roles, contents, extra and repeated keys.
    fn message() -> impl Strategy<Value = String> {
        let role = one_of(&[
            None,
            Some(r#""user""#),
            Some(r#""assistant""#),
            Some(r#""system""#),
            Some(r#""tool""#),
            Some(r#""wizard""#),
            Some("1"),
            Some("null"),
        ]);
        let content = one_of(&[
            None,
            Some(r#""hi""#),
            Some(r#""a\nb\u00e9\"""#),
            Some(r#""""#),
            Some("null"),
            Some(r#"[{"type":"text","text":"x"},{"type":"text","text":"y"}]"#),
            Some(r#"[{"type":"image_url"}]"#),
            Some("[]"),
            Some("5"),
        ]);
        let name = one_of(&[None, Some(r#""bob""#)]);
        let again = one_of(&[None, Some(r#""user""#), Some(r#""wizard""#)]);
        (role, content, name, again, proptest::bool::weighted(0.05)).prop_map(
            |(role, content, name, again, not_an_object)| {
                if not_an_object {
                    return r#""a message""#.to_owned();
                }
                object(&[
                    ("role", role),
                    ("content", content),
                    ("name", name),
                    ("role", again),
                ])
            },
        )
    }

    /// A completion body, often malformed, every known field varied.
    fn body() -> impl Strategy<Value = String> {
        let messages = prop_oneof![
            one_of(&[None, Some("null"), Some("[]"), Some(r#""hi""#)]),
            proptest::collection::vec(message(), 1..4)
                .prop_map(|m| Some(format!("[{}]", m.join(",")))),
        ];
        let head = (
            one_of(&[
                Some(r#""m""#),
                Some(r#""m\"x""#),
                None,
                Some(r#""""#),
                Some("1"),
                Some("null"),
            ]),
            messages,
            one_of(&[None, Some(r#""text""#), Some(r#"["one"]"#), Some("[1]")]),
            one_of(&[
                None,
                Some("5"),
                Some("-1"),
                Some("null"),
                Some("1.5"),
                Some(r#""5""#),
            ]),
            one_of(&[
                None,
                Some("0"),
                Some("0.7"),
                Some("3"),
                Some("null"),
                Some(r#""x""#),
            ]),
            one_of(&[None, Some("1"), Some("0"), Some("0.5")]),
        );
        let tail = (
            one_of(&[None, Some("7"), Some("-7"), Some("null"), Some(r#""s""#)]),
            one_of(&[
                None,
                Some(r#""\n""#),
                Some(r#"["a","b"]"#),
                Some("[1]"),
                Some("[]"),
                Some("null"),
            ]),
            one_of(&[None, Some("true"), Some("false"), Some("null"), Some("1")]),
            one_of(&[None, Some(r#""u""#), Some("1"), Some("null")]),
            one_of(&[None, Some("1"), Some("2"), Some("null"), Some("1.0")]),
            one_of(&[None, Some(r#"[{"role":"user","content":"again"}]"#)]),
        );
        (head, tail).prop_map(
            |(
                (model, messages, prompt, max_tokens, temperature, top_p),
                (seed, stop, stream, user, n, messages_again),
            )| {
                object(&[
                    ("model", model),
                    ("messages", messages),
                    ("prompt", prompt),
                    ("max_tokens", max_tokens),
                    ("temperature", temperature),
                    ("top_p", top_p),
                    ("seed", seed),
                    ("stop", stop),
                    ("stream", stream),
                    ("user", user),
                    ("n", n),
                    ("x", Some("{}".to_owned())),
                    ("messages", messages_again),
                ])
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// Whatever the body, the fast path answers as the JSON values do.
        #[test]
        fn fast_path_answers_as_the_values_do(body in body()) {
            for kind in [Kind::Chat, Kind::Text] {
                prop_assert_eq!(
                    parse(kind, body.as_bytes()),
                    parse_values(kind, body.as_bytes()),
                    "{}", body
                );
            }
        }
    }

    #[test]
    fn an_empty_stop_string_is_refused_as_empty_entries_are() {
        for stop in ["\"\"", "[\"\"]"] {
            let body = format!("{{\"model\":\"m\",\"prompt\":\"x\",\"stop\":{stop}}}");
            let e = parse(Kind::Text, body.as_bytes()).expect_err(&body);
            assert_eq!(e.param, Some("stop"), "{body}");
            assert!(e.message.contains("empty"), "{body}: {}", e.message);
        }
    }

    #[test]
    fn split_characters_wait_for_their_last_byte() {
        let mut s = Utf8Stream::default();
        let euro = "€".as_bytes();
        assert_eq!(s.push(b"a"), "a");
        assert_eq!(s.push(&euro[..1]), "");
        assert_eq!(s.push(&euro[1..]), "€");
        assert_eq!(s.push(&[0xff]), "\u{fffd}");
        assert_eq!(s.push(&euro[..2]), "");
        assert_eq!(s.finish(), "\u{fffd}");
        // An unfinished character behind an invalid byte still waits.
        assert_eq!(s.push(&[0xff, euro[0], euro[1]]), "\u{fffd}");
        assert_eq!(s.push(&euro[2..]), "€");
    }

    proptest! {
        /// Pieces decoded as they come read as the whole decoded at once.
        #[test]
        fn pieces_read_as_the_whole(
            bytes in proptest::collection::vec(
                prop_oneof![Just(0xe2u8), Just(0x82), Just(0xac), Just(0xff), Just(b'a'), any::<u8>()],
                0..40,
            ),
            cuts in proptest::collection::vec(0usize..40, 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut s = Utf8Stream::default();
            let mut text = String::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                text.push_str(&s.push(&bytes[from..cut]));
                from = cut;
            }
            text.push_str(&s.finish());
            prop_assert_eq!(text, String::from_utf8_lossy(&bytes).into_owned());
        }
    }
}
