//! [`RequestId`]: a request's identity across the proxy, the workers and the audit log.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A request's 128-bit id, chosen by the proxy; shown as 32 lowercase hex digits.
///
/// The same id names the request on the wire, in logs and in its audit
/// record, so `Display` and [`FromStr`] round-trip exactly.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u128);

/// Why a string is not a [`RequestId`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseRequestIdError {
    /// Not exactly 32 characters long.
    #[error("request id must be 32 hex digits, got {0} characters")]
    Length(usize),
    /// A character that is not a hex digit.
    #[error("request id contains {0:?}, which is not a hex digit")]
    NotHex(char),
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

impl FromStr for RequestId {
    type Err = ParseRequestIdError;

    /// Parses exactly 32 hex digits (either case), as `Display` writes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(c) = s.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(ParseRequestIdError::NotHex(c));
        }
        if s.len() != 32 {
            return Err(ParseRequestIdError::Length(s.len()));
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| ParseRequestIdError::Length(s.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_32_lowercase_hex_digits_and_parses_back() {
        for id in [
            0,
            1,
            0xdead_beef,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            let text = RequestId(id).to_string();
            assert_eq!(text.len(), 32);
            assert_eq!(text, text.to_lowercase());
            assert_eq!(text.parse::<RequestId>(), Ok(RequestId(id)));
        }
        assert_eq!(RequestId(0xab).to_string(), format!("{}ab", "0".repeat(30)));
        assert_eq!(
            "0123456789ABCDEFFEDCBA9876543210".parse(),
            Ok(RequestId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210))
        );
    }

    #[test]
    fn rejects_anything_but_32_hex_digits() {
        assert_eq!("".parse::<RequestId>(), Err(ParseRequestIdError::Length(0)));
        assert_eq!(
            "abc".parse::<RequestId>(),
            Err(ParseRequestIdError::Length(3))
        );
        let long = "0".repeat(33);
        assert_eq!(
            long.parse::<RequestId>(),
            Err(ParseRequestIdError::Length(33))
        );
        let signed = format!("+{}", "0".repeat(31));
        assert_eq!(
            signed.parse::<RequestId>(),
            Err(ParseRequestIdError::NotHex('+'))
        );
        let spaced = format!(" {}", "0".repeat(31));
        assert_eq!(
            spaced.parse::<RequestId>(),
            Err(ParseRequestIdError::NotHex(' '))
        );
        let unicode = format!("é{}", "0".repeat(30));
        assert_eq!(
            unicode.parse::<RequestId>(),
            Err(ParseRequestIdError::NotHex('é'))
        );
    }
}
