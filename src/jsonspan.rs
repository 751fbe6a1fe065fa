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

/// The end of the string starting at `i` (after its closing quote).
fn skip_string(body: &[u8], i: usize) -> Option<usize> {
    if body.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        match body.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
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
