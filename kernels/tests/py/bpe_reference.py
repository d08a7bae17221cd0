"""Reference tokenizations for kernels/tests/bpe_reference.rs, by Hugging Face's
`tokenizers` library (which nobody here wrote).

Trains four small BPE tokenizers on the given corpus files, one of each kind
`bulkhead_kernels::model::bpe` reads (GPT-2 byte-level, Llama 3 byte-level
with a Split regex and ignore_merges, Llama 2 SentencePiece-style with a
Metaspace pre-tokenizer and byte fallback, and the same with the legacy
Prepend + Replace normalizer), and writes for each `<name>.json` (the
tokenizer) and `<name>.cases.json` (texts, their ids without special tokens,
and the ids decoded with special tokens skipped); and for the Llama kinds
`<name>.chat.json`: conversations rendered by the family's own chat
template (Jinja, by jinja2) and tokenized by the library.

usage: bpe_reference.py OUT_DIR CORPUS_FILE...
"""

import json
import random
import sys

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EXTRA = [
    "Hello, world! I'll say it's 2026-11-25 and we've got 1234567 tokens.",
    "naïve café, Straße, façade; déjà vu. Ünïcödé",
    "日本語のテキストと中文文本",
    "Здравствуйте, мир! Γειά σου Κόσμε",
    "emoji: 👩‍💻 🚀🔥 and a flag 🇳🇴",
    "tabs\tand\nnewlines\r\n\n  indented   spaces   ",
    "   leading spaces",
    "trailing spaces   ",
    "def f(x):\n    return x ** 2  # square\n",
    "",
    " ",
    "\n",
    "a",
    "<|eot_id|> is just text here",
]


SPECIALS = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<s>",
    "</s>",
)

# The chat templates of the model families, as their tokenizer_config.json
# files carry them (Meta-Llama-3-8B-Instruct, Llama-2-7b-chat-hf).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def conversations(lines, rng):
    """Conversations that both templates accept: an optional system message,
    then user and assistant alternating, ending with the user."""
    pick = lambda: rng.choice(lines)[: rng.randrange(1, 120)]
    out = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": " be brief "}, {"role": "user", "content": "  hello\n"}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3? 🚀"},
        ],
    ]
    for _ in range(60):
        turns = [{"role": "system", "content": pick()}] if rng.random() < 0.5 else []
        for i in range(rng.randrange(0, 3) * 2 + 1):
            turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": pick()})
        out.append(turns)
    return out


def chat_cases(tok, template, specials, convos):
    import jinja2

    def raise_exception(message):
        raise ValueError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    tmpl = env.from_string(template)
    rows = []
    for messages in convos:
        text = tmpl.render(messages=messages, add_generation_prompt=True, **specials)
        ids = tok.encode(text, add_special_tokens=False).ids
        rows.append({"messages": messages, "ids": ids})
    return rows


def corpus(paths):
    lines = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            lines.extend(f.read().splitlines())
    return lines + EXTRA * 5


def cases(lines, rng):
    texts = list(EXTRA)
    text = "\n".join(lines)
    for _ in range(300):
        start = rng.randrange(len(text))
        texts.append(text[start : start + rng.randrange(1, 200)])
    alphabet = "ab cde\n\t  123 ,.!'é日🚀Ω\u00a0"
    for _ in range(200):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))))
    return texts


def byte_level(lines, split, ignore_merges):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if split:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
    )
    tok.train_from_iterator(lines, trainer)
    return tok


def sentencepiece(lines, legacy):
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    if legacy:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first", split=False
        )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    # Keep the trained alphabet small, so byte fallback is exercised.
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        limit_alphabet=60,
        special_tokens=["<unk>", "<s>", "</s>"],
    )
    tok.train_from_iterator(lines, trainer)
    # SentencePiece conversions carry the 256 byte tokens in the model's vocabulary.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


def main():
    out, paths = sys.argv[1], sys.argv[2:]
    lines = corpus(paths)
    rng = random.Random(20261125)
    texts = cases(lines, rng)
    kinds = {
        "gpt2": byte_level(lines, split=False, ignore_merges=False),
        "llama3": byte_level(lines, split=True, ignore_merges=True),
        "llama2": sentencepiece(lines, legacy=False),
        "llama2-legacy": sentencepiece(lines, legacy=True),
    }
    for name, tok in kinds.items():
        tok.save(f"{out}/{name}.json")
        rows = []
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False).ids
            # The library reads added tokens out of text; bulkhead never does.
            if any(tok.id_to_token(i) in SPECIALS for i in ids):
                continue
            rows.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
        with open(f"{out}/{name}.cases.json", "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False)
    # Content that spells a special token is where bulkhead differs on
    # purpose (it stays text); the Rust tests check that apart.
    plain = [l for l in lines if l.strip() and not any(t in l for t in SPECIALS)]
    convos = conversations(plain, rng)
    chats = {
        "llama3": (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>"}),
        "llama2": (LLAMA2_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}),
        "llama2-legacy": (LLAMA2_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}),
    }
    for name, (template, specials) in chats.items():
        rows = chat_cases(kinds[name], template, specials, convos)
        with open(f"{out}/{name}.chat.json", "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False)
    print(json.dumps({name: len(texts) for name in kinds}))


if __name__ == "__main__":
    main()
