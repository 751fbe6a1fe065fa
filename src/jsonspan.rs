//! Where the top-level members of a JSON object lie in its bytes: a scan (meant for a body that
//! already passed the whole-body check, `wire::json::check`; on any other bytes it returns
//! `None` or spans within them, never panics), so that a caller can edit or read one member's
//! raw bytes without parsing the body again. Pure; imports nothing of the crate, so
//! that both the request pipeline (`proxy::forward`'s rewrite) and the decision core
//! (`prefix`'s rendering of a prompt) can use it.

/// Where a top-level member of a JSON object lies: its key (quotes included) and its value.
pub(crate) struct Member {
    pub(crate) key: std::ops::Range<usize>,
    pub(crate) value: std::ops::Range<usize>,
}

/// A member's key, decoded (a key with escapes, like `"mod\u0065l"`, is `model` too).
pub(crate) fn member_key<'a>(body: &'a [u8], m: &Member) -> std::borrow::Cow<'a, str> {
    let raw = &body[m.key.start + 1..m.key.end - 1];
    match (raw.contains(&b'\\'), std::str::from_utf8(raw)) {
        (false, Ok(k)) => k.into(),
        _ => serde_json::from_slice::<String>(&body[m.key.clone()])
            .unwrap_or_default()
            .into(),
    }
}

/// The members of the JSON object `body` is, in order (`None`: not an object).
pub(crate) fn top_level_members(body: &[u8]) -> Option<Vec<Member>> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    let mut out = Vec::new();
    i = skip_ws(body, i + 1);
    if body.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        let key = i..skip_string(body, i)?;
        i = skip_ws(body, key.end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(body, i + 1);
        let value = start..skip_value(body, start)?;
        i = skip_ws(body, value.end);
        out.push(Member { key, value });
        match body.get(i)? {
            b',' => i = skip_ws(body, i + 1),
            b'}' => return Some(out),
            _ => return None,
        }
    }
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while matches!(body.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The end of the string starting at `i` (after its closing quote). Jumps from one quote or
/// backslash to the next (`memchr2`, a word or a vector at a time): most of a chat body's bytes
/// are inside strings, and a byte-at-a-time loop here cost ~9 instructions a byte.
fn skip_string(body: &[u8], i: usize) -> Option<usize> {
    if body.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        let k = j + memchr::memchr2(b'"', b'\\', body.get(j..)?)?;
        match body[k] {
            b'"' => return Some(k + 1),
            _ => j = k + 2,
        }
    }
}

/// The end of the value starting at `i`.
fn skip_value(body: &[u8], i: usize) -> Option<usize> {
    match body.get(i)? {
        b'"' => skip_string(body, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match body.get(j)? {
                    b'"' => {
                        j = skip_string(body, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while !matches!(
                body.get(j),
                None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            ) {
                j += 1;
            }
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    fn members(body: &[u8]) -> Option<Vec<(String, Value)>> {
        Some(
            top_level_members(body)?
                .iter()
                .map(|m| {
                    let v = serde_json::from_slice(&body[m.value.clone()]).expect("a value");
                    (member_key(body, m).into_owned(), v)
                })
                .collect(),
        )
    }

    #[test]
    fn spans_cover_each_member_whatever_its_strings_hold() {
        let body = br#" { "model" : "m", "mod\u0065l2":[1, {"a":"}]\"\\"}], "s":"q\"uo\\", "n":-1.5e3 ,"t":true,"z":null,"e":{}} "#;
        let got = members(body).expect("an object");
        let want: Map<String, Value> = serde_json::from_slice(body).unwrap();
        assert_eq!(got, want.into_iter().collect::<Vec<_>>());
        assert_eq!(members(b"{}"), Some(vec![]));
        assert_eq!(members(b" [1] "), None);
        for cut in [
            &br#"{"a":"x\"#[..],
            br#"{"a":"x"#,
            br#"{"a":[1,"#,
            br#"{"a""#,
            b"{",
            b"",
        ] {
            assert_eq!(members(cut), None, "{}", String::from_utf8_lossy(cut));
        }
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            // Quotes, backslashes, braces and non-ASCII inside strings.
            "[a-z\"\\\\{}\\[\\],: é\n]{0,40}".prop_map(Value::from),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z\"\\\\]{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// On any object serde_json writes (compact or pretty), the spans are its members;
        /// on any bytes at all, no panic and spans within them.
        #[test]
        fn the_scan_agrees_with_serde_json(
            m in prop::collection::btree_map("[a-z\"\\\\]{0,8}", value(), 0..6),
            pretty in any::<bool>(),
            junk in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let obj = Value::Object(m.into_iter().collect());
            let body = if pretty { serde_json::to_vec_pretty(&obj) } else { serde_json::to_vec(&obj) }.unwrap();
            let want: Vec<(String, Value)> = obj.as_object().unwrap().clone().into_iter().collect();
            prop_assert_eq!(members(&body), Some(want));
            if let Some(ms) = top_level_members(&junk) {
                for m in ms {
                    prop_assert!(m.key.end <= junk.len() && m.value.end <= junk.len());
                    let _ = member_key(&junk, &m);
                }
            }
        }
    }

    #[test]
    fn a_chat_body_is_found_whole() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"a \"b\" \\ c ]}"}],"stream":true}"#;
        let ms = top_level_members(body).unwrap();
        assert_eq!(ms.len(), 3);
        assert_eq!(member_key(body, &ms[1]), "messages");
        assert_eq!(
            &body[ms[1].value.clone()],
            br#"[{"role":"user","content":"a \"b\" \\ c ]}"}]"#
        );
    }
}
