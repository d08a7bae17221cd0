//! [`SourceMap`]: where each key of a parsed TOML document sits, to put a line on every error.
//!
//! The document is parsed once into the toml crate's spanned tree
//! ([`DeTable`]); this module records the byte span of every key and value
//! under its key path (`tenants[1].kernel.packet_burst`) and turns spans and
//! paths into 1-based lines. Serde errors carry a span only, so the path they
//! are about is found here too: the innermost key or value containing it.

use super::ConfigError;
use std::collections::BTreeMap;
use std::ops::Range;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Spans of one key path: its key (absent for array elements) and its value.
#[derive(Clone, Debug)]
struct Place {
    /// The key's span; `None` for an array element.
    key: Option<Range<usize>>,
    /// The value's span; for a `[table]` or `[[array]]` entry, its header.
    value: Range<usize>,
    /// Whether the value is a table opened by a `[table]` or `[[array]]` header.
    header: bool,
}

impl Place {
    /// The span that says where this path is: the key where there is one.
    fn anchor(&self) -> &Range<usize> {
        self.key.as_ref().unwrap_or(&self.value)
    }
}

/// Key paths of a document with their spans, and the line starts of its text.
#[derive(Debug)]
pub(super) struct SourceMap {
    /// Byte offset at which each line starts; `line_starts[0] == 0`.
    line_starts: Vec<usize>,
    /// Every key path of the document.
    places: BTreeMap<String, Place>,
}

impl SourceMap {
    /// Parses `src` into a spanned table and maps its key paths.
    ///
    /// A syntax error is reported alone: the first in the file, since what
    /// the parser recovers after it is often a cascade of the same mistake.
    pub(super) fn parse(src: &str) -> (Self, Result<DeTable<'_>, ConfigError>) {
        let line_starts = std::iter::once(0)
            .chain(src.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        let mut map = Self {
            line_starts,
            places: BTreeMap::new(),
        };
        let (table, errors) = DeTable::parse_recoverable(src);
        let table = table.into_inner();
        map.record_table(src, &table, "");
        let first = errors
            .into_iter()
            .min_by_key(|e| e.span().map_or(usize::MAX, |s| s.start));
        match first {
            Some(error) => {
                let span = error.span();
                let path = span
                    .as_ref()
                    .map(|s| map.syntax_error_path(src, s))
                    .unwrap_or_default();
                let line = span.map(|s| map.line_at(s.start));
                let message = format!("invalid TOML: {}", error.message());
                (
                    map,
                    Err(ConfigError {
                        path,
                        line,
                        message,
                    }),
                )
            }
            None => (map, Ok(table)),
        }
    }

    /// 1-based line of byte `offset`.
    pub(super) fn line_at(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset)
    }

    /// Whether the document has the key path `path`.
    pub(super) fn has(&self, path: &str) -> bool {
        self.places.contains_key(path)
    }

    /// 1-based line of `path`, or of the nearest enclosing path the file has.
    pub(super) fn line_of(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(place) = self.places.get(path) {
                return Some(self.line_at(place.anchor().start));
            }
            path = parent(path)?;
        }
    }

    /// Turns a serde error raised while reading the value at `base` into a [`ConfigError`].
    pub(super) fn serde_error(&self, base: &str, error: &toml::de::Error) -> ConfigError {
        let span = error.span();
        let path = span
            .as_ref()
            .and_then(|s| self.innermost(base, s.start))
            .unwrap_or_else(|| base.to_owned());
        let line = match span {
            Some(s) => Some(self.line_at(s.start)),
            None => self.line_of(&path),
        };
        ConfigError {
            path,
            line,
            message: error.message().to_owned(),
        }
    }

    /// The innermost path at or under `base` whose key or value contains `offset`.
    fn innermost(&self, base: &str, offset: usize) -> Option<String> {
        let contains =
            |r: &Range<usize>| r.contains(&offset) || (r.is_empty() && r.start == offset);
        self.places
            .iter()
            .filter(|(path, _)| is_within(path, base))
            .filter_map(|(path, place)| {
                let hit = [place.key.as_ref(), Some(&place.value)]
                    .into_iter()
                    .flatten()
                    .filter(|r| contains(r))
                    .map(ExactSizeIterator::len)
                    .min()?;
                Some((hit, std::cmp::Reverse(path.len()), path))
            })
            .min()
            .map(|(_, _, path)| path.clone())
    }

    /// The path a syntax error at `span` is about: the innermost key or value
    /// holding it; else, where the span is a key the parsed tree lacks (a
    /// duplicate key), that key under the table whose header precedes it.
    fn syntax_error_path(&self, src: &str, span: &Range<usize>) -> String {
        if let Some(path) = self.innermost("", span.start) {
            return path;
        }
        let text = src.get(span.clone()).unwrap_or_default();
        if !is_bare_key(text) {
            return String::new();
        }
        let table = self
            .places
            .iter()
            .filter(|(_, place)| place.header && place.value.start <= span.start)
            .max_by_key(|(_, place)| place.value.start)
            .map_or("", |(path, _)| path.as_str());
        if table.is_empty() {
            text.to_owned()
        } else {
            format!("{table}.{text}")
        }
    }

    fn record_table(&mut self, src: &str, table: &DeTable<'_>, prefix: &str) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key_segment(key.get_ref())
            } else {
                format!("{prefix}.{}", key_segment(key.get_ref()))
            };
            self.record_value(src, value, path, Some(key.span()));
        }
    }

    fn record_value(
        &mut self,
        src: &str,
        value: &Spanned<DeValue<'_>>,
        path: String,
        key: Option<Range<usize>>,
    ) {
        let span = value.span();
        let mut header = false;
        match value.get_ref() {
            DeValue::Table(table) => {
                header = src
                    .get(span.clone())
                    .is_some_and(|text| text.starts_with('['));
                self.record_table(src, table, &path);
            }
            DeValue::Array(array) => {
                for (i, element) in array.iter().enumerate() {
                    self.record_value(src, element, format!("{path}[{i}]"), None);
                }
            }
            _ => {}
        }
        let place = Place {
            key,
            value: span,
            header,
        };
        self.places.insert(path, place);
    }
}

/// Whether TOML allows `key` unquoted.
fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A key as it appears in a path: bare when TOML allows it bare, quoted otherwise.
fn key_segment(key: &str) -> String {
    if is_bare_key(key) {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// The path one level up: `a.b[2]` → `a.b` → `a`; `None` at the top.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

/// Whether `path` is `base` or lies under it.
fn is_within(path: &str, base: &str) -> bool {
    base.is_empty()
        || path
            .strip_prefix(base)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_based_and_count_newlines() {
        let (map, table) = SourceMap::parse("a = 1\n\n[t]\nb = 2\n");
        assert!(table.is_ok());
        assert_eq!(map.line_at(0), 1);
        assert_eq!(map.line_of("a"), Some(1));
        assert_eq!(map.line_of("t"), Some(3));
        assert_eq!(map.line_of("t.b"), Some(4));
        assert_eq!(map.line_of("t.missing"), Some(3), "falls back to the table");
        assert_eq!(map.line_of("missing"), None);
    }

    #[test]
    fn array_elements_are_placed_at_their_header_or_value() {
        let src = "[[t]]\nx = 1\n[[t]]\nx = [\n  1,\n  2,\n]\n";
        let (map, _) = SourceMap::parse(src);
        assert_eq!(map.line_of("t[0]"), Some(1));
        assert_eq!(map.line_of("t[1]"), Some(3));
        assert_eq!(map.line_of("t[1].x[1]"), Some(6));
    }

    #[test]
    fn parent_strips_one_segment() {
        assert_eq!(parent("a.b[2]"), Some("a.b"));
        assert_eq!(parent("a.b"), Some("a"));
        assert_eq!(parent("a"), Some(""));
        assert_eq!(parent(""), None);
        assert!(is_within("tenants[1].id", "tenants[1]"));
        assert!(!is_within("tenants[10].id", "tenants[1]"));
    }

    #[test]
    fn syntax_error_names_the_first_problem_and_its_key() {
        let (_, table) = SourceMap::parse("a = 1\nb = 12x\nc = \n");
        let error = table.unwrap_err();
        assert_eq!(error.path, "b");
        assert_eq!(error.line, Some(2));
        assert!(error.message.starts_with("invalid TOML: "), "{error}");
    }

    #[test]
    fn duplicate_key_is_named_under_the_table_it_repeats_in() {
        let (_, table) = SourceMap::parse(
            "a = 1
[[t]]
x = 1
[[t]]
x = 1
x = 2
",
        );
        let error = table.unwrap_err();
        assert_eq!(error.path, "t[1].x");
        assert_eq!(error.line, Some(6));
        assert_eq!(error.message, "invalid TOML: duplicate key");
    }
}
