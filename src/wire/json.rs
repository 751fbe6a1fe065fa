//! The whole-body JSON check every client API's request passes first, in one pass: valid UTF-8
//! in every string and key, lone surrogate escapes refused, nesting at most [`MAX_DEPTH`], no
//! duplicate top-level key (400 `invalid_json` naming the path and position), and the top-level
//! fields the gateway reads ([`Head`]). A number is checked for its syntax only. Pure: bytes in,
//! a verdict out.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};

use crate::error::ApiError;

/// The deepest nesting of arrays and objects a body may have; the body object is level 1.
pub(crate) const MAX_DEPTH: usize = 64;

/// The top-level fields the gateway looks at; every other value is checked, then forwarded.
#[derive(Default)]
pub(crate) struct Head<'a> {
    pub(crate) model: Option<Field<'a>>,
    pub(crate) stream: Option<Field<'a>>,
    pub(crate) messages: Option<Field<'a>>,
    pub(crate) prompt: Option<Field<'a>>,
    pub(crate) input: Option<Field<'a>>,
    pub(crate) priority: Option<Field<'a>>,
}

impl Head<'_> {
    fn into_owned(self) -> Head<'static> {
        let own = |f: Option<Field<'_>>| {
            f.map(|f| match f {
                Field::Str(s) => Field::Str(Cow::Owned(s.into_owned())),
                Field::Bool(b) => Field::Bool(b),
                Field::Array(n) => Field::Array(n),
                Field::Null => Field::Null,
                Field::Other => Field::Other,
            })
        };
        Head {
            model: own(self.model),
            stream: own(self.stream),
            messages: own(self.messages),
            prompt: own(self.prompt),
            input: own(self.input),
            priority: own(self.priority),
        }
    }
}

/// A top-level field, known by its JSON type; strings are kept, containers are checked.
pub(crate) enum Field<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Array(usize),
    Null,
    Other,
}

/// One step of the path to a value, innermost first while an error travels up.
enum Seg {
    Key(String),
    Index(usize),
}

/// Parses and checks the whole body in one pass: see the module doc.
///
/// serde_json holds a number as an `f64`, `u64` or `i64` and refuses one beyond them (`1e400`),
/// but JSON sets no range: such a body is checked again with every number blanked (`0` and
/// spaces, [`numbers_blanked`]), so that its numbers are checked for their syntax only. The
/// body is forwarded as sent either way.
pub(crate) fn check(body: &[u8]) -> Result<Head<'_>, ApiError> {
    let mut path = Vec::new();
    match walk_head(body, &mut path) {
        Err(e) if is_out_of_range(&e) => {
            let blanked = numbers_blanked(body);
            let mut path = Vec::new();
            walk_head(&blanked, &mut path)
                .map(Head::into_owned)
                .map_err(|e| json_error(e, &path))
        }
        other => other.map_err(|e| json_error(e, &path)),
    }
}

fn walk_head<'a>(body: &'a [u8], path: &mut Vec<Seg>) -> Result<Head<'a>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    HeadSeed { path }
        .deserialize(&mut de)
        .and_then(|h| de.end().map(|()| h))
}

fn json_error(e: serde_json::Error, path: &[Seg]) -> ApiError {
    if path.is_empty() {
        ApiError::invalid_json(e)
    } else {
        ApiError::invalid_json(format_args!("{e} (in `{}`)", PathDisplay(path)))
    }
}

/// serde_json's refusal of a number beyond `f64` (its category is shared with real syntax
/// errors: the message tells them apart).
fn is_out_of_range(e: &serde_json::Error) -> bool {
    e.to_string().starts_with("number out of range")
}

/// `body` with every number outside strings replaced by `0` and spaces: the same length (so
/// the same positions in error messages), the same structure, every number in range. A token
/// that is not a JSON number becomes `-` and spaces, which serde_json refuses as one.
pub(crate) fn numbers_blanked(body: &[u8]) -> Vec<u8> {
    let numeric = |b: u8| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E');
    let mut out = body.to_vec();
    let (mut i, mut in_word) = (0, false);
    while i < out.len() {
        match out[i] {
            b'"' => {
                // Skip the string (escapes included).
                i += 1;
                while i < out.len() && out[i] != b'"' {
                    i += if out[i] == b'\\' { 2 } else { 1 };
                }
                in_word = false;
            }
            b'0'..=b'9' | b'-' if !in_word => {
                let end = (i..out.len())
                    .find(|&j| !numeric(out[j]))
                    .unwrap_or(out.len());
                out[i] = if is_json_number(&body[i..end]) {
                    b'0'
                } else {
                    b'-'
                };
                out[i + 1..end].fill(b' ');
                i = end;
                continue;
            }
            b'a'..=b'z' | b'A'..=b'Z' => in_word = true,
            _ => in_word = false,
        }
        i += 1;
    }
    out
}

/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, RFC 8259's number.
fn is_json_number(t: &[u8]) -> bool {
    let digits = |i: usize| {
        i + t[i.min(t.len())..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let mut i = usize::from(t.first() == Some(&b'-'));
    match t.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(i),
        _ => return false,
    }
    if t.get(i) == Some(&b'.') {
        let j = digits(i + 1);
        if j == i + 1 {
            return false;
        }
        i = j;
    }
    if matches!(t.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(t.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let j = digits(i);
        if j == i {
            return false;
        }
        i = j;
    }
    i == t.len()
}

struct PathDisplay<'a>(&'a [Seg]);

impl fmt::Display for PathDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().rev().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A key, as a client's text quoted back (shortened).
fn key_seg(k: &str) -> Seg {
    Seg::Key(crate::error::truncate(k, 64).to_owned())
}

struct HeadSeed<'p> {
    path: &'p mut Vec<Seg>,
}

impl<'de, 'p> DeserializeSeed<'de> for HeadSeed<'p> {
    type Value = Head<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Head<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

/// The top-level keys of a body met so far: a short list (a body has a handful: compared
/// without hashing), a set once there are more than [`Seen::FEW`].
enum Seen<'de> {
    Few(Vec<Cow<'de, str>>),
    Many(HashSet<Cow<'de, str>>),
}

impl<'de> Seen<'de> {
    const FEW: usize = 16;

    /// Whether `key` is new (and now seen).
    fn insert(&mut self, key: Cow<'de, str>) -> bool {
        match self {
            Seen::Few(keys) => {
                if keys.contains(&key) {
                    return false;
                }
                keys.push(key);
                if keys.len() > Self::FEW {
                    *self = Seen::Many(std::mem::take(keys).into_iter().collect());
                }
                true
            }
            Seen::Many(keys) => keys.insert(key),
        }
    }
}

impl<'de, 'p> Visitor<'de> for HeadSeed<'p> {
    type Value = Head<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the body to be a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Head<'de>, A::Error> {
        let mut head = Head::default();
        let mut seen = Seen::Few(Vec::with_capacity(8));
        while let Some(key) = a.next_key_seed(KeySeed)? {
            if !seen.insert(key.clone()) {
                return Err(A::Error::custom(format_args!(
                    "duplicate key `{}` in the body",
                    crate::error::truncate(&key, 64)
                )));
            }
            let slot = match key.as_ref() {
                "model" => &mut head.model,
                "stream" => &mut head.stream,
                "messages" => &mut head.messages,
                "prompt" => &mut head.prompt,
                "input" => &mut head.input,
                "priority" => &mut head.priority,
                _ => {
                    let check = Check {
                        depth: 2,
                        path: &mut *self.path,
                    };
                    if let Err(e) = a.next_value_seed(check) {
                        self.path.push(key_seg(&key));
                        return Err(e);
                    }
                    continue;
                }
            };
            match a.next_value_seed(FieldSeed {
                path: &mut *self.path,
            }) {
                Ok(f) => *slot = Some(f),
                Err(e) => {
                    self.path.push(key_seg(&key));
                    return Err(e);
                }
            }
        }
        Ok(head)
    }
}

/// A key, validated (UTF-8, escapes), borrowed when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

/// A top-level field the gateway reads: its type (and text), its contents checked.
struct FieldSeed<'p> {
    path: &'p mut Vec<Seg>,
}

impl<'de, 'p> DeserializeSeed<'de> for FieldSeed<'p> {
    type Value = Field<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Field<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'p> Visitor<'de> for FieldSeed<'p> {
    type Value = Field<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
        Ok(Field::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Field<'de>, E> {
        Ok(Field::Bool(v))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Field<'de>, E> {
        Ok(Field::Other)
    }
    fn visit_unit<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<Field<'de>, A::Error> {
        walk_seq(a, 2, self.path).map(Field::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Field<'de>, A::Error> {
        walk_map(a, 2, self.path).map(|()| Field::Other)
    }
}

/// Any value, checked and dropped: strings and keys are decoded (so validated), containers
/// counted against [`MAX_DEPTH`]. `depth`: the level a container here would be at.
struct Check<'p> {
    depth: usize,
    path: &'p mut Vec<Seg>,
}

impl<'de, 'p> DeserializeSeed<'de> for Check<'p> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'p> Visitor<'de> for Check<'p> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, _: &'de str) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<(), A::Error> {
        walk_seq(a, self.depth, self.path).map(|_| ())
    }
    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<(), A::Error> {
        walk_map(a, self.depth, self.path)
    }
}

fn too_deep<E: serde::de::Error>() -> E {
    E::custom(format_args!(
        "the body is nested deeper than {MAX_DEPTH} levels"
    ))
}

/// Checks an array at level `depth`; returns its length.
fn walk_seq<'de, A: SeqAccess<'de>>(
    mut a: A,
    depth: usize,
    path: &mut Vec<Seg>,
) -> Result<usize, A::Error> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    let mut n = 0;
    loop {
        let check = Check {
            depth: depth + 1,
            path: &mut *path,
        };
        match a.next_element_seed(check) {
            Ok(Some(())) => n += 1,
            Ok(None) => return Ok(n),
            Err(e) => {
                path.push(Seg::Index(n));
                return Err(e);
            }
        }
    }
}

/// Checks an object at level `depth`.
fn walk_map<'de, A: MapAccess<'de>>(
    mut a: A,
    depth: usize,
    path: &mut Vec<Seg>,
) -> Result<(), A::Error> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    while let Some(key) = a.next_key_seed(KeySeed)? {
        let check = Check {
            depth: depth + 1,
            path: &mut *path,
        };
        if let Err(e) = a.next_value_seed(check) {
            path.push(key_seg(&key));
            return Err(e);
        }
    }
    Ok(())
}
