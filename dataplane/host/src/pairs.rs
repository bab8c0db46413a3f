//! Wire formats: the serialized header map ("pairs") and the property path.
//!
//! Pairs: `u32 N | N × (u32 key_len, u32 value_len) | N × (key, 0x00, value, 0x00)`, all
//! little-endian. Empty maps are sent as no bytes at all (the SDK deserializers index past a
//! lone `0x00`), and accepted in any of the forms SDKs produce: no bytes, a lone `0x00`, or N=0.

use crate::limits::{MAX_PAIRS_BYTES, MAX_PAIRS_COUNT};

/// An ordered multimap of header (or trailer, or metadata) fields as the ABI sees them:
/// lowercase names, byte values, duplicates allowed, order kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields(pub Vec<(String, Vec<u8>)>);

impl Fields {
    pub fn new() -> Fields {
        Fields(Vec::new())
    }

    pub fn from_pairs<K: Into<String>, V: Into<Vec<u8>>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Fields {
        Fields(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into().to_ascii_lowercase(), v.into()))
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The first value of `name` (names compare case-insensitively).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of `name` as UTF-8 (lossy).
    pub fn get_str(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Every value of `name`, joined with `,` as HTTP allows.
    pub fn get_joined(&self, name: &str) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for (k, v) in &self.0 {
            if k.eq_ignore_ascii_case(name) {
                match &mut out {
                    None => out = Some(v.clone()),
                    Some(acc) => {
                        acc.push(b',');
                        acc.extend_from_slice(v);
                    }
                }
            }
        }
        out
    }

    pub fn add(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.0.push((name.to_ascii_lowercase(), value.into()));
    }

    /// Replaces every value of `name` with one value (adds it if absent), keeping the position
    /// of the first occurrence.
    pub fn set(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        let value = value.into();
        if let Some(pos) = self
            .0
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            self.0[pos].1 = value;
            let mut i = pos + 1;
            while i < self.0.len() {
                if self.0[i].0.eq_ignore_ascii_case(name) {
                    self.0.remove(i);
                } else {
                    i += 1;
                }
            }
        } else {
            self.add(name, value);
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    /// Total bytes of names and values, which is what `proxy_get_header_map_size` reports.
    pub fn byte_size(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// Serializes fields in the pairs format; an empty map is no bytes.
pub fn serialize(fields: &Fields) -> Vec<u8> {
    serialize_iter(fields.0.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())))
}

pub fn serialize_iter<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> Vec<u8> {
    let count = pairs.clone().count();
    if count == 0 {
        return Vec::new();
    }
    let data: usize = pairs.clone().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + count * 8 + data);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Why a guest's serialized map was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PairsError {
    #[error("serialized map is {0} bytes, over the {MAX_PAIRS_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("serialized map has {0} pairs, over the {MAX_PAIRS_COUNT}-pair limit")]
    TooManyPairs(usize),
    #[error("serialized map is truncated or its lengths do not add up")]
    Malformed,
    #[error("serialized map has byte {0:#04x} where a pair's terminating NUL belongs")]
    MissingNul(u8),
    #[error("serialized map has {0} bytes after its last pair")]
    TrailingBytes(usize),
}

/// Parses a guest's serialized map. Names are lowercased (as Envoy does); values stay bytes.
pub fn deserialize(bytes: &[u8]) -> Result<Fields, PairsError> {
    if bytes.len() > MAX_PAIRS_BYTES {
        return Err(PairsError::TooLarge(bytes.len()));
    }
    if bytes.is_empty() || bytes == [0] {
        return Ok(Fields::new());
    }
    let read_u32 = |at: usize| -> Result<usize, PairsError> {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or(PairsError::Malformed)
    };
    let count = read_u32(0)?;
    if count > MAX_PAIRS_COUNT {
        return Err(PairsError::TooManyPairs(count));
    }
    let mut lens = Vec::with_capacity(count);
    for i in 0..count {
        lens.push((read_u32(4 + i * 8)?, read_u32(8 + i * 8)?));
    }
    let mut at = 4 + count * 8;
    let mut fields = Vec::with_capacity(count);
    // Each piece is followed by a NUL, which must be there.
    let piece = |at: &mut usize, len: usize| -> Result<&[u8], PairsError> {
        let end = at.checked_add(len).ok_or(PairsError::Malformed)?;
        let data = bytes.get(*at..end).ok_or(PairsError::Malformed)?;
        match bytes.get(end) {
            Some(0) => {}
            Some(b) => return Err(PairsError::MissingNul(*b)),
            None => return Err(PairsError::Malformed),
        }
        *at = end + 1;
        Ok(data)
    };
    for (klen, vlen) in lens {
        let key = piece(&mut at, klen)?;
        let value = piece(&mut at, vlen)?;
        fields.push((
            String::from_utf8_lossy(key).to_ascii_lowercase(),
            value.to_vec(),
        ));
    }
    if at != bytes.len() {
        return Err(PairsError::TrailingBytes(bytes.len() - at));
    }
    Ok(Fields(fields))
}

/// Which map a guest writes, which decides the pseudo-headers it may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapRole {
    /// Request headers (of the stream or of a callout): `:method`, `:path`, `:authority`,
    /// `:scheme`, `:protocol`.
    RequestHeaders,
    /// Response headers (of the stream or of a local reply): `:status`.
    ResponseHeaders,
    /// Trailers and gRPC metadata: no pseudo-headers.
    Trailers,
}

/// Why a header field a guest wrote was refused (RFC 9110 §5.1, §5.5; RFC 9113 §8.3).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("header name {0:?} is not an RFC 9110 token (letters, digits and !#$%&'*+-.^_`|~)")]
    BadName(String),
    #[error("the value of {name:?} holds {what}, which HTTP cannot carry")]
    BadValue { name: String, what: String },
    #[error("pseudo-header {name:?} is not allowed in {role}")]
    UnknownPseudo { name: String, role: &'static str },
    #[error("{name} {value:?} is invalid: {rule}")]
    BadPseudoValue {
        name: String,
        value: String,
        rule: &'static str,
    },
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn describe_byte(b: u8) -> String {
    match b {
        b'\r' => "CR".into(),
        b'\n' => "LF".into(),
        0 => "NUL".into(),
        _ => format!("the control character {b:#04x}"),
    }
}

/// Checks one field a guest wants to put in a map of `role`: a token name (or a pseudo-header
/// allowed there, with a valid value), and a value without CR, LF, NUL or other control
/// characters (horizontal tab allowed), as `http::HeaderValue` requires.
pub fn check_field(role: MapRole, name: &str, value: &[u8]) -> Result<(), FieldError> {
    let bad_pseudo = |rule| FieldError::BadPseudoValue {
        name: name.to_string(),
        value: String::from_utf8_lossy(value).into_owned(),
        rule,
    };
    if let Some(pseudo) = name.strip_prefix(':') {
        let allowed: &[&str] = match role {
            MapRole::RequestHeaders => &["method", "path", "authority", "scheme", "protocol"],
            MapRole::ResponseHeaders => &["status"],
            MapRole::Trailers => &[],
        };
        if !allowed.contains(&pseudo) {
            return Err(FieldError::UnknownPseudo {
                name: name.to_string(),
                role: match role {
                    MapRole::RequestHeaders => {
                        "request headers (only :method, :path, :authority, :scheme, :protocol)"
                    }
                    MapRole::ResponseHeaders => "response headers (only :status)",
                    MapRole::Trailers => "trailers or metadata",
                },
            });
        }
        let visible = |v: &[u8]| v.iter().all(|b| (0x21..0x7f).contains(b));
        match pseudo {
            "method" | "protocol" if value.is_empty() || !value.iter().all(|b| is_tchar(*b)) => {
                return Err(bad_pseudo("it must be a non-empty token, like GET"));
            }
            "path" if value.is_empty() || !visible(value) => {
                return Err(bad_pseudo(
                    "it must be non-empty visible ASCII, without spaces, CR or LF, like /index.html?q=1",
                ));
            }
            "authority" if !visible(value) || value.iter().any(|b| b"/?#@".contains(b)) => {
                return Err(bad_pseudo(
                    "it must be a host with an optional port, like example.com:8080",
                ));
            }
            "scheme"
                if !value.first().is_some_and(u8::is_ascii_alphabetic)
                    || !value
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b)) =>
            {
                return Err(bad_pseudo("it must be a URI scheme, like https"));
            }
            "status"
                if !(value.len() == 3
                    && value.iter().all(u8::is_ascii_digit)
                    && (b'1'..=b'5').contains(&value[0])) =>
            {
                return Err(bad_pseudo("it must be three digits from 100 to 599"));
            }
            _ => {}
        }
    } else if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(FieldError::BadName(name.to_string()));
    }
    if let Some(b) = value
        .iter()
        .find(|b| (**b < 0x20 && **b != b'\t') || **b == 0x7f)
    {
        return Err(FieldError::BadValue {
            name: name.to_string(),
            what: describe_byte(*b),
        });
    }
    Ok(())
}

/// Checks every field of a map a guest hands over (see [`check_field`]).
pub fn check_fields(role: MapRole, fields: &Fields) -> Result<(), FieldError> {
    fields.iter().try_for_each(|(k, v)| check_field(role, k, v))
}

/// Splits a property path into its segments: joined by `\0`, a trailing `\0` tolerated.
pub fn property_path(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_spec_example() {
        let fields = Fields::from_pairs([("a", "1"), ("b", "22")]);
        let bytes = serialize(&fields);
        let expected: Vec<u8> = [
            &[2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0][..],
            b"a\x001\x00b\x0022\x00",
        ]
        .concat();
        assert_eq!(bytes, expected);
        assert_eq!(deserialize(&bytes).unwrap(), fields);
    }

    #[test]
    fn empty_maps_are_no_bytes_and_every_empty_form_is_accepted() {
        assert!(serialize(&Fields::new()).is_empty());
        assert!(deserialize(&[]).unwrap().is_empty());
        assert!(deserialize(&[0]).unwrap().is_empty());
        assert!(deserialize(&[0, 0, 0, 0]).unwrap().is_empty());
    }

    #[test]
    fn refuses_truncated_and_oversized_maps() {
        let bytes = serialize(&Fields::from_pairs([("key", "value")]));
        for cut in 1..bytes.len() - 1 {
            assert_eq!(
                deserialize(&bytes[..cut]),
                Err(PairsError::Malformed),
                "cut {cut}"
            );
        }
        let mut huge = vec![0u8; 8];
        huge[..4].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert_eq!(
            deserialize(&huge),
            Err(PairsError::TooManyPairs(u32::MAX as usize))
        );
        assert!(matches!(
            deserialize(&vec![1u8; MAX_PAIRS_BYTES + 1]),
            Err(PairsError::TooLarge(_))
        ));
    }

    #[test]
    fn refuses_missing_terminators_and_trailing_bytes() {
        let mut bytes = serialize(&Fields::from_pairs([("key", "value")]));
        let mut extra = bytes.clone();
        extra.push(7);
        assert_eq!(deserialize(&extra), Err(PairsError::TrailingBytes(1)));
        let at = bytes.len() - 1;
        bytes[at] = b'x';
        assert_eq!(deserialize(&bytes), Err(PairsError::MissingNul(b'x')));
        let mut lying = serialize(&Fields::from_pairs([("k", "v")]));
        lying[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(deserialize(&lying), Err(PairsError::Malformed));
    }

    #[test]
    fn fields_follow_rfc_9110_and_pseudo_headers_their_role() {
        use MapRole::*;
        check_field(RequestHeaders, "x-ok", b"a\tb c").unwrap();
        check_field(RequestHeaders, ":path", b"/a?b=c").unwrap();
        check_field(ResponseHeaders, ":status", b"204").unwrap();
        for (role, name, value) in [
            (RequestHeaders, "x-a", &b"a\r\nx-evil: 1"[..]),
            (RequestHeaders, "x-a", b"a\0"),
            (RequestHeaders, "x a", b"1"),
            (RequestHeaders, "", b"1"),
            (RequestHeaders, "x-\u{e9}", b"1"),
            (RequestHeaders, ":path", b"/a b"),
            (RequestHeaders, ":path", b"/a\r\n"),
            (RequestHeaders, ":path", b""),
            (RequestHeaders, ":status", b"200"),
            (RequestHeaders, ":bogus", b"1"),
            (RequestHeaders, ":authority", b"a/b"),
            (RequestHeaders, ":scheme", b"1http"),
            (RequestHeaders, ":method", b"GE T"),
            (ResponseHeaders, ":status", b"20"),
            (ResponseHeaders, ":status", b"600"),
            (ResponseHeaders, ":status", b"abc"),
            (ResponseHeaders, ":path", b"/"),
            (Trailers, ":status", b"200"),
        ] {
            assert!(
                check_field(role, name, value).is_err(),
                "{role:?} {name:?} {value:?} must be refused"
            );
        }
        assert_eq!(
            check_field(RequestHeaders, "x-a", b"1\r\n")
                .unwrap_err()
                .to_string(),
            "the value of \"x-a\" holds CR, which HTTP cannot carry"
        );
    }

    #[test]
    fn set_replaces_all_values_and_keeps_position() {
        let mut f = Fields::from_pairs([("a", "1"), ("b", "2"), ("A", "3")]);
        f.set("a", "x");
        assert_eq!(f, Fields::from_pairs([("a", "x"), ("b", "2")]));
        assert_eq!(f.get_joined("b").unwrap(), b"2");
    }

    #[test]
    fn property_paths_split_on_nul() {
        assert_eq!(property_path(b"request\0path"), vec!["request", "path"]);
        assert_eq!(property_path(b"request\0path\0"), vec!["request", "path"]);
        assert_eq!(property_path(b"plugin_name"), vec!["plugin_name"]);
        assert!(property_path(b"").is_empty());
    }
}
